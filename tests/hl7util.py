"""Building test messages and talking to the engine with a real MLLP client that is not ours
(python-hl7's MLLPClient), plus raw sockets where a client must misbehave."""

from __future__ import annotations

import itertools
import socket
import time

from hl7.client import MLLPClient

_ctrl = itertools.count(1)


def ctrl_id(prefix: str = "T") -> str:
    return f"{prefix}{next(_ctrl):06d}"


def msh(mtype: str, ctrl: str, *, version: str = "2.5.1", ts: str = "20240315081500", app: str = "EPIC",
        fac: str = "GENHOSP", extra: str = "") -> str:
    return f"MSH|^~\\&|{app}|{fac}|RADBRIDGE|RAD|{ts}||{mtype}|{ctrl}|P|{version}{extra}"


def adt(event: str, mrn: str, family: str, given: str = "Pat", *, dob: str = "19700101", sex: str = "F",
        issuer: str = "GENHOSP", ctrl: str | None = None, ts: str = "20240315081500", pid_extra: str = "",
        mrg: str | None = None, msh_extra: str = "") -> str:
    ctrl = ctrl or ctrl_id("ADT")
    segs = [msh(f"ADT^{event}^ADT_A01", ctrl, ts=ts, extra=msh_extra), f"EVN|{event}|{ts}",
            f"PID|1||{mrn}^^^{issuer}^MR{pid_extra}||{family}^{given}||{dob}|{sex}"]
    if mrg:
        segs.append(f"MRG|{mrg}^^^{issuer}^MR")
    return "\r".join(segs) + "\r"


def orm(control: str, placer: str, accession: str, mrn: str, *, family: str = "Doe", status: str = "",
        ctrl: str | None = None, ts: str = "20240315083000", proc: str = "71020^Chest X-ray^C4",
        modality: str = "CR", issuer: str = "GENHOSP", station: str = "") -> str:
    ctrl = ctrl or ctrl_id("ORM")
    obr = ["OBR", "1", f"{placer}^EPIC", f"F{placer}^RIS", proc] + [""] * 13 + [accession, f"RP{placer}",
                                                                                 f"SPS{placer}", station, "", "",
                                                                                 modality]
    segs = [msh("ORM^O01", ctrl, version="2.3.1", ts=ts), f"PID|1||{mrn}^^^{issuer}^MR||{family}^Jane||19700101|F",
            f"ORC|{control}|{placer}^EPIC|F{placer}^RIS||{status}||^^^20240320140000^^R||{ts}",
            "|".join(obr)]
    return "\r".join(segs) + "\r"


def send(port: int, message: str | bytes, encoding: str = "utf-8") -> str:
    with MLLPClient("127.0.0.1", port, encoding=encoding) as client:
        client.socket.settimeout(30)
        reply = client.send_message(message)
    return reply.decode(encoding if encoding != "ascii" else "latin-1", "replace").strip("\x0b\x1c\r")


def send_many(port: int, messages: list[str]) -> list[str]:
    replies = []
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        for m in messages:
            replies.append(client.send_message(m).decode("utf-8", "replace").strip("\x0b\x1c\r"))
    return replies


def segment(reply: str, name: str) -> list[str]:
    for seg in reply.replace("\n", "\r").split("\r"):
        if seg.startswith(name + "|"):
            return seg.split("|")
    return []


def ack_code(reply: str) -> str:
    msa = segment(reply, "MSA")
    return msa[1] if len(msa) > 1 else ""


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, close_write: bool = False) -> bytes:
    """Send raw bytes (framing chosen by the test) and read until the server closes or goes quiet."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if out.endswith(b"\x1c\r"):
                    break
                continue
            if not chunk:
                break
            out += chunk
    return out


def frames(data: bytes) -> list[str]:
    return [f.strip(b"\x0b\r").decode("latin-1") for f in data.split(b"\x1c") if f.strip(b"\x0b\r")]
