"""Engine settings: config/radbridge.toml, overridden by environment variables.

Every setting can be overridden as ``RADBRIDGE_<SECTION>_<KEY>`` (``RADBRIDGE_<KEY>`` for top-level
keys), e.g. ``RADBRIDGE_DATABASE_URL``, ``RADBRIDGE_MLLP_PORT``, ``RADBRIDGE_HTTP_PORT``. Two more
names from the interface contract: ``RADBRIDGE_STABLE_SECONDS`` (= dicom.stable_seconds) and
``RADBRIDGE_API_TOKEN`` (a bearer token accepted in addition to http.tokens).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import unquote

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from engine.redaction import redact_url
from engine.tls import TLSSettings, TLSSource, check_consistency
from engine.yamlfile import ConfigFileError, ConfigProblem

DEFAULT_CONFIG = Path("config/radbridge.toml")


@dataclass
class DatabaseSettings:
    url: str = ""  # empty: sqlite under storage.dir
    url_file: str = ""  # or the URL (with its password) read from this file
    password_file: str = ""  # the password for url, read from this file (url then has none)
    sqlite_synchronous: str = "FULL"
    # how long a write waits for another process's SQLite lock; with the inline writer the event loop
    # waits too, so keep it short: past it the message is NAKed (AR, resend) rather than held
    busy_timeout_ms: int = 5000
    pool_size: int = 5
    # auto: SQLite commits on the event loop thread (inline), PostgreSQL in a writer thread
    writer: str = "auto"
    # how long a worker's claim on queued work (a delivery, a reconciliation) lasts unless renewed;
    # renewed every third of it while worked, so a crashed engine's work waits at most this long
    # for another engine (an engine restarting on the same host takes it back at once)
    lease_seconds: float = 30.0


@dataclass
class CleanupSettings:
    """[storage.cleanup]: deleting studies that are safely elsewhere (engine/domain/lifecycle.py,
    docs/storage.md). Off by default; nothing is deleted that was not forwarded unless
    ``delete_unforwarded``."""

    enabled: bool = False
    max_age_days: float = 0.0  # 0: no age rule; age = time since the study's last instance arrived
    max_storage_mb: float = 0.0  # high watermark of the studies' stored size; 0: none
    low_watermark_mb: float = 0.0  # once above the high mark, delete oldest first down to this (0: the high mark)
    min_free_mb: float = 0.0  # free disk below this also deletes oldest first, until this much is free
    # destinations a study must have been forwarded to; empty: every forward destination that has a
    # delivery for the study (and at least one)
    require_forwarded_to: list[str] = field(default_factory=list)
    delete_unforwarded: bool = False  # true: the forwarding condition is waived (plain recycling)
    interval_seconds: float = 600.0
    batch_size: int = 100  # studies looked at per query; each deletion is its own short transaction


@dataclass
class StorageSettings:
    dir: str = "var"
    cleanup: CleanupSettings = field(default_factory=CleanupSettings)


@dataclass
class MLLPSettings:
    port: int = 2575
    max_connections: int = 200  # per listener; when all are taken the idlest is closed to make room
    # half-received frames of all connections of a listener together; past it the idlest holder is closed
    max_buffered_bytes: int = 256 * 1024 * 1024


@dataclass
class HTTPSettings:
    port: int = 8080
    auth: str = "token"  # token | none (local use only)
    tokens: list[str] = field(default_factory=list)
    # a connection must send a complete request head within this of opening (or of its previous
    # response), or it is closed: slow or silent peers must not hold connections (and file handles)
    header_timeout_seconds: float = 15.0
    body_timeout_seconds: float = 60.0  # a request body must have arrived whole within this: else 408
    max_connections: int = 256  # open connections; one more is answered 503 and closed at once
    console_session_hours: float = 12.0  # a console login lasts this long (logout or revoking its token end it sooner)
    tls: TLSSettings = field(default_factory=TLSSettings)  # [http.tls]: cert given = HTTPS (docs/security.md)
    # how peers reach this port ("https://pacs-gw.hospital.example:8443"), for the links the engine
    # publishes (its own DICOMweb in ImagingStudy.endpoint and the ORU); empty: http(s)://bind:port
    public_base_url: str = ""
    # STOW-RS (POST /dicomweb/studies): a request body larger than this is refused with 413; bodies
    # are streamed part by part to files, never held in memory (docs/dicomweb.md)
    stow_max_bytes: int = 4 * 1024 * 1024 * 1024
    # the dicom channel whose storage, duplicate policy and free-space floor STOW-RS uses; empty:
    # the first enabled dicom channel by name
    stow_channel: str = ""


@dataclass
class DicomSettings:
    port: int = 11112  # default port of DICOM channels that do not name one
    aet: str = "RADBRIDGE"  # default AE title of DICOM channels that do not name one
    stable_seconds: float = 30.0  # a study with no new instance for this long is stable
    # C-MOVE destinations, "AET=host:port" each (RADBRIDGE_DICOM_DESTINATIONS: comma-separated)
    destinations: list[str] = field(default_factory=list)
    # fsync each received file and its directory before the C-STORE success is sent; false trades
    # that promise for speed (what Orthanc and storescp do by default) and is for test rigs only
    fsync: bool = True

    def destination(self, aet: str) -> tuple[str, int] | None:
        found = self.move_destination(aet)
        return (found.host, found.port) if found is not None else None

    def move_destination(self, aet: str) -> MoveDestination | None:
        """A C-MOVE destination by AE title: "AET=host:port", or "AET=tls://host:port" for DICOM TLS."""
        for entry in self.destinations:
            name, _, addr = entry.partition("=")
            if name.strip() == aet.strip():
                addr = addr.strip()
                tls = addr.startswith("tls://")
                host, _, port = addr.removeprefix("tls://").rpartition(":")
                return MoveDestination(name.strip(), host.strip(), int(port), tls)
        return None


@dataclass(frozen=True)
class MoveDestination:
    aet: str
    host: str
    port: int
    tls: bool  # the sub-association speaks DICOM TLS (the channel's tls: cert and ca are used as a client)


@dataclass
class EHRSettings:
    """Where results go (channels/ehr-outbound.yaml says what is sent; docs/outbound.md)."""

    mllp: str = ""  # host:port of the EHR's results inbox (ORU^R01); empty: no HL7 results
    fhir_base: str = ""  # base URL of the EHR's FHIR R4 server (ImagingStudy); empty: no FHIR
    fhir_token: str = ""  # bearer token for the FHIR server (RADBRIDGE_EHR_FHIR_TOKEN)
    fhir_username: str = ""  # or HTTP basic authentication
    fhir_password: str = ""
    fhir_token_file: str = ""  # the token read from this file instead (RADBRIDGE_EHR_FHIR_TOKEN_FILE)
    fhir_password_file: str = ""  # the password read from this file instead
    fhir_verify_tls: bool = True  # never switch off outside a test rig
    fhir_ca_file: str = ""  # a CA bundle for a hospital-internal certificate authority
    mllp_tls: bool = False  # results over MLLP/TLS; the EHR's certificate is checked against mllp_ca_file
    mllp_ca_file: str = ""  # CA bundle for the EHR's MLLP certificate ('' : the system's CAs)
    mllp_cert_file: str = ""  # our client certificate when the EHR asks for one (mutual TLS)
    mllp_key_file: str = ""
    dicomweb_base: str = ""  # a DICOMweb (WADO-RS) base URL for ImagingStudy.endpoint; empty: none


@dataclass
class RetentionSettings:
    enabled: bool = True
    content_days: float = 30.0  # raw content, mapped fields and ACK are dropped after this
    metadata_days: float = 365.0  # the message row and its events after this
    audit_days: float = 2190.0  # audit trail rows (6 years, as HIPAA keeps its records); the only deletion of them
    keep_errors: bool = True  # never prune messages in error/rejected state
    interval_seconds: float = 300.0
    batch_size: int = 500
    pause_seconds: float = 0.05  # between batches, so ingest always gets the lock


@dataclass
class MappingSettings:
    reload_seconds: float = 2.0  # 0 disables the watcher
    hl7_version: str = "2.5"  # structure definitions used to check paths


@dataclass
class Settings:
    name: str = "RADBRIDGE"  # our application name in ACKs when MSH-5 is empty
    facility: str = ""
    bind: str = "127.0.0.1"
    channels_dir: str = "channels"
    mappings_dir: str = "mappings"
    log_level: str = "INFO"
    # patient names, identifiers, accession numbers and birth dates in log lines (INFO and above):
    # off, they are left out; on (for debugging only) they are written, and the start says so loudly
    log_patient_details: bool = False
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    mllp: MLLPSettings = field(default_factory=MLLPSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    ehr: EHRSettings = field(default_factory=EHRSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    mappings: MappingSettings = field(default_factory=MappingSettings)
    source: str = ""  # the file it came from
    key_lines: dict[str, int] = field(default_factory=dict)  # "http.auth" -> its line in the file
    from_environment: dict[str, str] = field(default_factory=dict)  # "bind" -> "RADBRIDGE_BIND"

    def dicomweb_base(self) -> str:
        """The DICOMweb (WADO-RS) base published in ImagingStudy.endpoint and the ORU: ``[ehr]
        dicomweb_base`` when set, else this engine's own /dicomweb at ``[http] public_base_url``, else at
        the bind address and port ('' on an ephemeral port 0: there is no address to publish)."""
        if self.ehr.dicomweb_base:
            return self.ehr.dicomweb_base.rstrip("/")
        if self.http.public_base_url:
            return self.http.public_base_url.rstrip("/") + "/dicomweb"
        if not self.http.port:
            return ""
        host = self.bind if self.bind not in ("", "0.0.0.0", "::") else socket.getfqdn()
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.http.tls.cert else 'http'}://{host}:{self.http.port}/dicomweb"

    def origin(self, key: str) -> tuple[str, int, str]:
        """Where setting ``key`` ("http.auth") came from, as a ConfigProblem's file, line and field:
        the environment variable that set it, or its line in the TOML file (0: not in the file)."""
        if key in self.from_environment:
            return "environment", 0, self.from_environment[key]
        return self.source or "(built-in default)", self.key_lines.get(key, 0), key

    def lines_of(self, section: str) -> dict[str, int]:
        """The line of each key of ``[section]`` in the file, by its name in the section; "" is the
        line of the section's header."""
        prefix = section + "."
        lines = {k[len(prefix):]: n for k, n in self.key_lines.items() if k.startswith(prefix)}
        if section in self.key_lines:
            lines[""] = self.key_lines[section]
        return lines

    def problem(self, key: str, message: str, severity: str = "error") -> ConfigProblem:
        file, line, where = self.origin(key)
        return ConfigProblem(file, line, where, message, severity)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{Path(self.storage.dir) / 'radbridge.db'}"

    def api_tokens(self) -> list[str]:
        return list(self.http.tokens)

    def secret_values(self) -> list[str]:
        """Every secret the settings hold, for masking wherever one might still be printed."""
        found = [self.ehr.fhir_token, self.ehr.fhir_password, *self.http.tokens,
                 urlsplit_password(self.database.url), urlsplit_password(self.ehr.fhir_base)]
        return [s for s in found if s]


def urlsplit_password(url: str) -> str:
    """The password in ``url`` ("" when it has none or is not a URL)."""
    userinfo, at, _host = url.partition("://")[2].partition("/")[0].rpartition("@")
    return unquote(userinfo.partition(":")[2]) if at else ""


NOT_SETTINGS = frozenset({"source", "key_lines", "from_environment"})  # Settings fields no file or variable sets
_TOML_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def toml_key_lines(text: str) -> dict[str, int]:
    """The line (1-based) of each ``key =`` in a TOML file, as "section.key" (tomllib keeps none)."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if m := _TOML_TABLE.match(line):
            section = m.group(1) + "."
            lines.setdefault(m.group(1), number)
        elif m := _TOML_KEY.match(line):
            lines.setdefault(section + m.group(1), number)
    return lines


SECRET_WORDS = ("token", "password", "url", "secret")  # settings whose values are never echoed in errors


def _coerce(value: Any, typ: Any, where: str, file: str) -> Any:
    origin = get_origin(typ)
    try:
        if isinstance(typ, type) and issubclass(typ, Enum):
            return typ(value)
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            (inner,) = get_args(typ)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [_coerce(v, inner, where, file) for v in value]
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        if isinstance(typ, type) and issubclass(typ, Enum):
            name = " or ".join(str(m.value) for m in typ)
        shown = "a value of another type" if any(w in where.lower() for w in SECRET_WORDS) else repr(value)
        raise ConfigFileError([ConfigProblem(file, 0, where, f"expected {name}, got {shown}")]) from None
    return value


def _fill(obj: Any, data: Mapping[str, Any], prefix: str, file: str, problems: list[ConfigProblem]) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)} - NOT_SETTINGS
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(ConfigProblem(file, 0, where, f"unknown setting; expected one of {', '.join(sorted(names))}"))
            continue
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(ConfigProblem(file, 0, where, "expected a [section]"))
                continue
            _fill(current, value, f"{where}.", file, problems)
        else:
            try:
                setattr(obj, key, _coerce(value, hints[key], where, file))
            except ConfigFileError as exc:
                problems.extend(exc.problems)


def _apply_env_to(s: Settings, obj: Any, prefix: str, path: str, env: Mapping[str, str],
                  problems: list[ConfigProblem]) -> None:
    """RADBRIDGE_<SECTION>_<KEY> (and deeper: RADBRIDGE_HTTP_TLS_CERT) for every field of ``obj``;
    ``s.from_environment`` remembers which variable set which key, for problems that name it."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        if f.name in NOT_SETTINGS:
            continue
        value = getattr(obj, f.name)
        var = f"{prefix}_{f.name}".upper()
        if is_dataclass(value):
            _apply_env_to(s, value, var, f"{path}{f.name}.", env, problems)
        elif var in env:
            try:
                setattr(obj, f.name, _coerce(env[var], hints[f.name], var, "environment"))
                s.from_environment[f"{path}{f.name}"] = var
            except ConfigFileError as exc:
                problems.extend(exc.problems)


def _apply_env(s: Settings, env: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    _apply_env_to(s, s, "RADBRIDGE", "", env, problems)
    if "RADBRIDGE_STABLE_SECONDS" in env:
        try:
            s.dicom.stable_seconds = float(env["RADBRIDGE_STABLE_SECONDS"])
            s.from_environment["dicom.stable_seconds"] = "RADBRIDGE_STABLE_SECONDS"
        except ValueError:
            problems.append(ConfigProblem("environment", 0, "RADBRIDGE_STABLE_SECONDS", "expected a number"))
    if env.get("RADBRIDGE_API_TOKEN"):
        s.http.tokens = [*s.http.tokens, env["RADBRIDGE_API_TOKEN"]]
    if env.get("RADBRIDGE_API_TOKEN_FILE"):
        token = _read_secret(env["RADBRIDGE_API_TOKEN_FILE"], env, "environment", 0, "RADBRIDGE_API_TOKEN_FILE",
                             problems)
        if token:
            s.http.tokens = [*s.http.tokens, token]


def _secret_path(name: str, env: Mapping[str, str]) -> Path:
    """A secret file's path: a relative one is in $CREDENTIALS_DIRECTORY when systemd set it
    (LoadCredential=), else relative to the working directory like every other path."""
    path = Path(name).expanduser()
    if not path.is_absolute() and env.get("CREDENTIALS_DIRECTORY"):
        return Path(env["CREDENTIALS_DIRECTORY"]) / path
    return path


def _read_secret(name: str, env: Mapping[str, str], file: str, line: int, where: str,
                 problems: list[ConfigProblem]) -> str | None:
    """The secret in file ``name`` without its trailing newline; a problem (never its content) if
    it cannot be read or is empty."""
    path = _secret_path(name, env)
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.append(ConfigProblem(file, line, where, f"cannot read {path}: {exc.strerror or type(exc).__name__}"))
        return None
    except UnicodeDecodeError:
        problems.append(ConfigProblem(file, line, where, f"{path} is not UTF-8 text"))
        return None
    if not value:
        problems.append(ConfigProblem(file, line, where, f"{path} is empty"))
        return None
    return value


def _apply_secret_files(s: Settings, env: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    """``*_file`` settings: the secret read from a file (a container's secret, a systemd credential)."""
    def read(key: str) -> str | None:
        section, _, name = key.partition(".")
        file_name = getattr(getattr(s, section), name)
        return _read_secret(file_name, env, *s.origin(key), problems) if file_name else None

    for key, target in (("ehr.fhir_token_file", "fhir_token"), ("ehr.fhir_password_file", "fhir_password")):
        value = read(key)
        if value is None:
            continue
        if getattr(s.ehr, target):
            problems.append(s.problem(key, f"give ehr.{target} or {key}, not both"))
        setattr(s.ehr, target, value)
    url = read("database.url_file")
    if url is not None:
        if s.database.url:
            problems.append(s.problem("database.url_file", "give database.url or database.url_file, not both"))
        s.database.url = url  # problems with it name where url_file was set
        if "database.url_file" in s.from_environment:
            s.from_environment["database.url"] = s.from_environment["database.url_file"]
        else:
            s.from_environment.pop("database.url", None)
            s.key_lines["database.url"] = s.key_lines.get("database.url_file", 0)
    parsed = None
    if s.database.url:
        try:
            parsed = make_url(s.database.url)
        except ArgumentError:  # never echo it: it may hold a password
            problems.append(s.problem("database.url", "not a database URL (an SQLAlchemy URL such as "
                                      "postgresql+psycopg://user@host/db)"))
            return
    password = read("database.password_file")
    if password is None:
        return
    if parsed is None or parsed.get_backend_name() == "sqlite":
        problems.append(s.problem("database.password_file", "a password needs database.url of a database server"))
    elif parsed.password:
        problems.append(s.problem("database.password_file", "the database URL has a password already"))
    else:
        s.database.url = parsed.set(password=password).render_as_string(hide_password=False)


def _check_ehr(settings: Settings, problems: list[ConfigProblem]) -> None:
    where = settings.source or "environment"
    ehr = settings.ehr
    if ehr.mllp:
        host, colon, port = ehr.mllp.rpartition(":")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            problems.append(ConfigProblem(where, 0, "ehr.mllp", f"{ehr.mllp!r} is not host:port"))
    for key in ("fhir_base", "dicomweb_base"):
        url = getattr(ehr, key)
        if url and not url.startswith(("http://", "https://")):
            problems.append(settings.problem(f"ehr.{key}", f"{redact_url(url)!r} is not an http(s):// URL"))
    if (ehr.mllp_cert_file or ehr.mllp_ca_file) and not ehr.mllp_tls:
        problems.append(settings.problem("ehr.mllp_tls", "mllp_ca_file or mllp_cert_file is set, mllp_tls is not"))
    if bool(ehr.mllp_cert_file) != bool(ehr.mllp_key_file):
        problems.append(settings.problem("ehr.mllp_key_file", "mllp_cert_file and mllp_key_file go together"))
    if ehr.fhir_token and ehr.fhir_username:
        problems.append(ConfigProblem(where, 0, "ehr.fhir_token", "give a bearer token or a username, not both"))
    public = settings.http.public_base_url
    if public and not public.startswith(("http://", "https://")):
        problems.append(settings.problem("http.public_base_url", f"{redact_url(public)!r} is not an http(s):// URL"))
    if urlsplit_password(public):
        problems.append(settings.problem("http.public_base_url", "it holds a password, and it is published in every "
                                         "ImagingStudy.endpoint and ORU: give the URL without one"))
    if urlsplit_password(ehr.dicomweb_base):
        problems.append(settings.problem("ehr.dicomweb_base", "it holds a password, and it is published in every "
                                         "ImagingStudy.endpoint and ORU: give the URL without one"))
    if urlsplit_password(ehr.fhir_base) and (ehr.fhir_token or ehr.fhir_username):
        problems.append(settings.problem("ehr.fhir_base", "it holds a user and password: give no fhir_token or "
                                         "fhir_username besides"))


def http_tls_source(settings: Settings) -> TLSSource:
    """Where [http.tls] is written (file and the line of each key), for problems about it."""
    lines = settings.lines_of("http.tls")
    return TLSSource(settings.source or "environment", lines.get("", 0), lines, prefix="http.tls")


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (when it exists, or when named explicitly) and apply the environment."""
    env = os.environ if env is None else env
    settings = Settings()
    problems: list[ConfigProblem] = []
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    if path.exists():
        text = path.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message ends with "(at line N, column M)"
            msg = str(exc)
            line = 0
            if "line " in msg:
                try:
                    line = int(msg.rsplit("line ", 1)[1].split(",")[0].split(")")[0])
                except ValueError:
                    line = 0
            raise ConfigFileError([ConfigProblem(str(path), line, "", f"TOML syntax: {msg}")]) from None
        _fill(settings, data, "", str(path), problems)
        settings.source = str(path)
        settings.key_lines = toml_key_lines(text)
    elif explicit:
        raise ConfigFileError([ConfigProblem(str(path), 0, "", "config file not found")])
    _apply_env(settings, env, problems)
    _apply_secret_files(settings, env, problems)
    if settings.database.writer not in ("auto", "inline", "thread"):
        problems.append(ConfigProblem(settings.source or "environment", 0, "database.writer",
                                      "must be auto, inline or thread"))
    if not settings.database.lease_seconds >= 1:
        problems.append(ConfigProblem(settings.source or "environment", 0, "database.lease_seconds",
                                      "must be at least 1 (seconds)"))
    for entry in settings.dicom.destinations:
        name, eq, addr = entry.partition("=")
        host, colon, port = addr.strip().removeprefix("tls://").rpartition(":")
        if not (eq and colon and name.strip() and host.strip() and port.strip().isdigit() and len(name.strip()) <= 16):
            problems.append(ConfigProblem(settings.source or "environment", 0, "dicom.destinations",
                                          f"{entry!r} is not AET=host:port (or AET=tls://host:port)"))
    _check_ehr(settings, problems)
    for key in ("mllp.max_connections", "mllp.max_buffered_bytes", "http.header_timeout_seconds",
                "http.body_timeout_seconds", "http.max_connections", "http.console_session_hours",
                "http.stow_max_bytes"):
        section, _, name = key.partition(".")
        if getattr(getattr(settings, section), name) <= 0:
            problems.append(ConfigProblem(settings.source or "environment", 0, key, "must be greater than 0"))
    problems.extend(check_consistency(settings.http.tls, http_tls_source(settings)))
    if settings.http.tls.bind_ae_title:
        problems.append(ConfigProblem(settings.source or "environment", 0, "http.tls.bind_ae_title",
                                      "is for DICOM channels' tls: blocks only"))
    cleanup = settings.storage.cleanup
    for key in ("max_age_days", "max_storage_mb", "low_watermark_mb", "min_free_mb"):
        if getattr(cleanup, key) < 0:
            problems.append(ConfigProblem(settings.source or "environment", 0, f"storage.cleanup.{key}",
                                          "must be 0 (off) or more"))
    if cleanup.max_storage_mb and cleanup.low_watermark_mb > cleanup.max_storage_mb:
        problems.append(ConfigProblem(settings.source or "environment", 0, "storage.cleanup.low_watermark_mb",
                                      "must not be above max_storage_mb (the high watermark)"))
    if cleanup.interval_seconds <= 0 or cleanup.batch_size <= 0:
        problems.append(ConfigProblem(settings.source or "environment", 0, "storage.cleanup.interval_seconds"
                                      if cleanup.interval_seconds <= 0 else "storage.cleanup.batch_size",
                                      "must be greater than 0"))
    if settings.http.auth not in ("token", "none"):
        problems.append(ConfigProblem(settings.source or "environment", 0, "http.auth", "must be token or none"))
    if problems:
        # the checks above name the file; give each its line where the key is in it
        raise ConfigFileError([replace(p, line=settings.key_lines.get(p.field, 0))
                               if p.file == settings.source and not p.line else p for p in problems])
    return settings
