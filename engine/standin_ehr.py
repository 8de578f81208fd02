"""A stand-in EHR (for the tests and `radbridge demo`): an MLLP results inbox and a FHIR R4 server on
loopback ports, in their own thread with their own asyncio event loop, recording everything they receive.

Synchronous tests drive it from the test thread while the engine runs in another thread::

    with StandInEHR(token="ehr-token") as ehr:
        ...  # point the engine at ehr.mllp_address / ehr.fhir_base
        assert ehr.wait_for(lambda: len(ehr.oru_messages()) == 1, timeout=10)

Everything the servers touch lives on the EHR's own thread; lists are only appended to, and the stored
resources are guarded by a lock (``resources`` gives a snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.typedefs import Handler

try:  # fhir.resources >= 7: one lookup function for every R4B model
    from fhir.resources.R4B import get_fhir_model_class as _get_model_class
except ImportError:  # pragma: no cover - older layouts: one module per resource type
    _get_model_class = None  # type: ignore[assignment]

_T = TypeVar("_T")

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
FHIR_JSON = "application/fhir+json"
_ACCEPTED_TYPES = {FHIR_JSON, "application/json"}
_ANSWERS = {"AA", "AE", "AR", "CA", "CE", "CR"}
_TIMEOUT_SLEEP = 30.0
_CALL_TIMEOUT = 10.0

# Required status bindings that the pydantic models do not check (they take any code).
_STATUS_CODES: dict[str, frozenset[str]] = {
    "ImagingStudy": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"}),
    "DiagnosticReport": frozenset({"registered", "partial", "preliminary", "final", "amended", "corrected",
                                   "appended", "cancelled", "entered-in-error", "unknown"}),
    "Observation": frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                              "entered-in-error", "unknown"}),
    "ServiceRequest": frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error",
                                 "unknown"}),
}


def _model_class(resource_type: str) -> Any:
    if _get_model_class is not None:
        return _get_model_class(resource_type)
    import importlib  # pragma: no cover

    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")  # pragma: no cover
    return getattr(module, resource_type)  # pragma: no cover


def validate_resource(resource_type: str, body: Any) -> str | None:
    """None if `body` is a valid R4 resource of `resource_type`, else the reason."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if body.get("resourceType") != resource_type:
        return f"resourceType {body.get('resourceType')!r} does not match the URL type {resource_type!r}"
    try:
        cls = _model_class(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError) as exc:
        return f"unknown resource type {resource_type!r}: {exc}"
    try:
        cls.model_validate(body)
    except Exception as exc:  # pydantic.ValidationError and the model's own checks
        return str(exc)
    allowed = _STATUS_CODES.get(resource_type)
    if allowed is not None and "status" in body and body["status"] not in allowed:
        return f"{resource_type}.status {body['status']!r} is not in the required value set {sorted(allowed)}"
    return None


def _outcome(diagnostics: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def _has_identifier(resource: dict[str, Any], system: str, value: str) -> bool:
    idents = resource.get("identifier") or []
    return any(isinstance(i, dict) and i.get("system") == system and i.get("value") == value for i in idents)


def _token_matches(resource: dict[str, Any], token: str) -> bool:
    """FHIR token search on identifier: 'system|value', '|value' (no system), 'system|' or 'value'."""
    idents = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    if "|" not in token:
        return any(i.get("value") == token for i in idents)
    system, _, value = token.partition("|")
    for i in idents:
        if (i.get("system") or "") != system:
            continue
        if not value or i.get("value") == value:
            return True
    return False


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


async def _settle() -> None:
    """Let connections the loop has accepted but not yet set up finish that first: a server closed in
    between leaves them open and unserved (asyncio refuses to attach them to a closed server)."""
    for _ in range(5):
        await asyncio.sleep(0)


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def split_frames(buf: bytearray) -> list[bytes]:
    """Take every complete MLLP frame out of `buf` (left with the incomplete rest) and return the payloads."""
    payloads: list[bytes] = []
    while buf:
        start = buf.find(VT)
        if start < 0:
            buf.clear()  # bytes outside any frame
            break
        end = buf.find(FS + CR, start + 1)
        if end < 0:
            del buf[:start]
            break
        payloads.append(bytes(buf[start + 1:end]))
        del buf[:end + 2]
    return payloads


def msh_fields(message: str) -> dict[int, str]:
    """MSH-n -> value for the first MSH segment (MSH-1 is the field separator)."""
    for seg in message.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if seg.startswith("MSH") and len(seg) > 3:
            sep = seg[3]
            parts = seg.split(sep)
            fields = {1: sep}
            for n, value in enumerate(parts[1:], start=2):
                fields[n] = value
            return fields
    return {}


class StandInEHR:
    """MLLP results inbox plus FHIR R4 server on 127.0.0.1, ephemeral ports, own thread and event loop."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.mllp_port = 0
        self.fhir_port = 0
        self.mllp_mode = "ack"
        self.nak: Callable[[str], str | None] | None = None
        self.fhir_mode = "ok"
        # as a real server does: a PUT or POST whose literal reference (Type/id) names no stored resource
        # is refused (400, not-found); off by default, so a test may send a resource on its own
        self.check_references = False
        self.take_batches = True  # False: a batch Bundle is answered 405, as by a server without batch support
        self.received_hl7: list[str] = []
        self.hl7_attempts: list[tuple[str, str]] = []
        self.fhir_requests: list[dict[str, Any]] = []
        self._resources: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._ack_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._mllp_server: asyncio.Server | None = None
        self._mllp_writers: set[asyncio.StreamWriter] = set()
        self._mllp_generation = 0  # bumped by every listen; a connection accepted before a close is cut
        self._runner: web.AppRunner | None = None
        self._fhir_wake: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def fhir_base(self) -> str:
        return f"http://127.0.0.1:{self.fhir_port}/fhir"

    @property
    def mllp_address(self) -> str:
        return f"127.0.0.1:{self.mllp_port}"

    def start(self) -> StandInEHR:
        if self._thread is not None:
            raise RuntimeError("StandInEHR already started")
        self._stopping = False
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="standin-ehr", daemon=True)
        self._thread.start()
        try:
            self._call(self._mllp_up())
            self._call(self._fhir_up())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        if thread.is_alive() and not loop.is_closed():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CALL_TIMEOUT)
        self._thread = None
        self._loop = None

    def __enter__(self) -> StandInEHR:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = _CALL_TIMEOUT) -> _T:
        """Run `coro` on the EHR's loop and wait (bounded) for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("StandInEHR is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _shutdown(self) -> None:
        await self._mllp_down()
        await self._fhir_down()

    # ------------------------------------------------------------------ shared helpers

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return bool(predicate())

    # ------------------------------------------------------------------ MLLP

    def set_mllp_down(self, down: bool) -> None:
        self._call(self._mllp_down() if down else self._mllp_up())

    def oru_messages(self) -> list[str]:
        return [m for m in list(self.received_hl7) if msh_fields(m).get(9, "").startswith("ORU")]

    async def _mllp_up(self) -> None:
        if self._mllp_server is not None:
            return
        sock = _listening_socket(self.mllp_port)
        generation = self._mllp_generation = self._mllp_generation + 1

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._mllp_connection(generation, reader, writer)

        self._mllp_server = await asyncio.start_server(connected, sock=sock)
        self.mllp_port = sock.getsockname()[1]

    async def _mllp_down(self) -> None:
        await _settle()
        server, self._mllp_server = self._mllp_server, None
        if server is not None:
            server.close()
        for writer in list(self._mllp_writers):
            writer.transport.abort()  # closed at once: the peer sees the connection reset
        self._mllp_writers.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=5.0)

    async def _mllp_connection(self, generation: int, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        if self._mllp_server is None or generation != self._mllp_generation:
            writer.transport.abort()  # accepted just before the listener closed
            return
        self._mllp_writers.add(writer)
        buf = bytearray()
        try:
            while not self._stopping and not writer.is_closing():
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf.extend(chunk)
                for payload in split_frames(buf):
                    if not await self._mllp_message(payload.decode("utf-8", errors="replace"), writer):
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._mllp_writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    def _mllp_answer(self, text: str) -> str:
        override = self.nak(text) if self.nak is not None else None
        if override is not None and override.upper() in _ANSWERS:
            return override.upper()
        mode = self.mllp_mode
        if mode == "ack":
            return "AA"
        if mode.upper() in _ANSWERS:
            return mode.upper()
        if mode in ("stall", "drop"):
            return mode
        raise ValueError(f"unknown mllp_mode {mode!r}")

    async def _mllp_message(self, text: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one message; False when the connection is to be dropped."""
        answer = self._mllp_answer(text)
        self.hl7_attempts.append((text, answer))
        if answer == "drop":
            writer.close()  # an orderly close: the sender reads end of stream instead of an ACK
            return False
        if answer == "stall":
            return True
        if answer in ("AA", "CA"):
            self.received_hl7.append(text)
        writer.write(VT + self.ack_for(text, answer).encode("utf-8") + FS + CR)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), timeout=5.0)
        return True

    def ack_for(self, text: str, code: str) -> str:
        f = msh_fields(text)
        trigger = f.get(9, "").split("^")
        event = trigger[1] if len(trigger) > 1 else ""
        now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
        ack = (f"MSH|^~\\&|EHR|STANDIN|{f.get(3, '')}|{f.get(4, '')}|{now}||ACK^{event}^ACK|"
               f"STANDIN{next(self._ack_ids):06d}|P|{f.get(12, '')}\rMSA|{code}|{f.get(10, '')}")
        if code not in ("AA", "CA"):
            ack += "\rERR|||207^Application internal error^HL70357|E|||stand-in told to refuse"
        return ack

    # ------------------------------------------------------------------ FHIR: state

    @property
    def resources(self) -> dict[tuple[str, str], dict[str, Any]]:
        """A snapshot: (resourceType, id) -> stored resource JSON."""
        with self._lock:
            return copy.deepcopy(self._resources)

    def find(self, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(r) for (rtype, _), r in self._resources.items()
                    if rtype == resource_type and _has_identifier(r, system, value)]

    def delete(self, resource_type: str, rid: str) -> bool:
        """Remove a stored resource (what a merge in the EHR does to the patient merged away)."""
        with self._lock:
            return self._resources.pop((resource_type, rid), None) is not None

    def _dangling(self, body: Any) -> str | None:
        """The first literal reference (Type/id) in ``body`` that names no stored resource."""
        stack = [body]
        with self._lock:
            while stack:
                node = stack.pop()
                if isinstance(node, list):
                    stack.extend(node)
                elif isinstance(node, dict):
                    ref = node.get("reference")
                    if isinstance(ref, str) and "?" not in ref and not ref.startswith("#") and ref.count("/") == 1:
                        rtype, _, rid = ref.partition("/")
                        if (rtype, rid) not in self._resources:
                            return ref
                    stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        return None

    def _search(self, resource_type: str, token: str | None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for (rtype, _), r in self._resources.items()
                    if rtype == resource_type and (token is None or _token_matches(r, token))]

    def _store(self, resource_type: str, rid: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or replace; returns the stored resource and whether it was created."""
        stored = copy.deepcopy(body)
        stored["id"] = rid
        with self._lock:
            previous = self._resources.get((resource_type, rid))
            version = 1 if previous is None else int(previous.get("meta", {}).get("versionId", "0")) + 1
            meta = dict(stored.get("meta") or {})
            meta["versionId"] = str(version)
            now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            meta["lastUpdated"] = now.replace("+00:00", "Z")
            stored["meta"] = meta
            self._resources[(resource_type, rid)] = stored
        return copy.deepcopy(stored), previous is None

    # ------------------------------------------------------------------ FHIR: server

    def set_fhir_down(self, down: bool) -> None:
        self._call(self._fhir_down() if down else self._fhir_up())

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/fhir/metadata", self._metadata)
        app.router.add_route("POST", "/fhir", self._batch)
        app.router.add_route("GET", "/fhir/{type}", self._type_get)
        app.router.add_route("POST", "/fhir/{type}", self._type_post)
        app.router.add_route("PUT", "/fhir/{type}", self._type_put)
        app.router.add_route("GET", "/fhir/{type}/{id}", self._instance_get)
        app.router.add_route("PUT", "/fhir/{type}/{id}", self._instance_put)
        return app

    async def _fhir_up(self) -> None:
        if self._runner is not None:
            return
        sock = _listening_socket(self.fhir_port)
        self._fhir_wake = asyncio.Event()
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=1.0)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.fhir_port = sock.getsockname()[1]

    async def _fhir_down(self) -> None:
        await _settle()
        runner, self._runner = self._runner, None
        if self._fhir_wake is not None:
            self._fhir_wake.set()  # requests sleeping in "timeout" mode give up
        if runner is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runner.cleanup(), timeout=5.0)

    def _respond(self, status: int, body: dict[str, Any] | None,
                 headers: dict[str, str] | None = None) -> web.Response:
        text = json.dumps(body) if body is not None else None
        return web.Response(status=status, text=text, content_type=FHIR_JSON if text is not None else None,
                            headers=headers)

    def _fail(self, status: int, diagnostics: str, code: str = "processing",
              headers: dict[str, str] | None = None) -> web.Response:
        return self._respond(status, _outcome(diagnostics, code), headers)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = _parse_json(await request.read()) if request.body_exists else None
        record: dict[str, Any] = {"method": request.method, "path": request.path,
                                  "query": dict(request.query), "status": None, "body": body,
                                  "authorization": request.headers.get("Authorization")}
        mode = self.fhir_mode if request.method in ("POST", "PUT") else "ok"
        recorded = False
        try:
            if self.token is not None and request.path != "/fhir/metadata" \
                    and request.headers.get("Authorization") != f"Bearer {self.token}":
                response: web.StreamResponse = self._fail(401, "missing or wrong bearer token", "login",
                                                          {"WWW-Authenticate": "Bearer"})
            elif mode == "ok":
                response = await handler(request)
            elif mode == "timeout":
                self.fhir_requests.append(record)  # visible while the request hangs; status set when answered
                recorded = True
                response = await self._hang(request, handler)
            else:
                response = self._misbehave(mode)
        except web.HTTPException as exc:  # no route, wrong method
            code = "not-found" if exc.status == 404 else "not-supported"
            response = self._fail(exc.status, exc.reason, code)
        record["status"] = response.status
        if not recorded:
            self.fhir_requests.append(record)
        return response

    def _misbehave(self, mode: str) -> web.Response:
        if mode == "500":
            return self._fail(500, "stand-in told to fail", "exception")
        if mode == "429":
            return self._fail(429, "stand-in told to throttle", "throttled", {"Retry-After": "1"})
        raise ValueError(f"unknown fhir_mode {mode!r}")

    async def _hang(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """fhir_mode "timeout": answer normally after 30 s, or 503 at once if the server goes down first."""
        wake = self._fhir_wake or asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=_TIMEOUT_SLEEP)
        if wake.is_set():
            return self._fail(503, "stand-in going down", "transient")
        return await handler(request)

    async def _check_body(self, request: web.Request, resource_type: str) -> web.Response | dict[str, Any]:
        ctype = request.content_type
        if ctype not in _ACCEPTED_TYPES:
            return self._fail(415, f"unsupported Content-Type {ctype!r}; send {FHIR_JSON}", "not-supported")
        body = _parse_json(await request.read())  # aiohttp keeps the bytes the middleware read
        if body is None:
            return self._fail(400, "the body is not JSON", "structure")
        problem = validate_resource(resource_type, body)
        if problem is not None:
            return self._fail(400, problem, "invalid")
        dangling = self._dangling(body) if self.check_references else None
        if dangling is not None:
            return self._fail(400, f"Resource {dangling} not found, specified in {resource_type}", "not-found")
        return dict(body)

    def _saved(self, resource_type: str, stored: dict[str, Any], created: bool) -> web.Response:
        version = stored["meta"]["versionId"]
        headers = {"ETag": f'W/"{version}"', "Last-Modified": stored["meta"]["lastUpdated"]}
        if created:
            headers["Location"] = f"{self.fhir_base}/{resource_type}/{stored['id']}/_history/{version}"
        return self._respond(201 if created else 200, stored, headers)

    async def _metadata(self, request: web.Request) -> web.Response:
        return self._respond(200, {"resourceType": "CapabilityStatement", "status": "active",
                                   "kind": "instance",
                                   "date": "2024-01-01", "fhirVersion": "4.0.1", "format": ["json"],
                                   "rest": [{"mode": "server"}]})

    async def _type_get(self, request: web.Request) -> web.Response:
        rtype = request.match_info["type"]
        return self._respond(200, self._searchset(rtype, request.query.get("identifier")))

    def _searchset(self, rtype: str, token: str | None) -> dict[str, Any]:
        matches = self._search(rtype, token)
        return {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                "entry": [{"fullUrl": f"{self.fhir_base}/{rtype}/{r['id']}", "resource": r,
                           "search": {"mode": "match"}} for r in matches]}

    async def _batch(self, request: web.Request) -> web.Response:
        """A batch Bundle of searches (GET Type?identifier=...): a batch-response with each one's
        searchset; any other entry is answered 405 (the stand-in takes searches only in a batch)."""
        if not self.take_batches:
            return self._fail(405, "this server takes no batch", "not-supported")
        body = _parse_json(await request.read())
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or body.get("type") != "batch":
            return self._fail(400, "POST to the base takes a Bundle of type batch", "invalid")
        out = []
        for entry in body.get("entry") or []:
            req = entry.get("request") if isinstance(entry, dict) else None
            url = str(req.get("url") or "") if isinstance(req, dict) else ""
            rtype, _, query = url.partition("?")
            if not isinstance(req, dict) or req.get("method") != "GET" or not rtype or "/" in rtype:
                out.append({"response": {"status": "405 Method Not Allowed",
                                         "outcome": _outcome("batch entries: GET Type?identifier=... only",
                                                             "not-supported")}})
                continue
            out.append({"resource": self._searchset(rtype, dict(parse_qsl(query)).get("identifier")),
                        "response": {"status": "200 OK"}})
        return self._respond(200, {"resourceType": "Bundle", "type": "batch-response", "entry": out})

    async def _instance_get(self, request: web.Request) -> web.Response:
        rtype, rid = request.match_info["type"], request.match_info["id"]
        with self._lock:
            found = copy.deepcopy(self._resources.get((rtype, rid)))
        if found is None:
            return self._fail(404, f"{rtype}/{rid} not found", "not-found")
        return self._respond(200, found, {"ETag": f'W/"{found["meta"]["versionId"]}"'})

    async def _type_post(self, request: web.Request) -> web.Response:
        rtype = request.match_info["type"]
        checked = await self._check_body(request, rtype)
        if isinstance(checked, web.Response):
            return checked
        condition = request.headers.get("If-None-Exist")
        if condition:
            token = dict(parse_qsl(condition)).get("identifier")
            if token is None:
                return self._fail(400, f"If-None-Exist supports identifier= only, got {condition!r}",
                                  "not-supported")
            matches = self._search(rtype, token)
            if len(matches) > 1:
                return self._fail(412, f"If-None-Exist {condition!r} matches {len(matches)} resources",
                                  "multiple-matches")
            if matches:
                existing = copy.deepcopy(matches[0])
                return self._respond(200, existing, {"ETag": f'W/"{existing["meta"]["versionId"]}"'})
        stored, created = self._store(rtype, str(uuid.uuid4()), checked)
        return self._saved(rtype, stored, created)

    async def _type_put(self, request: web.Request) -> web.Response:
        rtype = request.match_info["type"]
        checked = await self._check_body(request, rtype)
        if isinstance(checked, web.Response):
            return checked
        token = request.query.get("identifier")
        if not token:
            return self._fail(400, "conditional update needs ?identifier=system|value", "not-supported")
        matches = self._search(rtype, token)
        if len(matches) > 1:
            return self._fail(412, f"identifier={token} matches {len(matches)} resources", "multiple-matches")
        if not matches:
            stored, created = self._store(rtype, str(uuid.uuid4()), checked)
            return self._saved(rtype, stored, created)
        rid = matches[0]["id"]
        if "id" in checked and checked["id"] != rid:
            return self._fail(400, f"body id {checked['id']!r} differs from the matched {rtype}/{rid}",
                              "invalid")
        stored, created = self._store(rtype, rid, checked)
        return self._saved(rtype, stored, created)

    async def _instance_put(self, request: web.Request) -> web.Response:
        rtype, rid = request.match_info["type"], request.match_info["id"]
        checked = await self._check_body(request, rtype)
        if isinstance(checked, web.Response):
            return checked
        if "id" in checked and checked["id"] != rid:
            return self._fail(400, f"body id {checked['id']!r} differs from the URL id {rid!r}", "invalid")
        stored, created = self._store(rtype, rid, checked)
        return self._saved(rtype, stored, created)


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in EHR on fixed loopback ports until Ctrl-C (the README walk-through uses it)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m engine.standin_ehr", description=main.__doc__)
    p.add_argument("--mllp-port", type=int, default=2576)
    p.add_argument("--fhir-port", type=int, default=8081)
    p.add_argument("--token", default=None, help="bearer token the FHIR server requires (default: none)")
    args = p.parse_args(argv)
    ehr = StandInEHR(token=args.token)
    ehr.mllp_port, ehr.fhir_port = args.mllp_port, args.fhir_port
    ehr.start()
    print(f"stand-in EHR: MLLP results inbox on {ehr.mllp_address}, FHIR R4 at {ehr.fhir_base}", flush=True)
    seen = 0
    try:
        while True:  # until Ctrl-C: report what arrives
            time.sleep(0.5)
            got = list(ehr.received_hl7)[seen:]
            seen += len(got)
            for m in got:
                print("ORU received:\n  " + m.replace("\r", "\n  "), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        ehr.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
