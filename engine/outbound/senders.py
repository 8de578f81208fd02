"""Connections to the EHR: an MLLP sender for its results inbox and a FHIR client for its server.

Each ``send`` returns an Outcome and never raises for what the network or the EHR does: a refused
connection, a timeout or a 503 is ``retry``; an answer that says the message itself is wrong (AE,
HTTP 400/422) is ``dead``, because sending the same bytes again cannot help. Which codes count as
worth retrying is the destination's setting (channels/ehr-outbound.yaml).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none
from yarl import URL

from engine.channels import Destination
from engine.config import EHRSettings
from engine.outbound.outbox import Outcome
from engine.store.states import AttemptOutcome
from engine.tls import client_context

log = logging.getLogger(__name__)
SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1024 * 1024
REFERENCE_CACHE_SIZE = 10_000  # reference searches remembered per FHIR destination
NOT_FOUND_SECONDS = 60.0  # the longest "no single match" is remembered
# answers to a resource that may mean one of its references no longer resolves (400 Bad Request,
# 404, 409 Conflict, 410 Gone, 412, 422 Unprocessable Entity): remembered references are searched again
STALE_REFERENCE_STATUSES = frozenset({400, 404, 409, 410, 412, 422})
BATCH_SEARCHES = 50  # searches in one batch Bundle
# answers to a batch Bundle that mean the server takes none: the searches go one by one from then on
NO_BATCH_STATUSES = frozenset({400, 404, 405, 415, 422, 501})


class _StaleConnection(ConnectionError):
    """The kept-open connection was closed by the other side before we wrote: reconnect and resend."""


class MLLPSender:
    """One persistent connection to an MLLP receiver; messages go one at a time, each waits for its ACK."""

    def __init__(self, address: str, dest: Destination, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.dest = dest
        self.address = address
        self.tls = tls  # MLLP over TLS ([ehr] mllp_tls); the EHR's certificate must name host
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        w, self._reader, self._writer = self._writer, None, None
        if w is not None:
            w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 2)
            except (TimeoutError, OSError):
                pass

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._writer.is_closing() or self._reader is None or self._reader.at_eof():
            await self.close()
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                        server_hostname=self.host if self.tls is not None else None),
                self.dest.timeout_seconds)
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    async def _exchange(self, frame: bytes) -> bytes:
        reused = self._writer is not None and not self._writer.is_closing()
        reader, writer = await self._connect()
        try:
            writer.write(frame)
            await writer.drain()
            return await asyncio.wait_for(reader.readuntil(EB + CR), self.dest.timeout_seconds)
        except asyncio.IncompleteReadError as exc:
            await self.close()
            if reused and not exc.partial:  # closed while idle: the peer never saw this message
                raise _StaleConnection("connection closed by the receiver") from None
            raise ConnectionError("connection closed before an ACK came") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            await self.close()
            if reused:
                raise _StaleConnection(str(exc)) from None
            raise

    async def send(self, payload: str, control_id: str | None) -> Outcome:
        frame = SB + payload.encode("utf-8") + EB + CR
        started = time.monotonic()
        try:
            # a kept-open connection the EHR closed while idle is reconnected once, at once
            async for attempt in AsyncRetrying(stop=stop_after_attempt(2), wait=wait_none(),
                                               retry=retry_if_exception_type(_StaleConnection), reraise=True):
                with attempt:
                    reply = await self._exchange(frame)
        except TimeoutError:
            await self.close()  # the stream is out of step now: a late ACK must not answer the next message
            return Outcome(AttemptOutcome.RETRY, "timeout", error=f"no ACK within {self.dest.timeout_seconds:g} s",
                           duration_ms=_ms(started), target=self.address)
        except (OSError, ConnectionError) as exc:
            await self.close()
            status = ("refused" if isinstance(exc, ConnectionRefusedError)
                      else "tls" if isinstance(exc, ssl.SSLError) else "connection")
            return Outcome(AttemptOutcome.RETRY, status, error=f"{type(exc).__name__}: {exc}".strip(": "),
                           duration_ms=_ms(started), target=self.address)
        return self._judge(reply[reply.find(SB) + 1: -2].decode("utf-8", "replace"), control_id, started)

    def _judge(self, ack: str, control_id: str | None, started: float) -> Outcome:
        segments = [s for s in ack.replace("\n", "\r").split("\r") if s]
        msa = next((s for s in segments if s.startswith("MSA")), None)
        if msa is None or len(msa) < 4:
            return Outcome(AttemptOutcome.RETRY, "no MSA", response=ack, error="the answer has no MSA segment",
                           duration_ms=_ms(started), target=self.address)
        fields = msa.split(msa[3])
        code = fields[1] if len(fields) > 1 else ""
        acked = fields[2] if len(fields) > 2 else ""
        err = next((s for s in segments if s.startswith("ERR")), None)
        if control_id and acked and acked != control_id:
            return Outcome(AttemptOutcome.RETRY, code, response=ack, error=f"ACK is for message {acked!r}, not {control_id!r}",
                           duration_ms=_ms(started), target=self.address)
        if code in ("AA", "CA"):
            return Outcome(AttemptOutcome.DELIVERED, code, response=ack, duration_ms=_ms(started), target=self.address)
        text = (fields[3] if len(fields) > 3 and fields[3] else "") or (err or "")
        outcome = AttemptOutcome.RETRY if code in self.dest.retry_codes else AttemptOutcome.DEAD
        return Outcome(outcome, code or "?", response=ack, error=f"{code or 'no code'}: {text}".strip(": "),
                       duration_ms=_ms(started), target=self.address)


def mllp_tls_context(ehr: EHRSettings) -> ssl.SSLContext | None:
    """The client context of the outbound MLLP sender ([ehr] mllp_tls), or None (plain TCP)."""
    if not ehr.mllp_tls:
        return None
    return client_context(ehr.mllp_ca_file, ehr.mllp_cert_file, ehr.mllp_key_file)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


class FHIRSender:
    """Conditional updates (PUT Type?identifier=...) to the EHR's FHIR server, with its auth and TLS."""

    def __init__(self, ehr: EHRSettings, dest: Destination) -> None:
        base = URL(ehr.fhir_base)
        self.dest = dest
        self.headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        self.auth: aiohttp.BasicAuth | None = None
        if base.user is not None or base.password is not None:
            # a user and password in fhir_base are sent as basic authentication, and taken out of
            # the URL: request URLs are recorded (delivery target) and appear in errors
            self.headers["Authorization"] = aiohttp.encode_basic_auth(base.user or "", base.password or "")
            base = base.with_user(None)
        self.base = str(base).rstrip("/")
        if ehr.fhir_token:
            self.headers["Authorization"] = f"Bearer {ehr.fhir_token}"
        elif ehr.fhir_username:
            self.auth = aiohttp.BasicAuth(ehr.fhir_username, ehr.fhir_password)
        self.ssl: ssl.SSLContext | bool = True
        if not ehr.fhir_verify_tls:
            self.ssl = False
        elif ehr.fhir_ca_file:
            self.ssl = ssl.create_default_context(cafile=ehr.fhir_ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._refs = ReferenceCache(dest.reference_cache_seconds)
        self.batch_searches = True  # until the server refuses a batch of searches

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.dest.timeout_seconds)
            self._session = aiohttp.ClientSession(
                timeout=timeout, headers=self.headers, auth=self.auth,
                connector=aiohttp.TCPConnector(limit=max(1, self.dest.concurrency), ssl=self.ssl))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, payload: str, resource: str, conditional: str | None, *, recheck: bool = False) -> Outcome:
        """Send one resource. ``recheck``: search every reference again instead of taking a remembered
        answer (a correction: a merge or a relink may have changed what they point at)."""
        started = time.monotonic()
        url = f"{self.base}/{resource}" + (f"?{conditional}" if conditional else "")
        method = "PUT" if conditional else "POST"
        try:
            body = json.loads(payload)
            remembered: list[str] = []  # searches answered from memory for this body
            if self.dest.resolve_references:
                await self._resolve(body, remembered, recheck)
            data = json.dumps(body, ensure_ascii=False).encode()
            status, text, retry_after, where = await self._request(method, url, data)
            if remembered and status in STALE_REFERENCE_STATUSES:
                # the EHR refused a resource that carried remembered references: one of them may no
                # longer resolve (a merge, a deletion on the EHR). Search them again, and send once more
                # if that changed the resource; the first answer stands if it did not
                self._refs.forget(remembered)
                body = json.loads(payload)
                await self._resolve(body, [], True)
                again = json.dumps(body, ensure_ascii=False).encode()
                if again != data:
                    status, text, retry_after, where = await self._request(method, url, again)
        except _Unresolved as exc:
            return Outcome(AttemptOutcome.RETRY, exc.status, error=str(exc), duration_ms=_ms(started), target=url)
        except TimeoutError:
            return Outcome(AttemptOutcome.RETRY, "timeout", error=f"no answer within {self.dest.timeout_seconds:g} s",
                           duration_ms=_ms(started), target=url)
        except aiohttp.ClientConnectorError as exc:
            return Outcome(AttemptOutcome.RETRY, "refused", error=str(exc), duration_ms=_ms(started), target=url)
        except aiohttp.ClientError as exc:
            return Outcome(AttemptOutcome.RETRY, "connection", error=f"{type(exc).__name__}: {exc}", duration_ms=_ms(started),
                           target=url)
        response = (f"{status} {where}\n" if where else f"{status}\n") + text[:3000]
        if 200 <= status < 300:
            return Outcome(AttemptOutcome.DELIVERED, str(status), response=response, duration_ms=_ms(started), target=url)
        outcome = AttemptOutcome.RETRY if status in self.dest.retry_statuses else AttemptOutcome.DEAD
        return Outcome(outcome, str(status), response=response, error=f"HTTP {status}: {_diagnostics(text)}",
                       duration_ms=_ms(started), retry_after=retry_after, target=url)

    async def prefetch(self, payloads: list[str]) -> None:
        """Look up the references of a batch of resources at once: one batch Bundle of searches
        (``POST {fhir_base}`` with ``GET Type?identifier=...`` entries) instead of a search per
        reference per resource; the answers are remembered for the sends that follow. Only an advice:
        whatever it could not settle (an error, a server that takes no batch) each send searches itself."""
        if not self.dest.resolve_references or not self.batch_searches:
            return
        wanted: dict[str, None] = {}
        for payload in payloads:
            for node in _search_references(json.loads(payload)):
                if self._refs.get(node["reference"]) is None:
                    wanted[node["reference"]] = None
        refs = list(wanted)
        if len(refs) < 2:
            return
        for start in range(0, len(refs), BATCH_SEARCHES):
            chunk = refs[start:start + BATCH_SEARCHES]
            batch = {"resourceType": "Bundle", "type": "batch",
                     "entry": [{"request": {"method": "GET", "url": ref}} for ref in chunk]}
            try:
                async with self.session().post(self.base, data=json.dumps(batch).encode()) as r:
                    if r.status in NO_BATCH_STATUSES:
                        self.batch_searches = False
                        log.info("the FHIR server at %s takes no batch of searches (HTTP %d): one search per "
                                 "reference from now on", self.base, r.status)
                        return
                    if r.status != 200:
                        return
                    answer = await r.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return
            entries = answer.get("entry") if isinstance(answer, dict) else None
            if not isinstance(entries, list) or len(entries) != len(chunk):
                return
            for ref, entry in zip(chunk, entries, strict=True):
                response = entry.get("response") if isinstance(entry, dict) else None
                status = str(response.get("status", "")) if isinstance(response, dict) else ""
                bundle = entry.get("resource") if isinstance(entry, dict) else None
                if status.split(" ")[0] == "200" and isinstance(bundle, dict) and bundle.get("type") == "searchset":
                    self._refs.put(ref, _single_match(ref, bundle))

    async def _request(self, method: str, url: str, data: bytes) -> tuple[int, str, float | None, str | None]:
        async with self.session().request(method, url, data=data) as r:
            text = await r.text(errors="replace")
            return (r.status, text, _retry_after(r.headers.get("Retry-After")),
                    r.headers.get("Location") or r.headers.get("Content-Location"))

    async def _resolve(self, body: Any, remembered: list[str], recheck: bool) -> None:
        """Replace each reference written as ``Type?search`` by ``Type/id`` found on the server; with no
        match, by a logical reference (Reference.identifier) from the search's identifier. The searches
        not remembered go out at once (a Patient and a ServiceRequest: one round trip, not two); those
        answered from memory are added to ``remembered``."""
        nodes = list(_search_references(body))
        found: dict[str, str | None] = {}
        for node in nodes:
            ref = node["reference"]
            hit = None if recheck else self._refs.get(ref)
            if hit is not None and ref not in found:
                found[ref] = hit.found
                remembered.append(ref)
        wanted = list(dict.fromkeys(n["reference"] for n in nodes if n["reference"] not in found))
        for ref, answer in zip(wanted, await asyncio.gather(*(self._search(r) for r in wanted)), strict=True):
            found[ref] = answer
        for node in nodes:
            ref = node["reference"]
            if found[ref]:
                node["reference"] = found[ref]
                continue
            del node["reference"]
            ident = _identifier_of(ref)
            if ident:
                node["identifier"] = ident
            elif not node:
                node["display"] = ref

    async def _search(self, ref: str) -> str | None:
        rtype, _, query = ref.partition("?")
        url = f"{self.base}/{rtype}?{query}"
        try:
            async with self.session().get(url) as r:
                if r.status >= 500 or r.status in (401, 403, 429):  # the server's trouble, not "no such search"
                    raise _Unresolved(str(r.status), f"searching {ref}: HTTP {r.status}")
                if r.status != 200:  # the server does not search that way: use the identifier
                    self._refs.put(ref, None)
                    return None
                bundle = await r.json(content_type=None)
        except TimeoutError:
            raise _Unresolved("timeout", f"searching {ref}: no answer") from None
        except aiohttp.ClientError as exc:
            raise _Unresolved("refused", f"searching {ref}: {exc}") from None
        found = _single_match(ref, bundle)
        self._refs.put(ref, found)
        return found


@dataclass(frozen=True)
class _Remembered:
    found: str | None  # Type/id, or None: no single match (sent as a logical reference)
    until: float  # monotonic


class ReferenceCache:
    """What the EHR answered to each reference search (``Patient?identifier=...``), per destination.

    A found reference is remembered for ``seconds``, "no single match" for at most
    NOT_FOUND_SECONDS (the patient may be registered at the EHR soon); at most ``size`` searches are
    kept, the least recently used going first, so memory stays flat however many patients pass."""

    def __init__(self, seconds: float, size: int = REFERENCE_CACHE_SIZE) -> None:
        self.seconds, self.size = seconds, size
        self._entries: OrderedDict[str, _Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, search: str) -> _Remembered | None:
        hit = self._entries.get(search)
        if hit is None:
            return None
        if hit.until <= time.monotonic():
            del self._entries[search]
            return None
        self._entries.move_to_end(search)
        return hit

    def put(self, search: str, found: str | None) -> None:
        keep = self.seconds if found else min(self.seconds, NOT_FOUND_SECONDS)
        self._entries[search] = _Remembered(found, time.monotonic() + keep)
        self._entries.move_to_end(search)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, searches: list[str]) -> None:
        for search in searches:
            self._entries.pop(search, None)


class _Unresolved(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _search_references(node: Any) -> Iterator[dict[str, Any]]:
    """The elements whose ``reference`` is written as a search (``Type?identifier=...``), not ``#id``."""
    if isinstance(node, list):
        for x in node:
            yield from _search_references(x)
    elif isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "?" in ref and not ref.startswith("#"):
            yield node
        for v in node.values():
            if isinstance(v, (dict, list)):
                yield from _search_references(v)


def _single_match(ref: str, bundle: Any) -> str | None:
    """``Type/id`` when the searchset of ``ref`` holds exactly one resource of its type, else None."""
    rtype = ref.partition("?")[0]
    entries = [e.get("resource", {}) for e in bundle.get("entry", []) or [] if isinstance(e, dict)]
    hits = [e for e in entries if isinstance(e, dict) and e.get("resourceType") == rtype and e.get("id")]
    return f"{rtype}/{hits[0]['id']}" if len(hits) == 1 else None


def _identifier_of(ref: str) -> dict[str, str] | None:
    _rtype, _, query = ref.partition("?")
    for key, value in parse_qsl(query):
        if key == "identifier" and value:
            system, bar, val = value.rpartition("|")
            if not bar:
                return {"value": value}
            return {"system": system, "value": val} if system else {"value": val}
    return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(3600.0, max(0.0, float(value)))
    except ValueError:
        return None


def _diagnostics(text: str) -> str:
    """The OperationOutcome's first issue, or the start of the body."""
    try:
        body = json.loads(text)
        issues = body.get("issue") or []
        if issues:
            i = issues[0]
            return str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))[:500]
    except (ValueError, AttributeError):
        pass
    return text[:300]

