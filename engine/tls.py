"""TLS for every listener and sender: the settings, the contexts, their files' checks and reload.

One ``TLSSettings`` describes one TLS endpoint: a channel's ``tls:`` block (MLLP and DICOM
listeners), ``[http.tls]`` (HTTPS) in config/radbridge.toml. ``server_context`` builds the
``ssl.SSLContext`` a listener hands to asyncio, aiohttp or pynetdicom; ``client_context`` the one
of a sender (outbound MLLP, C-MOVE to a ``tls://`` destination, ``radbridge send hl7 --tls``).
Both refuse anything older than TLS 1.2.

``ReloadingContext`` keeps a server context and loads its certificate and key again when their
files change (their modification time or size): new handshakes use the new chain at once,
connections already open keep theirs, nothing restarts. ``check_files`` is what ``radbridge check``
says about the files: unreadable, not PEM, expired, not yet valid, key not matching the certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.errors import RadBridgeError
from engine.yamlfile import ConfigProblem, LineDict

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ClientCerts(StrEnum):
    """Whether a listener asks its peers for a certificate (mutual TLS)."""

    REQUIRED = "required"  # no trusted client certificate: the handshake fails
    OPTIONAL = "optional"  # asked for; one that is sent must be trusted, none is fine
    OFF = "off"  # not asked for


class TLSError(RadBridgeError):
    """A TLS context could not be built from its files (the text names the file and why)."""


@dataclass
class TLSSettings:
    """One TLS endpoint's settings. ``cert`` empty: TLS off (for ``[http.tls]``; a channel's
    ``tls:`` block must name cert and key)."""

    cert: str = ""  # PEM certificate chain: ours first, then intermediates
    key: str = ""  # PEM private key of cert (unencrypted; keep the file mode 0600)
    ca: str = ""  # PEM CA bundle that client certificates must chain to ('' : the system's)
    client_certs: ClientCerts = ClientCerts.OFF
    bind_ae_title: bool = False  # DICOM: a calling AE title must equal its client certificate's CN
    reload_seconds: float = 5.0  # how often cert and key files are looked at for a change (0: never)

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


TLS_KEYS = ("cert", "key", "ca", "client_certs", "bind_ae_title", "reload_seconds")


@dataclass
class TLSSource:
    """Where a TLSSettings came from, for problems: file and the line of each key."""

    file: str
    line: int
    key_lines: dict[str, int] = field(default_factory=dict)
    prefix: str = "tls"

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


STREAM_TLS_KEYS = tuple(k for k in TLS_KEYS if k != "bind_ae_title")  # listeners that are not DICOM


def parse_tls_block(raw: Any, file: str, line: int, problems: list[ConfigProblem], *,
                    keys: tuple[str, ...] = TLS_KEYS) -> TLSSettings | None:
    """A channel file's ``tls:`` mapping (the ``keys`` its connector type takes); problems name the
    file and each key's line."""
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(file, line, "tls", "tls: is a mapping {cert: FILE, key: FILE, ca: FILE, "
                                                          "client_certs: required|optional|off}"))
        return None
    settings = TLSSettings()

    def kline(key: str) -> int:
        return raw.line_of(key) if isinstance(raw, LineDict) and key in raw else line

    for key, value in raw.items():
        if key not in keys:
            problems.append(ConfigProblem(file, kline(key), f"tls.{key}", f"unknown key; expected {', '.join(keys)}"))
        elif key in ("cert", "key", "ca"):
            if not isinstance(value, str):
                problems.append(ConfigProblem(file, kline(key), f"tls.{key}", f"expected a file name, got {value!r}"))
            else:
                setattr(settings, key, value)
        elif key == "client_certs":
            try:
                settings.client_certs = ClientCerts(str(value))
            except ValueError:
                problems.append(ConfigProblem(file, kline(key), "tls.client_certs",
                                              f"must be required, optional or off, got {value!r}"))
        elif key == "bind_ae_title":
            if isinstance(value, bool):
                settings.bind_ae_title = value
            else:
                problems.append(ConfigProblem(file, kline(key), "tls.bind_ae_title", "is true or false"))
        elif key == "reload_seconds":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                settings.reload_seconds = float(value)
            else:
                problems.append(ConfigProblem(file, kline(key), "tls.reload_seconds", "is a number of seconds >= 0"))
    for key in ("cert", "key"):
        if not getattr(settings, key):
            problems.append(ConfigProblem(file, line, f"tls.{key}", f"a tls: block needs {key}: (a PEM file)"))
    problems.extend(check_consistency(settings, TLSSource(file, line, dict(getattr(raw, "key_lines", {})))))
    return settings


def check_consistency(settings: TLSSettings, source: TLSSource) -> list[ConfigProblem]:
    """What the settings say among themselves (not their files)."""
    problems: list[ConfigProblem] = []
    p = source.prefix
    if settings.enabled and not settings.key:
        problems.append(ConfigProblem(source.file, source.line_of("cert"), f"{p}.key", "cert is given, key is not"))
    if not settings.enabled and settings.key:
        problems.append(ConfigProblem(source.file, source.line_of("key"), f"{p}.cert", "key is given, cert is not"))
    if settings.bind_ae_title and settings.client_certs is not ClientCerts.REQUIRED:
        problems.append(ConfigProblem(source.file, source.line_of("bind_ae_title"), f"{p}.bind_ae_title",
                                      "needs client_certs: required (the AE title is checked against the "
                                      "client certificate)"))
    return problems


# --- contexts --------------------------------------------------------------------------------------------
def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their handshake on first read, not in ``wrap_socket``.

    pynetdicom wraps each accepted socket in its accepting thread: with the handshake there, one
    peer that connects and sends nothing would stop every other connection from being accepted.
    Deferred, the handshake runs in the association's own thread, under its timeouts."""

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: Any = None,
                    session: Any = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def server_context(settings: TLSSettings, *, deferred_handshake: bool = False) -> ssl.SSLContext:
    """A listener's context: our certificate and key, client certificates as configured
    (``deferred_handshake``: for pynetdicom, see DeferredHandshakeContext)."""
    cls = DeferredHandshakeContext if deferred_handshake else ssl.SSLContext
    ctx = _harden(cls(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, settings.cert, settings.key)
    if settings.client_certs is not ClientCerts.OFF:
        _load_trust(ctx, settings.ca)
        ctx.verify_mode = (ssl.CERT_REQUIRED if settings.client_certs is ClientCerts.REQUIRED
                           else ssl.CERT_OPTIONAL)
    return ctx


def client_context(ca: str = "", cert: str = "", key: str = "", *, verify: bool = True) -> ssl.SSLContext:
    """A sender's context: the server is verified against ``ca`` (else the system's CAs) and its
    host name; ``cert``/``key`` are our client certificate for mutual TLS."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if verify:
        _load_trust(ctx, ca)
    else:  # test rigs only (a setting says so in so many words)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        _load_chain(ctx, cert, key or None)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSError(f"{exc.filename}: file not found") from None
    except PermissionError as exc:
        raise TLSError(f"{exc.filename}: not readable ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise TLSError(f"{cert} / {key or cert}: certificate and key do not load ({exc.reason or exc}); "
                       "are they PEM, and is the key the certificate's?") from None


def _load_trust(ctx: ssl.SSLContext, ca: str) -> None:
    if not ca:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH if ctx.check_hostname else ssl.Purpose.CLIENT_AUTH)
        return
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TLSError(f"{ca}: file not found") from None
    except PermissionError as exc:
        raise TLSError(f"{ca}: not readable ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise TLSError(f"{ca}: no CA certificate in it ({exc.reason or exc})") from None


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


class ReloadingContext:
    """A server context whose certificate and key are loaded again when their files change.

    The SSLContext object stays the same (listeners hold it): ``load_cert_chain`` on it replaces
    the chain for every handshake after. A change that does not load (a half-written file, a key
    of another certificate) is logged and the old chain stays; it is tried again on the next
    change."""

    def __init__(self, settings: TLSSettings, what: str, *, deferred_handshake: bool = False) -> None:
        self.settings = settings
        self.what = what  # "channel hl7-inbound", "HTTPS": for the log
        self.deferred_handshake = deferred_handshake
        self.context = server_context(settings, deferred_handshake=deferred_handshake)
        # a listener whose handshakes run in threads of their own (pynetdicom) takes a new context
        # instead: the one in use is never changed while another thread wraps a socket with it
        self.replace: Callable[[ssl.SSLContext], None] | None = None
        # told of every reload tried (what happened, and whether it took): the engine's audit trail
        self.on_reload: Callable[[str, bool], Awaitable[None]] | None = None
        self._stamps = self._now()
        self.reloads = 0
        self.attempt: tuple[str, bool] | None = None  # the last reload tried: what happened, and whether it took

    def _now(self) -> tuple[tuple[float, int] | None, ...]:
        return tuple(_stamp(p) for p in (self.settings.cert, self.settings.key, self.settings.ca) if p)

    def reload_if_changed(self) -> bool:
        stamps = self._now()
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            fresh = server_context(self.settings, deferred_handshake=self.deferred_handshake)  # all load, or none
            if self.replace is not None:
                self.context = fresh
                self.replace(fresh)
            else:
                _load_chain(self.context, self.settings.cert, self.settings.key)
                if self.settings.client_certs is not ClientCerts.OFF and self.settings.ca:
                    self.context.load_verify_locations(cafile=self.settings.ca)  # adds the new CAs
        except (TLSError, ssl.SSLError, OSError) as exc:
            log.error("%s: new TLS certificate not loaded, the previous one stays in use: %s", self.what, exc)
            self.attempt = (f"{self.what}: TLS certificate {self.settings.cert} changed on disk but not loaded "
                            f"({type(exc).__name__}); the previous one stays in use", False)
            return False
        self.reloads += 1
        log.info("%s: TLS certificate %s loaded again (changed on disk)", self.what, self.settings.cert)
        self.attempt = (f"{self.what}: TLS certificate {self.settings.cert} loaded again (changed on disk)", True)
        return True

    async def watch(self) -> None:
        """Look at the files every reload_seconds, for ever (run as a task; cancel to stop)."""
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            try:
                # on the loop's thread, not another: the context is not changed while a handshake
                # of the loop uses it (a stat per file; reading them only after a change)
                self.attempt = None
                self.reload_if_changed()
                if self.attempt is not None and self.on_reload is not None:
                    await self.on_reload(*self.attempt)
            except Exception:
                log.exception("%s: TLS certificate reload failed", self.what)


# --- checks ------------------------------------------------------------------------------------------------
def check_files(settings: TLSSettings, source: TLSSource, *, now: dt.datetime | None = None) -> list[ConfigProblem]:
    """What ``radbridge check`` says about the files: each problem at the line of its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    now = now or dt.datetime.now(dt.UTC)
    problems: list[ConfigProblem] = []
    p = source.prefix

    def problem(key: str, message: str) -> None:
        problems.append(ConfigProblem(source.file, source.line_of(key), f"{p}.{key}", message))

    def read(key: str) -> bytes | None:
        path = getattr(settings, key)
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            problem(key, f"{path}: file not found")
        except OSError as exc:
            problem(key, f"{path}: not readable ({exc.strerror or exc})")
        return None

    def certificates(key: str, what: Callable[[int], str]) -> list[Any]:
        """The PEM certificates of file ``key``, each checked for its dates (``what(i)`` names the i-th)."""
        path = getattr(settings, key)
        pem = read(key) if path else None
        if pem is None:
            return []
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            problem(key, f"{path}: no PEM certificate in it")
            return []
        for i, c in enumerate(certs):
            subject = c.subject.rfc4514_string()
            if c.not_valid_after_utc < now:
                problem(key, f"{path}: {what(i)} ({subject}) expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
            elif c.not_valid_before_utc > now:
                problem(key, f"{path}: {what(i)} ({subject}) is not valid before "
                             f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        return certs

    chain = certificates("cert", lambda i: "certificate" if i == 0 else f"certificate {i + 1} of the chain")
    leaf: Any = chain[0] if chain else None
    key_pem = read("key") if settings.key else None
    if key_pem is not None:
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            problem("key", f"{settings.key}: not an unencrypted PEM private key ({exc})")
        else:
            if leaf is not None and isinstance(private, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                                                         ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
                ours = private.public_key().public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
                theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
                if ours != theirs:
                    problem("key", f"{settings.key}: this key does not belong to the certificate in {settings.cert}")
    certificates("ca", lambda _i: "CA certificate")
    return problems


def peer_common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def peer_subject(peercert: dict[str, Any] | None) -> str | None:
    """A verified peer certificate's subject as one line, ``CN=...,O=...`` (for logs and audit)."""
    if not peercert:
        return None
    parts = [f"{_SHORT.get(name, name)}={value}" for rdn in peercert.get("subject", ()) for name, value in rdn]
    return ",".join(reversed(parts)) or None


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}
