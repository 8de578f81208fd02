"""A lean C-STORE SCU: the few DICOM upper-layer PDUs a storage association needs, written by hand.

pynetdicom spends ~7 ms CPU per instance in its DIMSE/PDU machinery (a thread, queues, a primitive per
PDV); a forward of a 500-instance study is bound by that, not by the network. Here an association is a
plain socket (wrapped by the destination's TLS context when it has one): A-ASSOCIATE-RQ/AC, then per
instance one P-DATA-TF with the command set (from a small template: SOP class/instance UIDs, message id,
priority), the dataset bytes read in chunks straight from the stored file after its File Meta Information
(never parsed by pydicom), fragmented to the peer's maximum PDU length, then the C-STORE-RSP read back
(Status, Error Comment); A-RELEASE at the end, A-ABORT on protocol errors. Every read has a timeout.

PS3.8 section 9.3 (PDU structure), PS3.7 section 9.3.1 and annex E (C-STORE command set).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from engine.errors import RadBridgeError

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_VERSION = "RADBRIDGE_1"  # with the engine's (pynetdicom's) implementation class UID
OUR_MAX_PDU = 1 << 20  # what we take (responses are small)
UNLIMITED_SEND = 1 << 18  # fragment size when the peer sets no limit (0)
READ_CHUNK = 1 << 18  # bytes read from a stored file at a time (a multiple of the fragment, rounded)
REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}


class AssociationFailed(RadBridgeError):
    """No association. ``kind``: refused (no connection), rejected (A-ASSOCIATE-RJ), aborted (A-ABORT,
    connection closed, garbage or no answer in time while negotiating)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class AssociationLost(RadBridgeError):
    """The association ended or broke while sending. ``kind``: aborted (A-ABORT, closed, protocol error)
    or timeout (no response in time)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str = ""


@dataclass
class Accepted:
    """What the peer accepted: per context id (abstract syntax, transfer syntax)."""

    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    max_pdu: int = 0  # the peer's maximum P-DATA-TF PDU length (0: no limit)

    def context_for(self, sop_class: str, syntax: str) -> int | None:
        for cid, (a, t) in self.contexts.items():
            if a == sop_class and t == syntax:
                return cid
        return None

    def syntaxes(self, sop_class: str) -> list[str]:
        return [t for a, t in self.contexts.values() if a == sop_class]


def _uid(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16)


def associate_rq(calling: str, called: str, contexts: list[tuple[str, list[str]]]) -> bytes:
    """A-ASSOCIATE-RQ proposing ``contexts`` (abstract syntax, transfer syntaxes) as ids 1, 3, 5 ..."""
    body = struct.pack(">Hxx", 1) + _ae(called) + _ae(calling) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for n, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in syntaxes)
        body += _item(0x20, struct.pack(">Bxxx", 2 * n + 1) + sub)
    user = (_item(0x51, struct.pack(">I", OUR_MAX_PDU)) + _item(0x52, str(PYNETDICOM_IMPLEMENTATION_UID).encode())
            + _item(0x55, IMPLEMENTATION_VERSION.encode()))
    body += _item(0x50, user)
    return struct.pack(">BxI", 0x01, len(body)) + body


def _items(data: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    i = start
    while i + 4 <= len(data):
        kind, length = struct.unpack_from(">BxH", data, i)
        yield kind, data[i + 4:i + 4 + length]
        i += 4 + length


def parse_associate_ac(body: bytes, proposed: dict[int, str]) -> Accepted:
    """The accepted contexts and max PDU of an A-ASSOCIATE-AC's body (the PDU without its 6-byte header)."""
    out = Accepted()
    for kind, item in _items(body, 68):
        if kind == 0x21 and len(item) >= 4:
            cid, result = item[0], item[2]
            syntaxes = [s.rstrip(b"\0 ").decode("ascii", "replace") for k, s in _items(item, 4) if k == 0x40]
            if result == 0 and syntaxes and cid in proposed:
                out.contexts[cid] = (proposed[cid], syntaxes[0])
        elif kind == 0x50:
            for sub, value in _items(item, 0):
                if sub == 0x51 and len(value) == 4:
                    out.max_pdu = struct.unpack(">I", value)[0]
    return out


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, tag, len(value)) + value


def store_command(sop_class: str, sop_instance: str, message_id: int, priority: int = 0) -> bytes:
    """The C-STORE-RQ command set (implicit VR little endian, group 0000)."""
    body = (_element(0x0002, _uid(sop_class)) + _element(0x0100, struct.pack("<H", 0x0001))
            + _element(0x0110, struct.pack("<H", message_id)) + _element(0x0700, struct.pack("<H", priority))
            + _element(0x0800, struct.pack("<H", 0x0000)) + _element(0x1000, _uid(sop_instance)))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set's elements (group 0000, implicit VR little endian) by element number."""
    out: dict[int, bytes] = {}
    i = 0
    while i + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, i)
        if group != 0 or i + 8 + length > len(data):
            raise ValueError("malformed command set")
        out[elem] = data[i + 8:i + 8 + length]
        i += 8 + length
    return out


def dataset_offset(f: BinaryIO) -> int:
    """Skips the preamble and File Meta Information of the stored file ``f`` (explicit VR little endian,
    group 0002); ``f`` is left at the dataset's first byte and its offset returned. ValueError if ``f``
    is no DICOM Part 10 file."""
    head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError("no DICOM preamble")
    pos = 132
    while True:
        tag = f.read(8)
        if len(tag) < 8:
            raise ValueError("truncated file meta information")
        group = struct.unpack_from("<H", tag, 0)[0]
        if group != 0x0002:
            f.seek(pos)
            return pos
        vr = tag[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            ext = f.read(4)
            if len(ext) < 4:
                raise ValueError("truncated file meta information")
            length = struct.unpack("<I", ext)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", tag, 6)[0]
            header = 8
        if length == 0xFFFFFFFF:
            raise ValueError("undefined length in file meta information")
        f.seek(length, 1)
        pos += header + length


class StoreAssociation:
    """One association with a storage SCP, opened by ``open`` (a context manager: released or aborted)."""

    def __init__(self, sock: socket.socket, accepted: Accepted, timeout: float) -> None:
        self.sock = sock
        self.accepted = accepted
        self.timeout = timeout
        peer = accepted.max_pdu
        self.fragment = (min(peer, OUR_MAX_PDU) if peer else UNLIMITED_SEND) - 6  # PDV: length, id, header
        if self.fragment < 1:
            raise AssociationFailed("aborted", f"the peer's maximum PDU length ({peer}) is too small")
        self.chunk = max(self.fragment, READ_CHUNK // self.fragment * self.fragment)
        self.open_ = True

    # --- set-up and tear-down ---------------------------------------------------------------------------
    @classmethod
    def open(cls, host: str, port: int, *, calling: str, called: str, contexts: list[tuple[str, list[str]]],
             timeout: float, tls: ssl.SSLContext | None = None) -> StoreAssociation:
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AssociationFailed("refused", f"no connection: {exc.strerror or exc}") from None
        connected = False
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(raw, server_hostname=host)
            sock.settimeout(timeout)
            proposed = {2 * n + 1: abstract for n, (abstract, _ts) in enumerate(contexts)}
            sock.sendall(associate_rq(calling, called, contexts))
            kind, body = _read_pdu(sock)
            if kind == 0x02 and len(body) >= 68:
                accepted = parse_associate_ac(body, proposed)
                connected = True
                return cls(sock, accepted, timeout)
            if kind == 0x03 and len(body) >= 4:
                result, source, reason = body[1], body[2], body[3]
                why = REJECT_REASONS.get((source, reason), f"reason {reason}")
                raise AssociationFailed("rejected", f"{'rejected permanent' if result == 1 else 'rejected transient'}"
                                                    f", {REJECT_SOURCES.get(source, source)}: {why}")
            if kind == 0x07:
                raise AssociationFailed("aborted", "A-ABORT while negotiating")
            raise AssociationFailed("aborted", f"unexpected PDU type {kind:#04x} while negotiating")
        except (OSError, AssociationLost) as exc:
            raise AssociationFailed("aborted", f"connection lost or no answer while negotiating ({exc})") from None
        finally:
            if not connected:
                with contextlib.suppress(OSError):
                    sock.close()

    def release(self) -> None:
        """A-RELEASE-RQ, waiting (bounded) for the RP; the socket is closed in any case."""
        if not self.open_:
            return
        try:
            self.sock.sendall(struct.pack(">BxI4x", 0x05, 4))
            for _ in range(16):  # a stray PDU or two before the RP at most
                kind, _body = _read_pdu(self.sock)
                if kind in (0x06, 0x07):
                    break
        except (OSError, AssociationLost):
            pass
        finally:
            self.close()

    def abort(self) -> None:
        if not self.open_:
            return
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BxI2xBB", 0x07, 4, 0, 0))
        self.close()

    def close(self) -> None:
        self.open_ = False
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> StoreAssociation:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.release()
        else:
            self.abort()

    # --- C-STORE ----------------------------------------------------------------------------------------
    def store(self, context_id: int, sop_class: str, sop_instance: str, message_id: int,
              dataset: BinaryIO | bytes) -> StoreResponse:
        """Sends one instance: its command set, then ``dataset`` (encoded in the context's transfer syntax:
        a file positioned at its first byte, read in chunks, or bytes), then reads the C-STORE-RSP.
        AssociationLost when the association broke (it is aborted then)."""
        if not self.open_:
            raise AssociationLost("aborted", "the association is closed")
        try:
            command = store_command(sop_class, sop_instance, message_id)
            head = [self._pdu(context_id, command, command=True, last=True)]
            chunks = _chunks(dataset, self.chunk)
            pending = next(chunks, b"")
            for nxt in chunks:
                self._send(head, context_id, pending, last=False)
                head, pending = [], nxt
            self._send(head, context_id, pending, last=True)
            return self._response(message_id)
        except AssociationLost:
            self.abort()
            raise
        except TimeoutError:
            self.abort()
            raise AssociationLost("timeout", f"no C-STORE response within {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:
            self.abort()
            raise AssociationLost("aborted", f"association broke: {exc}") from None

    @staticmethod
    def _pdu(context_id: int, data: bytes | memoryview, *, command: bool, last: bool) -> bytes:
        header = (1 if command else 0) | (2 if last else 0)
        return struct.pack(">BxIIBB", 0x04, len(data) + 6, len(data) + 2, context_id, header) + data

    def _send(self, head: list[bytes], context_id: int, data: bytes, *, last: bool) -> None:
        parts = head
        view = memoryview(data)
        size = len(view)
        if size == 0 and last:
            parts.append(self._pdu(context_id, b"", command=False, last=True))
        for start in range(0, size, self.fragment):
            piece = view[start:start + self.fragment]
            parts.append(self._pdu(context_id, piece, command=False, last=last and start + self.fragment >= size))
        if parts:
            self.sock.sendall(b"".join(parts))

    def _response(self, message_id: int) -> StoreResponse:
        command = b""
        for _ in range(10_000):  # bounded: a response is a few PDVs
            kind, body = _read_pdu(self.sock)
            if kind == 0x07:
                raise AssociationLost("aborted", "A-ABORT from the destination")
            if kind != 0x04:
                raise AssociationLost("aborted", f"unexpected PDU type {kind:#04x} (waiting for the C-STORE-RSP)")
            i = 0
            while i + 6 <= len(body):
                length = struct.unpack_from(">I", body, i)[0]
                header = body[i + 5]
                if not header & 1:
                    raise AssociationLost("aborted", "data set PDV in a C-STORE-RSP")
                command += body[i + 6:i + 4 + length]
                i += 4 + length
                if header & 2:
                    return _store_response(parse_command(command), message_id)
        raise AssociationLost("aborted", "C-STORE-RSP too long")


def _store_response(elems: dict[int, bytes], message_id: int) -> StoreResponse:
    if struct.unpack("<H", elems.get(0x0100, b"\0\0")[:2])[0] != 0x8001:
        raise AssociationLost("aborted", "the response is no C-STORE-RSP")
    answered = elems.get(0x0120)
    if answered is None or struct.unpack("<H", answered[:2])[0] != message_id:
        raise AssociationLost("aborted", f"the C-STORE-RSP answers another message than {message_id}")
    status = elems.get(0x0900)
    if status is None or len(status) < 2:
        raise AssociationLost("aborted", "C-STORE-RSP without a status")
    comment = elems.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
    return StoreResponse(struct.unpack("<H", status[:2])[0], comment)


def _chunks(dataset: BinaryIO | bytes, size: int) -> Iterator[bytes]:
    if isinstance(dataset, bytes | bytearray):
        for start in range(0, len(dataset), size):
            yield bytes(dataset[start:start + size])
        return
    while chunk := dataset.read(size):
        yield chunk


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise AssociationLost("aborted", "the destination closed the connection")
        buf += got
    return bytes(buf)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU (type, body); the socket's timeout bounds every read."""
    kind, length = struct.unpack(">BxI", _recv_exactly(sock, 6))
    if length > OUR_MAX_PDU + 1024 and kind == 0x04 or length > 1 << 24:
        raise AssociationLost("aborted", f"PDU of {length} bytes: more than agreed")
    return kind, _recv_exactly(sock, length)
