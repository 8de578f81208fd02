"""Engine settings: config/radbridge.toml, overridden by environment variables.

Every setting can be overridden as ``RADBRIDGE_<SECTION>_<KEY>`` (``RADBRIDGE_<KEY>`` for top-level
keys), e.g. ``RADBRIDGE_DATABASE_URL``, ``RADBRIDGE_MLLP_PORT``, ``RADBRIDGE_HTTP_PORT``. Two more
names from the interface contract: ``RADBRIDGE_STABLE_SECONDS`` (= dicom.stable_seconds) and
``RADBRIDGE_API_TOKEN`` (a bearer token accepted in addition to http.tokens).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from engine.tls import TLSSettings, TLSSource, check_consistency, toml_key_lines
from engine.yamlfile import ConfigFileError, ConfigProblem

DEFAULT_CONFIG = Path("config/radbridge.toml")


@dataclass
class DatabaseSettings:
    url: str = ""  # empty: sqlite under storage.dir
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
class StorageSettings:
    dir: str = "var"


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
    tls: TLSSettings = field(default_factory=TLSSettings)  # [http.tls]: cert given = HTTPS (docs/security.md)


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
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    mllp: MLLPSettings = field(default_factory=MLLPSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    ehr: EHRSettings = field(default_factory=EHRSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    mappings: MappingSettings = field(default_factory=MappingSettings)
    source: str = ""  # the file it came from

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{Path(self.storage.dir) / 'radbridge.db'}"

    def api_tokens(self) -> list[str]:
        return list(self.http.tokens)


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
        raise ConfigFileError([ConfigProblem(file, 0, where, f"expected {name}, got {value!r}")]) from None
    return value


def _fill(obj: Any, data: Mapping[str, Any], prefix: str, file: str, problems: list[ConfigProblem]) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)} - {"source"}
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


def _apply_env_to(obj: Any, prefix: str, env: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        if f.name == "source":
            continue
        value = getattr(obj, f.name)
        var = f"{prefix}_{f.name}".upper()
        if is_dataclass(value):
            _apply_env_to(value, var, env, problems)  # RADBRIDGE_HTTP_TLS_CERT
        elif var in env:
            try:
                setattr(obj, f.name, _coerce(env[var], hints[f.name], var, "environment"))
            except ConfigFileError as exc:
                problems.extend(exc.problems)


def _apply_env(s: Settings, env: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    _apply_env_to(s, "RADBRIDGE", env, problems)
    if "RADBRIDGE_STABLE_SECONDS" in env:
        try:
            s.dicom.stable_seconds = float(env["RADBRIDGE_STABLE_SECONDS"])
        except ValueError:
            problems.append(ConfigProblem("environment", 0, "RADBRIDGE_STABLE_SECONDS", "expected a number"))
    if env.get("RADBRIDGE_API_TOKEN"):
        s.http.tokens = [*s.http.tokens, env["RADBRIDGE_API_TOKEN"]]


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
            problems.append(ConfigProblem(where, 0, f"ehr.{key}", f"{url!r} is not an http(s):// URL"))
    if (ehr.mllp_cert_file or ehr.mllp_ca_file) and not ehr.mllp_tls:
        problems.append(ConfigProblem(where, 0, "ehr.mllp_tls", "mllp_ca_file or mllp_cert_file is set, mllp_tls is not"))
    if bool(ehr.mllp_cert_file) != bool(ehr.mllp_key_file):
        problems.append(ConfigProblem(where, 0, "ehr.mllp_key_file", "mllp_cert_file and mllp_key_file go together"))
    if ehr.fhir_token and ehr.fhir_username:
        problems.append(ConfigProblem(where, 0, "ehr.fhir_token", "give a bearer token or a username, not both"))


def http_tls_source(settings: Settings) -> TLSSource:
    """Where [http.tls] is written (file and the line of each key), for problems about it."""
    lines = toml_key_lines(settings.source, "http.tls")
    if not lines:
        lines = {k[len("tls."):]: n for k, n in toml_key_lines(settings.source, "http").items() if k.startswith("tls.")}
    return TLSSource(settings.source or "environment", lines.get("", 0), lines, prefix="http.tls")


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (when it exists, or when named explicitly) and apply the environment."""
    env = os.environ if env is None else env
    settings = Settings()
    problems: list[ConfigProblem] = []
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
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
    elif explicit:
        raise ConfigFileError([ConfigProblem(str(path), 0, "", "config file not found")])
    _apply_env(settings, env, problems)
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
                "http.body_timeout_seconds", "http.max_connections"):
        section, _, name = key.partition(".")
        if getattr(getattr(settings, section), name) <= 0:
            problems.append(ConfigProblem(settings.source or "environment", 0, key, "must be greater than 0"))
    problems.extend(check_consistency(settings.http.tls, http_tls_source(settings)))
    if settings.http.tls.bind_ae_title:
        problems.append(ConfigProblem(settings.source or "environment", 0, "http.tls.bind_ae_title",
                                      "is for DICOM channels' tls: blocks only"))
    if settings.http.auth not in ("token", "none"):
        problems.append(ConfigProblem(settings.source or "environment", 0, "http.auth", "must be token or none"))
    if problems:
        raise ConfigFileError(problems)
    return settings
