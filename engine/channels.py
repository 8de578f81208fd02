"""Channel definitions (channels/*.yaml): a connector, the messages it takes, and how each is mapped.

    name: hl7-inbound
    connector: {type: mllp, port: 2575}
    routes:
      - messages: [ADT^A01, ADT^A04]
        action: patient.upsert
        mappings: [hl7-patient]
      - messages: ["ADT^*"]
        action: ignore        # ACK and keep, do not apply (A02 transfers and the like)

Routes are tried in order; the first whose pattern matches MSH-9 wins. A message no route takes is
rejected with AR (200 unsupported message type, or 201 unsupported event).
"""

from __future__ import annotations

import codecs
import fnmatch
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from engine.tls import TLSSettings, parse_tls_block
from engine.yamlfile import ConfigFileError, ConfigProblem, LineDict, LineList, load_yaml

ACTIONS = {
    "patient.upsert": "create or update the patient (A01, A04, A05, A28)",
    "patient.update": "update the patient; create it when unknown if update_creates_patient (A08, A31)",
    "patient.merge": "merge MRG-1 into PID-3, keeping the old identifier as an alias (A40, A34, A18)",
    "order": "create, update or cancel the imaging order by ORC-1 (ORM^O01, OMI^O23)",
    "ignore": "store and ACK, apply nothing",
}
# what a fhir channel's routes take (messages: resource types) and the actions that apply to them
FHIR_ROUTE_RESOURCES = ("Patient", "ServiceRequest")
FHIR_ACTIONS = {"Patient": ("patient.upsert", "patient.update"), "ServiceRequest": ("order",)}
OUTBOUND_EVENTS = {
    "study.reconciled": "a stable study was placed with its order/patient (first time, or stable again after growing)",
    "study.corrected": "a placed study changed later: coerced again after an A08 or merge, or re-matched",
    "report.received": "a placed study holds a report (DICOM SR or encapsulated PDF) not sent before",
}
DESTINATION_TYPES = ("fhir", "mllp")
# deliveries.mapping of a dicom-forward delivery: no message is built, the stored instances are sent
# (with their reconciled headers) by C-STORE; docs/forwarding.md
FORWARD_MAPPING = "dicom-forward"
# when a dicom-forward route sends (its ``when:``); docs/forwarding.md
FORWARD_EVENTS = {
    "instance.received": "each new instance, as it is stored (sent alone, before the study is reconciled)",
    "study.stable": "a study had no new instance for [dicom] stable_seconds (sent as received)",
    "study.reconciled": "a stable study was placed with its order/patient (sent with the reconciled headers)",
    "study.corrected": "a placed study was coerced again (A08, merge, re-match): the corrected instances again",
}
FORWARD_DESTINATION_KEYS = ("aet", "host", "port", "calling_aet", "tls", "timeout_seconds", "max_attempts",
                            "backoff_initial_seconds", "backoff_max_seconds", "storage_commitment",
                            "commitment_timeout_seconds")
FORWARD_FILTER_KEYS = ("modality", "calling_aet", "accession", "reconciliation")
# the reconciliation states a filter may name (engine/store/states.py ReconState; not imported: core)
FORWARD_RECON_STATES = ("pending", "reconciled", "flagged", "unmatched", "quarantined")
DUPLICATE_POLICIES = ("ignore", "overwrite", "reject")
RECONCILIATION_POLICIES = ("coerce", "flag", "reject", "off")


class RoutesKind(StrEnum):
    """What a connector type's channel file says under ``routes:``."""

    MESSAGES = "messages"  # inbound routes: messages -> action -> mappings (mllp, file, fhir)
    OUTBOUND = "outbound"  # outbound routes: events -> destination with a mapping
    NONE = "none"  # no routes (dicom: every accepted instance is stored)
    FORWARD = "forward"  # forward routes: when (events) + filter -> a DICOM destination (dicom-forward)


@dataclass(frozen=True)
class ConnectorSpec:
    """How a channel file of one connector type reads: the part of a connector class that the
    channel parser needs (engine/connectors/ registers one per type; the parser takes them as an
    argument, so this module knows no connector by name)."""

    name: str
    options_type: type[Any]  # the dataclass that options: fills (checked key by key, with lines)
    connector_keys: tuple[str, ...] = ("type",)  # keys allowed under connector:
    routes: RoutesKind = RoutesKind.MESSAGES
    route_resources: tuple[str, ...] = ()  # MESSAGES routes of resources (fhir) instead of HL7 types
    check_options: Callable[[Any, Any, str, int, list[ConfigProblem]], None] | None = None
    # checks the keys under connector: beyond type, port and aet (required ones, their values):
    # (the connector mapping, file, line of connector:, problems)
    check_connector: Callable[[Any, str, int, list[ConfigProblem]], None] | None = None
    tls_keys: tuple[str, ...] = ()  # the keys its tls: block takes (engine/tls.py); empty: no tls: block


@dataclass
class DomainOptions:
    """How a channel's messages apply to patients and orders: shared by HL7 (mllp) and FHIR channels."""

    update_creates_patient: bool = True  # an update (A08/A31, FHIR update) for an unknown patient creates it
    orders_update_patient: bool = False  # IHE: ADT owns demographics; an order's patient only creates unknown ones
    ignore_stale_updates: bool = True  # older than the last change applied (EVN-2, meta.lastUpdated): no change


@dataclass
class ChannelOptions(DomainOptions):
    dedup_window_seconds: float = 3600.0  # same MSH-10 from the same sender within this: re-ACK, not re-apply
    max_message_bytes: int = 10 * 1024 * 1024
    idle_timeout_seconds: float = 120.0  # a connection that sends nothing for this long is closed
    default_charset: str = "utf-8"  # when MSH-18 is empty
    fallback_charset: str = "cp1252"  # when the default does not decode ('' to reject instead)
    processing_ids: list[str] = field(default_factory=lambda: ["P", "T", "D"])
    versions: list[str] = field(default_factory=lambda: ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1",
                                                         "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"])


@dataclass
class FhirOptions(DomainOptions):
    """Options of the FHIR channel (connector type fhir, served at /fhir/ on the HTTP port); docs/fhir.md."""

    max_body_bytes: int = 5 * 1024 * 1024  # a larger request body is refused with 413
    max_bundle_entries: int = 1000  # a transaction or batch with more entries is refused with 413
    default_page_size: int = 50  # search results per page (_count)
    max_page_size: int = 500
    imagingstudy_mapping: str = "fhir-imagingstudy"  # how ImagingStudy reads look (the outbound mapping)
    audit_reads: bool = True  # every read or search of PHI is recorded (GET /api/audit)


@dataclass
class DicomOptions:
    """Options of a DICOM channel (connector type dicom); see docs/dicom.md."""

    # the same SOP Instance UID again: ignore (keep the stored file, report success), overwrite
    # (replace it), reject (refuse it with 0111 unless it is byte-identical to the stored one)
    duplicates: str = "ignore"
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: any calling AE title
    # calling AE title -> the addresses / networks (CIDR) it may call from; when set, a title not
    # listed, or calling from another address, is refused (A-ASSOCIATE-RJ, calling AE not recognized)
    calling_ae_hosts: dict[str, list[str]] = field(default_factory=dict)
    require_called_aet: bool = True  # refuse associations addressed to another AE title
    max_associations: int = 32
    min_free_mb: int = 512  # refuse C-STORE (A700 out of resources) when storage has less free space
    acse_timeout_seconds: float = 30.0
    # a connection that sends no A-ASSOCIATE-RQ within this is closed (it holds an association slot)
    association_request_timeout_seconds: float = 10.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 120.0  # an association idle this long is aborted
    max_pdu_bytes: int = 0  # largest PDU we accept; 0: no limit (fewer, larger PDUs are faster)
    worklist_statuses: list[str] = field(default_factory=lambda: ["SC", "IP"])  # order statuses on the MWL
    worklist_max_results: int = 500
    query_max_results: int = 1000
    names_case_insensitive: bool = True  # C-FIND matching of person names ignores case
    # what a stable study's header mismatches with its order/patient lead to (docs/reconciliation.md):
    # coerce (rewrite the stored headers), flag (keep, record findings), reject (quarantine), off
    reconciliation: str = "coerce"
    reconciliation_rules: str = "reconciliation"  # a mappings/ file with source: reconciliation; "" built in


@dataclass
class OutboundOptions:
    """An outbound channel's settings live on its destinations; options: takes nothing yet."""


MAX_IN_FLIGHT = 16  # MLLP connections a destination may have open at once


@dataclass
class Destination:
    """Where an outbound channel sends (the address comes from [ehr] in config) and its retry rule."""

    name: str
    type: str  # fhir | mllp
    max_attempts: int = 12  # then the delivery is dead-lettered (radbridge deliveries retry)
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 600.0
    timeout_seconds: float = 30.0  # connect + answer (HTTP response, MLLP ACK)
    concurrency: int = 4  # FHIR: requests in flight at once
    # MLLP: messages in flight at once, each on its own connection waiting for its ACK (always for
    # different patients: a batch holds one delivery per patient); 1 sends one at a time
    in_flight: int = 1
    retry_codes: list[str] = field(default_factory=lambda: ["AR", "CR"])  # MLLP: NAK codes worth retrying
    # 401/403 too: an expired token is fixed in config, and nothing should be dead-lettered meanwhile
    retry_statuses: list[int] = field(default_factory=lambda: [401, 403, 408, 425, 429, 500, 502, 503, 504])
    resolve_references: bool = True  # FHIR: turn Patient?identifier=... into Patient/id by a search
    reference_cache_seconds: float = 300.0  # FHIR: how long a found reference is remembered
    line: int = 0


@dataclass
class ForwardTLS:
    """DICOM TLS to a forward destination: its certificate must chain to ``ca`` ('' : the system's CAs)
    and name its host; ``cert``/``key``: our client certificate when it asks for one."""

    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class ForwardDestination(Destination):
    """A PACS or VNA a dicom-forward channel sends to by C-STORE (one association per delivery)."""

    type: str = "dicom"
    aet: str = ""  # the destination's (called) AE title
    host: str = ""
    port: int = 0
    calling_aet: str = ""  # ours; '' : [dicom] aet
    tls: ForwardTLS | None = None  # None: plain TCP
    timeout_seconds: float = 60.0  # connect, association, and each C-STORE response
    concurrency: int = 1  # one association at a time (per-study order)
    # ask the destination to commit (Storage Commitment, N-ACTION): delivered only when it has reported
    # every instance committed; asked again when no report came within commitment_timeout_seconds
    storage_commitment: bool = False
    commitment_timeout_seconds: float = 600.0

    @property
    def address(self) -> str:
        """How logs and /api/channels name it: AET@host:port (tls:// when TLS)."""
        return f"{self.aet}@{'tls://' if self.tls is not None else ''}{self.host}:{self.port}"


@dataclass
class ForwardFilter:
    """Which studies (instances) a forward route takes; an empty field takes any."""

    modality: list[str] = field(default_factory=list)  # any of the study's modalities (the instance's series)
    calling_aet: list[str] = field(default_factory=list)  # any AE title that sent the study's instances
    accession: str = ""  # a pattern with * and ?, matched against the study's accession number
    reconciliation: list[str] = field(default_factory=list)  # the study's reconciliation state (ReconState)

    def __bool__(self) -> bool:
        return bool(self.modality or self.calling_aet or self.accession or self.reconciliation)

    def takes(self, *, modalities: set[str], calling_aets: set[str] | None, accession: str | None,
              reconciliation: str | None) -> bool:
        """Whether a study (instance) with these attributes passes. ``calling_aets`` None: not looked up
        (no calling_aet filter)."""
        if self.modality and not modalities & set(self.modality):
            return False
        if self.calling_aet and not (calling_aets or set()) & set(self.calling_aet):
            return False
        if self.accession and not fnmatch.fnmatchcase(accession or "", self.accession):
            return False
        return not (self.reconciliation and (reconciliation or "") not in self.reconciliation)


@dataclass
class ForwardRoute:
    when: list[str]  # FORWARD_EVENTS
    to: str  # a destination name
    filter: ForwardFilter = field(default_factory=ForwardFilter)
    enabled: bool = True
    line: int = 0


@dataclass
class OutboundRoute:
    events: list[str]
    to: str  # a destination name
    mapping: str
    enabled: bool = True
    line: int = 0


@dataclass
class Route:
    messages: list[str]
    action: str
    mappings: list[str]
    line: int = 0

    def matches(self, message_type: str) -> bool:
        return any(fnmatch.fnmatchcase(message_type, p) for p in self.messages)

    def matches_code(self, code: str) -> bool:
        return any(fnmatch.fnmatchcase(code, p.split("^", 1)[0]) for p in self.messages)


@dataclass
class Channel:
    name: str
    file: str
    connector: str
    port: int | None
    routes: list[Route]
    options: ChannelOptions = field(default_factory=ChannelOptions)  # channels that take HL7 v2 (mllp, file)
    enabled: bool = True
    fhir: FhirOptions = field(default_factory=FhirOptions)  # the fhir channel
    description: str = ""
    aet: str | None = None  # DICOM channels: the called AE title (default dicom.aet)
    dicom: DicomOptions = field(default_factory=DicomOptions)
    destinations: dict[str, Destination] = field(default_factory=dict)  # outbound channels
    outbound_routes: list[OutboundRoute] = field(default_factory=list)
    forward_routes: list[ForwardRoute] = field(default_factory=list)  # dicom-forward channels
    extra: Any = None  # the options of a connector type that has a dataclass of its own (not HL7, DICOM, FHIR)
    connector_args: dict[str, Any] = field(default_factory=dict)  # connector: keys beyond type, port, aet
    connector_line: int = 0  # the line of connector: in the file (problems about the listener name it)
    tls: TLSSettings | None = None  # its tls: block; None: the listener speaks plain TCP
    tls_line: int = 0  # the line of tls: in its file
    tls_key_lines: dict[str, int] = field(default_factory=dict)  # the line of each key of tls:

    def set_options(self, opts: Any) -> None:
        """Keep parsed options where the code that reads them looks (the HL7, DICOM or FHIR ones)."""
        if isinstance(opts, ChannelOptions):
            self.options = opts
        elif isinstance(opts, DicomOptions):
            self.dicom = opts
        elif isinstance(opts, FhirOptions):
            self.fhir = opts
        else:
            self.extra = opts

    def route_for(self, message_type: str) -> Route | None:
        for r in self.routes:
            if r.matches(message_type):
                return r
        return None

    def knows_code(self, code: str) -> bool:
        return any(r.matches_code(code) for r in self.routes)


def _line(raw: Any, key: str, default: int) -> int:
    return raw.line_of(key) if isinstance(raw, LineDict) and key in raw else default


def parse_options(raw: Any, file: str, line: int, problems: list[ConfigProblem], cls: type[Any]) -> Any:
    """Fill the options dataclass ``cls`` from ``options:``, key by key: an unknown key or a value of
    the wrong type is a problem at its own line, and the default stays."""
    opts = cls()
    if raw is None:
        return opts
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(file, line, "options", "options must be a mapping"))
        return opts
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key, value in raw.items():
        kline = _line(raw, key, line)
        if key not in names:
            problems.append(ConfigProblem(file, kline, f"options.{key}",
                                          f"unknown option; expected one of {', '.join(sorted(names))}"))
            continue
        typ = hints[key]
        ok = True
        if typ is bool:
            ok = isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            value = float(value) if ok else value
        elif typ is str:
            ok = isinstance(value, str)
        elif get_origin(typ) is dict:  # its entries are checked by the connector type's check_options
            ok = isinstance(value, dict)
            value = {str(k): v for k, v in value.items()} if ok else value
        else:
            ok = isinstance(value, list)
            value = [str(v) for v in value] if ok else value
        if not ok:
            problems.append(ConfigProblem(file, kline, f"options.{key}", f"expected {getattr(typ, '__name__', typ)}, "
                                          f"got {value!r}"))
            continue
        setattr(opts, key, value)
    return opts


def check_positive(opts: Any, raw: Any, file: str, line: int, problems: list[ConfigProblem],
                   keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(opts, key) <= 0:
            problems.append(ConfigProblem(file, _line(raw, key, line), f"options.{key}", "must be greater than 0"))


def check_hl7_options(opts: ChannelOptions, raw: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    """What every channel that takes HL7 v2 (mllp, file) checks beyond types."""
    check_positive(opts, raw, file, line, problems, ("idle_timeout_seconds", "max_message_bytes"))
    for key in ("default_charset", "fallback_charset"):
        name = getattr(opts, key)
        if name:
            try:
                codecs.lookup(name)
            except LookupError:
                problems.append(ConfigProblem(file, _line(raw, key, line), f"options.{key}",
                                              f"unknown character set {name!r}"))


def check_fhir_options(opts: FhirOptions, raw: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    check_positive(opts, raw, file, line, problems,
                   ("max_body_bytes", "max_bundle_entries", "default_page_size", "max_page_size"))


def check_dicom_options(opts: DicomOptions, raw: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    if opts.duplicates not in DUPLICATE_POLICIES:
        problems.append(ConfigProblem(file, _line(raw, "duplicates", line), "options.duplicates",
                                      f"must be one of {', '.join(DUPLICATE_POLICIES)}, got {opts.duplicates!r}"))
    if opts.reconciliation not in RECONCILIATION_POLICIES:
        problems.append(ConfigProblem(file, _line(raw, "reconciliation", line), "options.reconciliation",
                                      f"must be one of {', '.join(RECONCILIATION_POLICIES)}, "
                                      f"got {opts.reconciliation!r}"))
    check_positive(opts, raw, file, line, problems, ("max_associations", "worklist_max_results", "query_max_results",
                                                     "association_request_timeout_seconds"))
    for aet in opts.allowed_calling_aets:
        if not aet.strip() or len(aet) > 16:
            problems.append(ConfigProblem(file, _line(raw, "allowed_calling_aets", line), "options.allowed_calling_aets",
                                          f"{aet!r} is not an AE title (1 to 16 characters)"))
    _check_calling_ae_hosts(opts, raw, file, line, problems)


def _check_calling_ae_hosts(opts: DicomOptions, raw: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    """Each entry of calling_ae_hosts: an AE title and a list of IP addresses or networks. Host names
    are refused: what a name resolves to can change (or be made to)."""
    hosts_raw = raw.get("calling_ae_hosts") if isinstance(raw, dict) else None
    checked: dict[str, list[str]] = {}
    for aet, addresses in opts.calling_ae_hosts.items():
        aline = _line(hosts_raw, aet, _line(raw, "calling_ae_hosts", line))
        if not aet.strip() or len(aet) > 16:
            problems.append(ConfigProblem(file, aline, "options.calling_ae_hosts",
                                          f"{aet!r} is not an AE title (1 to 16 characters)"))
        if not isinstance(addresses, list) or not addresses:
            problems.append(ConfigProblem(file, aline, f"options.calling_ae_hosts.{aet}",
                                          "a list of addresses or networks, e.g. [10.0.0.5, 10.1.0.0/24]"))
            continue
        for address in addresses:
            try:
                ipaddress.ip_network(str(address), strict=False)
            except ValueError:
                problems.append(ConfigProblem(file, aline, f"options.calling_ae_hosts.{aet}",
                                              f"{address!r} is not an IP address or network (host names are not "
                                              "taken: what a name resolves to can change)"))
        checked[aet.strip()] = [str(a) for a in addresses]
    opts.calling_ae_hosts = checked


def parse_channel(data: Any, file: str, types: Mapping[str, ConnectorSpec],
                  known_mappings: set[str] | None = None) -> tuple[Channel | None, list[ConfigProblem]]:
    """One channel file, read by the spec of its connector type (``types``: the registered ones)."""
    problems: list[ConfigProblem] = []

    def problem(line: int, fld: str, msg: str) -> None:
        problems.append(ConfigProblem(file, line, fld, msg))

    if not isinstance(data, dict):
        problem(1, "", "a channel file is a YAML mapping with name:, connector: and routes:")
        return None, problems
    line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
    for key in data:
        if key not in ("name", "description", "enabled", "connector", "routes", "options", "destinations", "tls"):
            problem(line_of(key), str(key),
                    "unknown key; expected name, description, enabled, connector, routes, options, destinations, tls")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problem(line_of("name") or 1, "name", "every channel needs a name")
        name = Path(file).stem
    conn = data.get("connector")
    spec: ConnectorSpec | None = None
    ctype, port, aet = None, None, None
    connector_args: dict[str, Any] = {}
    if not isinstance(conn, dict):
        problem(line_of("connector") or 1, "connector", "connector: {type: mllp, port: 2575} is required")
    else:
        ctype = conn.get("type")
        spec = types.get(ctype) if isinstance(ctype, str) else None
        if spec is None:
            problem(_line(conn, "type", 0), "connector.type",
                    f"unknown connector type {ctype!r}; expected one of {', '.join(types)}")
        allowed = spec.connector_keys if spec is not None else tuple(conn)
        port = conn.get("port")
        if "port" in allowed and port is not None and (not isinstance(port, int) or not 0 <= port < 65536):
            problem(_line(conn, "port", 0), "connector.port", f"port must be a number from 0 to 65535, got {port!r}")
            port = None
        aet = conn.get("aet")
        if "aet" in allowed and aet is not None and (not isinstance(aet, str) or not 0 < len(aet.strip()) <= 16):
            problem(_line(conn, "aet", 0), "connector.aet", "aet is an AE title of 1 to 16 characters")
            aet = None
        for key in conn:
            if key not in allowed:
                problem(_line(conn, key, 0), f"connector.{key}", f"unknown key; expected {', '.join(allowed)}")
            elif key not in ("type", "port", "aet"):
                connector_args[key] = conn[key]
        if spec is not None and spec.check_connector is not None:
            spec.check_connector(conn, file, line_of("connector") or 1, problems)
    routes: list[Route] = []
    raw_routes = data.get("routes")
    destinations: dict[str, Destination] = {}
    outbound: list[OutboundRoute] = []
    forward: list[ForwardRoute] = []
    routes_kind = spec.routes if spec is not None else RoutesKind.MESSAGES
    if routes_kind is RoutesKind.OUTBOUND:
        destinations, outbound = _parse_outbound(data, file, known_mappings, problem)
        raw_routes = []
    elif routes_kind is RoutesKind.FORWARD:
        forward_destinations, forward = _parse_forward(data, problem)
        destinations = dict(forward_destinations)
        raw_routes = []
    elif "destinations" in data:
        problem(line_of("destinations"), "destinations", "only outbound and dicom-forward channels have destinations")
    if routes_kind is RoutesKind.NONE:
        if raw_routes is not None:
            problem(line_of("routes"), "routes", f"{ctype} channels have no routes; use options")
        raw_routes = []
    elif routes_kind is RoutesKind.MESSAGES and (not isinstance(raw_routes, list) or not raw_routes):
        problem(line_of("routes") or 1, "routes", "routes: must list at least one route")
        raw_routes = []
    resources = spec.route_resources if spec is not None else ()
    for i, r in enumerate(raw_routes or []):
        route = _parse_route(r, i, raw_routes, resources, known_mappings, problem)
        if route is not None:
            routes.append(route)
    opts_type = spec.options_type if spec is not None else ChannelOptions
    opts = parse_options(data.get("options"), file, line_of("options"), problems, opts_type)
    check = spec.check_options if spec is not None else check_hl7_options  # unknown type: read as HL7 options
    if check is not None and isinstance(data.get("options"), dict | None):
        check(opts, data.get("options"), file, line_of("options"), problems)
    tls: TLSSettings | None = None
    if "tls" in data and spec is not None:
        if spec.tls_keys:
            tls = parse_tls_block(data["tls"], file, line_of("tls"), problems, keys=spec.tls_keys)
        else:
            problem(line_of("tls"), "tls", f"{ctype} channels take no tls: block (HTTPS is [http.tls] in the config)")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        problem(line_of("enabled"), "enabled", "enabled is true or false")
        enabled = True
    channel = Channel(name=str(name), file=file, connector=str(ctype), port=port, routes=routes,
                      enabled=enabled, description=str(data.get("description") or ""),
                      aet=aet.strip() if isinstance(aet, str) else None,
                      destinations=destinations, outbound_routes=outbound, forward_routes=forward,
                      connector_args=connector_args,
                      connector_line=line_of("connector"),
                      tls=tls, tls_line=line_of("tls") if tls is not None else 0,
                      tls_key_lines=dict(getattr(data.get("tls"), "key_lines", {})))
    channel.set_options(opts)
    return (None if problems else channel), problems


def _parse_route(r: Any, i: int, raw_routes: Any, resources: tuple[str, ...], known_mappings: set[str] | None,
                 problem: Callable[[int, str, str], None]) -> Route | None:
    rline = raw_routes.line_of(i) if isinstance(raw_routes, LineList) else 0
    where = f"routes[{i + 1}]"
    if not isinstance(r, dict):
        problem(rline, where, "a route is {messages: [...], action: ..., mappings: [...]}")
        return None
    msgs = r.get("messages")
    if isinstance(msgs, str):
        msgs = [msgs]
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, str) for m in msgs):
        problem(rline, f"{where}.messages", "messages: lists message types like ADT^A08 (wildcards: ADT^*)")
        msgs = []
    action = r.get("action")
    aline = _line(r, "action", rline)
    if action not in ACTIONS:
        problem(aline, f"{where}.action", f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if resources:
        for m in msgs:
            if m not in resources:
                problem(rline, f"{where}.messages", f"{m!r}: this channel takes "
                        f"{', '.join(resources)} (Bundles are split into their entries)")
            elif action in ACTIONS and m in FHIR_ACTIONS and action not in FHIR_ACTIONS[m]:
                problem(aline, f"{where}.action", f"{m} takes action {' or '.join(FHIR_ACTIONS[m])}")
    maps = r.get("mappings", [])
    if isinstance(maps, str):
        maps = [maps]
    if not isinstance(maps, list):
        problem(rline, f"{where}.mappings", "mappings: lists mapping names (files in mappings/ without .yaml)")
        maps = []
    if action not in (None, "ignore") and not maps:
        problem(rline, f"{where}.mappings", f"action {action} needs at least one mapping")
    if known_mappings is not None:
        for m in maps:
            if m not in known_mappings:
                problem(_line(r, "mappings", rline), f"{where}.mappings", f"no mapping named {m!r} in the mappings directory")
    for key in r:
        if key not in ("messages", "action", "mappings"):
            problem(_line(r, key, rline), f"{where}.{key}", "unknown key; expected messages, action, mappings")
    names = msgs if resources else [m.upper() for m in msgs]
    return Route(names, str(action), [str(m) for m in maps], rline)



def _route_mappings(data: Any, problem: Callable[[int, str, str], None], shape: str, keys: tuple[str, ...]
                    ) -> Iterator[tuple[int, str, Any]]:
    """The routes: of an outbound or forward channel, each a mapping (line, "routes[N]", the mapping):
    a missing list, an item that is not a mapping and unknown keys are problems at their lines."""
    line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        problem(line_of("routes") or 1, "routes", f"routes: must list at least one {shape}")
        return
    for i, r in enumerate(raw_routes):
        rline = raw_routes.line_of(i) if isinstance(raw_routes, LineList) else 0
        where = f"routes[{i + 1}]"
        if not isinstance(r, dict):
            problem(rline, where, f"a route is {shape}")
            continue
        for key in r:
            if key not in keys:
                problem(_line(r, key, rline), f"{where}.{key}", f"unknown key; expected {', '.join(keys)}")
        yield rline, where, r

def _destinations_block(data: Any, problem: Callable[[int, str, str], None], needed: str) -> Any:
    """The channel's destinations: mapping (NAME -> body); ``needed`` is said when it is missing or empty."""
    raw = data.get("destinations")
    if not isinstance(raw, dict) or not raw:
        line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
        problem(line_of("destinations") or 1, "destinations", needed)
        return {}
    return raw


def _parse_outbound(data: Any, file: str, known_mappings: set[str] | None, problem: Any
                    ) -> tuple[dict[str, Destination], list[OutboundRoute]]:
    """destinations: {name: {type: fhir|mllp, retry settings}}; routes: [{events, to, mapping}]."""
    destinations: dict[str, Destination] = {}
    raw = _destinations_block(data, problem, "an outbound channel needs destinations: {NAME: {type: fhir|mllp}}")
    hints = get_type_hints(Destination)
    settable = [f.name for f in fields(Destination) if f.name not in ("name", "line")]
    for name, body in raw.items():
        dline = raw.line_of(name) if isinstance(raw, LineDict) else 0
        where = f"destinations.{name}"
        if not isinstance(body, dict):
            problem(dline, where, "a destination is {type: fhir|mllp, max_attempts: N, ...}")
            continue
        dest = Destination(name=str(name), type=str(body.get("type")), line=dline)
        if dest.type not in DESTINATION_TYPES:
            problem(dline, f"{where}.type", f"type must be one of {', '.join(DESTINATION_TYPES)}, got {body.get('type')!r}")
        for key, value in body.items():
            kline = body.line_of(key) if isinstance(body, LineDict) else dline
            if key == "type":
                continue
            if key not in settable:
                problem(kline, f"{where}.{key}", f"unknown key; expected {', '.join(settable)}")
                continue
            typ = hints[key]
            if typ is bool:
                ok = isinstance(value, bool)
            elif typ is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            elif typ is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                value = float(value) if ok else value
            else:  # lists
                ok = isinstance(value, list)
                if ok and key == "retry_statuses":
                    ok = all(isinstance(v, int) and 100 <= v < 600 for v in value)
                elif ok:
                    value = [str(v).upper() for v in value]
            if not ok:
                problem(kline, f"{where}.{key}", f"expected {getattr(typ, '__name__', str(typ))} (positive), got {value!r}")
                continue
            setattr(dest, key, value)
        if dest.backoff_max_seconds < dest.backoff_initial_seconds:
            problem(dline, f"{where}.backoff_max_seconds", "must not be smaller than backoff_initial_seconds")
        if "in_flight" in body and dest.type != "mllp":
            problem(body.line_of("in_flight") if isinstance(body, LineDict) else dline, f"{where}.in_flight",
                    "in_flight is for mllp destinations (fhir: concurrency)")
        elif dest.in_flight > MAX_IN_FLIGHT:
            problem(body.line_of("in_flight") if isinstance(body, LineDict) else dline, f"{where}.in_flight",
                    f"at most {MAX_IN_FLIGHT} (one connection each)")
        destinations[dest.name] = dest
    routes: list[OutboundRoute] = []
    for rline, where, r in _route_mappings(data, problem, "{events: [study.reconciled], to: DESTINATION, mapping: MAPPING}",
                                           ("events", "to", "mapping", "enabled")):
        events = r.get("events")
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not events:
            problem(rline, f"{where}.events", f"events: lists one or more of {', '.join(OUTBOUND_EVENTS)}")
            events = []
        for ev in events:
            if ev not in OUTBOUND_EVENTS:
                problem(rline, f"{where}.events", f"unknown event {ev!r}; expected one of {', '.join(OUTBOUND_EVENTS)}")
        to = r.get("to")
        if to not in destinations:
            problem(r.line_of("to") if isinstance(r, LineDict) and "to" in r else rline, f"{where}.to",
                    f"no destination named {to!r} (destinations: {', '.join(destinations) or 'none'})")
        mapping = r.get("mapping")
        if not isinstance(mapping, str) or not mapping:
            problem(rline, f"{where}.mapping", "mapping: names the outbound mapping file (mappings/NAME.yaml)")
            mapping = ""
        elif known_mappings is not None and mapping not in known_mappings:
            problem(r.line_of("mapping") if isinstance(r, LineDict) else rline, f"{where}.mapping",
                    f"no mapping named {mapping!r} in the mappings directory")
        enabled = r.get("enabled", True)
        if not isinstance(enabled, bool):
            problem(rline, f"{where}.enabled", "enabled is true or false")
            enabled = True
        routes.append(OutboundRoute([str(e) for e in events], str(to), mapping, enabled, rline))
    return destinations, routes


def _ae_title(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value.strip()) <= 16 and "\\" not in value


def _names(value: Any) -> list[str] | None:
    """A list of names (a single name is taken as a list of one); None when it is neither."""
    if isinstance(value, str) and value.strip():
        return [value.strip()]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value]
    return None


def _parse_forward(data: Any, problem: Callable[[int, str, str], None]
                   ) -> tuple[dict[str, ForwardDestination], list[ForwardRoute]]:
    """A dicom-forward channel: destinations: {NAME: {aet, host, port, ...}}; routes: [{when, filter, to}]."""
    line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
    destinations: dict[str, ForwardDestination] = {}
    raw = _destinations_block(data, problem, "a dicom-forward channel needs destinations: "
                                             "{NAME: {aet: PACS, host: HOST, port: 104}}")
    for name, body in raw.items():
        dline = _line(raw, name, line_of("destinations"))
        where = f"destinations.{name}"
        if not isinstance(body, dict):
            problem(dline, where, "a destination is {aet: PACS, host: HOST, port: 104, ...}")
            continue
        dest = ForwardDestination(name=str(name), line=dline)
        for key in ("aet", "host", "port"):
            if key not in body:
                problem(dline, f"{where}.{key}", f"a DICOM destination needs {key}:")
        for key, value in body.items():
            kline = _line(body, key, dline)
            if key not in FORWARD_DESTINATION_KEYS:
                problem(kline, f"{where}.{key}", f"unknown key; expected {', '.join(FORWARD_DESTINATION_KEYS)}")
            elif key in ("aet", "calling_aet"):
                if _ae_title(value):
                    setattr(dest, key, value.strip())
                else:
                    problem(kline, f"{where}.{key}", f"an AE title of 1 to 16 characters, got {value!r}")
            elif key == "host":
                if isinstance(value, str) and value.strip() and "/" not in value and " " not in value.strip():
                    dest.host = value.strip()
                else:
                    problem(kline, f"{where}.host", f"a host name or IP address, got {value!r}")
            elif key == "port":
                if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
                    dest.port = value
                else:
                    problem(kline, f"{where}.port", f"a port number from 1 to 65535, got {value!r}")
            elif key == "tls":
                dest.tls = _parse_forward_tls(value, kline, f"{where}.tls", problem)
            elif key == "storage_commitment":
                if isinstance(value, bool):
                    dest.storage_commitment = value
                else:
                    problem(kline, f"{where}.{key}", "is true or false")
            elif key == "max_attempts":
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    dest.max_attempts = value
                else:
                    problem(kline, f"{where}.{key}", f"expected a whole number greater than 0, got {value!r}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                setattr(dest, key, float(value))
            else:
                problem(kline, f"{where}.{key}", f"expected a number of seconds greater than 0, got {value!r}")
        if dest.backoff_max_seconds < dest.backoff_initial_seconds:
            problem(_line(body, "backoff_max_seconds", dline), f"{where}.backoff_max_seconds",
                    "must not be smaller than backoff_initial_seconds")
        destinations[dest.name] = dest
    routes: list[ForwardRoute] = []
    for rline, where, r in _route_mappings(data, problem, "{when: [study.reconciled], filter: {...}, to: DESTINATION}",
                                           ("when", "filter", "to", "enabled")):
        when = _names(r.get("when"))
        if when is None:
            problem(_line(r, "when", rline), f"{where}.when", f"when: lists one or more of {', '.join(FORWARD_EVENTS)}")
            when = []
        for ev in when:
            if ev not in FORWARD_EVENTS:
                problem(_line(r, "when", rline), f"{where}.when",
                        f"unknown event {ev!r}; expected one of {', '.join(FORWARD_EVENTS)}")
        to = r.get("to")
        if not isinstance(to, str) or to not in destinations:
            problem(_line(r, "to", rline), f"{where}.to",
                    f"no destination named {to!r} (destinations: {', '.join(destinations) or 'none'})")
        enabled = r.get("enabled", True)
        if not isinstance(enabled, bool):
            problem(_line(r, "enabled", rline), f"{where}.enabled", "enabled is true or false")
            enabled = True
        routes.append(ForwardRoute(when, str(to), _parse_forward_filter(r, rline, where, problem), enabled, rline))
    return destinations, routes


def _parse_forward_tls(value: Any, line: int, where: str, problem: Callable[[int, str, str], None]) -> ForwardTLS | None:
    """tls: true (the system's CAs), false, or {ca: FILE, cert: FILE, key: FILE}."""
    if isinstance(value, bool):
        return ForwardTLS() if value else None
    if not isinstance(value, dict):
        problem(line, where, "tls: is true, false or {ca: FILE, cert: FILE, key: FILE}")
        return None
    tls = ForwardTLS()
    for key, file in value.items():
        kline = _line(value, key, line)
        if key not in ("ca", "cert", "key"):
            problem(kline, f"{where}.{key}", "unknown key; expected ca, cert, key")
        elif not isinstance(file, str) or not file:
            problem(kline, f"{where}.{key}", f"expected a file name, got {file!r}")
        else:
            setattr(tls, key, file)
    if bool(tls.cert) != bool(tls.key):
        problem(line, where, "cert and key go together (our client certificate and its key)")
    return tls


def _parse_forward_filter(r: Any, rline: int, where: str, problem: Callable[[int, str, str], None]) -> ForwardFilter:
    raw = r.get("filter")
    out = ForwardFilter()
    if raw is None:
        return out
    fline = _line(r, "filter", rline)
    if not isinstance(raw, dict):
        problem(fline, f"{where}.filter", "filter: is a mapping {modality: [CT], calling_aet: [CT1], accession: "
                                          "\"A*\", reconciliation: [reconciled]}")
        return out
    for key, value in raw.items():
        kline = _line(raw, key, fline)
        field_name = f"{where}.filter.{key}"
        if key not in FORWARD_FILTER_KEYS:
            problem(kline, field_name, f"unknown key; expected {', '.join(FORWARD_FILTER_KEYS)}")
        elif key == "accession":
            if isinstance(value, str) and value:
                out.accession = value
            else:
                problem(kline, field_name, f"a pattern (* and ? as wildcards), got {value!r}")
        else:
            names = _names(value)
            if names is None:
                problem(kline, field_name, f"a list of names, got {value!r}")
            elif key == "modality":
                out.modality = [n.upper() for n in names]
            elif key == "calling_aet":
                bad = [n for n in names if not _ae_title(n)]
                if bad:
                    problem(kline, field_name, f"{bad[0]!r} is not an AE title (1 to 16 characters)")
                out.calling_aet = names
            else:
                bad = [n for n in names if n not in FORWARD_RECON_STATES]
                if bad:
                    problem(kline, field_name, f"unknown reconciliation state {bad[0]!r}; expected "
                                               f"{', '.join(FORWARD_RECON_STATES)}")
                out.reconciliation = names
    return out


def load_channels(directory: Path, types: Mapping[str, ConnectorSpec], known_mappings: set[str] | None = None
                  ) -> tuple[list[Channel], list[ConfigProblem]]:
    """Every channels/*.yaml, each read by its connector type's spec; names are unique."""
    channels: list[Channel] = []
    problems: list[ConfigProblem] = []
    if not directory.is_dir():
        return [], [ConfigProblem(str(directory), 0, "", "channels directory not found")]
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            data = load_yaml(path)
        except ConfigFileError as exc:
            problems.extend(exc.problems)
            continue
        ch, probs = parse_channel(data, str(path), types, known_mappings)
        problems.extend(probs)
        if ch is None:
            continue
        if ch.name in seen:
            problems.append(ConfigProblem(str(path), 1, "name", f"channel name {ch.name!r} is also used by {seen[ch.name]}"))
            continue
        seen[ch.name] = str(path)
        channels.append(ch)
    return channels, problems
