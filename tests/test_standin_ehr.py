"""The stand-in EHR itself, over real sockets: MLLP framing and answers, going down and up on the same
port, and the FHIR server's conditional update, validation, auth, failure modes and search."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from engine.standin_ehr import StandInEHR

pytestmark = pytest.mark.timeout(30)

TOKEN = "ehr-token"
SYSTEM, VALUE = "urn:dicom:uid", "urn:oid:1.2.3"
STUDY: dict[str, Any] = {"resourceType": "ImagingStudy", "status": "available",
                         "subject": {"reference": "Patient/1"},
                         "identifier": [{"system": SYSTEM, "value": VALUE}]}


def oru(ctrl: str) -> str:
    return "\r".join([f"MSH|^~\\&|RADBRIDGE|RAD|EPIC|GENHOSP|20240315081500||ORU^R01^ORU_R01|{ctrl}|P|2.5.1",
                      "PID|1||100001^^^GENHOSP^MR||Doe^Jane", "OBR|1|P1|F1|71020^Chest X-ray^C4",
                      "OBX|1|TX|IMP^Impression||Normal chest.||||||F"]) + "\r"


def frame(message: str) -> bytes:
    return b"\x0b" + message.encode("utf-8") + b"\x1c\x0d"


class Frames:
    """Reads MLLP frames from a socket, keeping what arrived beyond the current frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> str:
        deadline = time.monotonic() + 5
        while b"\x1c\x0d" not in self.buf and time.monotonic() < deadline:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        frame, sep, self.buf = self.buf.partition(b"\x1c\x0d")
        assert sep and frame.startswith(b"\x0b"), frame
        return frame[1:].decode("utf-8")


def read_frame(sock: socket.socket) -> str:
    return Frames(sock).next()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def segments(ack: str) -> dict[str, list[str]]:
    return {seg.split("|")[0]: seg.split("|") for seg in ack.split("\r") if seg}


@pytest.fixture
def ehr() -> Iterator[StandInEHR]:
    with StandInEHR(token=TOKEN) as e:
        yield e


# ---------------------------------------------------------------------------------------------------- MLLP


def test_mllp_two_messages_one_connection_partial_writes(ehr: StandInEHR) -> None:
    assert ehr.mllp_address == f"127.0.0.1:{ehr.mllp_port}" and ehr.mllp_port > 0
    first, second = oru("C0001"), oru("C0002")
    with connect(ehr.mllp_port) as sock:
        data = frame(first)
        for piece in (data[:1], data[1:20], data[20:-1], data[-1:]):  # one frame in four sends
            sock.sendall(piece)
            time.sleep(0.02)
        ack1 = read_frame(sock)
        data = frame(second)
        sock.sendall(data[:-2])
        time.sleep(0.02)
        sock.sendall(data[-2:])
        ack2 = read_frame(sock)
    for ack, ctrl in ((ack1, "C0001"), (ack2, "C0002")):
        seg = segments(ack)
        assert seg["MSH"][2:4] == ["EHR", "STANDIN"] and seg["MSH"][4:6] == ["RADBRIDGE", "RAD"]
        assert seg["MSH"][8] == "ACK^R01^ACK" and seg["MSH"][11] == "2.5.1"
        assert seg["MSA"] == ["MSA", "AA", ctrl]
        assert "ERR" not in seg
    assert ehr.received_hl7 == [first, second]
    assert ehr.oru_messages() == [first, second]
    assert [a for _, a in ehr.hl7_attempts] == ["AA", "AA"]


def test_mllp_two_frames_in_one_send(ehr: StandInEHR) -> None:
    with connect(ehr.mllp_port) as sock:
        sock.sendall(frame(oru("D1")) + frame(oru("D2")))
        frames = Frames(sock)
        acks = [frames.next(), frames.next()]
    assert [segments(a)["MSA"][2] for a in acks] == ["D1", "D2"]
    assert len(ehr.received_hl7) == 2


def test_mllp_ae_mode_and_nak_override(ehr: StandInEHR) -> None:
    ehr.mllp_mode = "AE"
    with connect(ehr.mllp_port) as sock:
        sock.sendall(frame(oru("E1")))
        seg = segments(read_frame(sock))
        assert seg["MSA"] == ["MSA", "AE", "E1"]
        assert seg["ERR"][3] == "207^Application internal error^HL70357"
        ehr.mllp_mode = "ack"
        ehr.nak = lambda text: "AR" if "|E2|" in text else None
        sock.sendall(frame(oru("E2")) + frame(oru("E3")))
        frames = Frames(sock)
        assert segments(frames.next())["MSA"] == ["MSA", "AR", "E2"]
        assert segments(frames.next())["MSA"] == ["MSA", "AA", "E3"]
    assert [a for _, a in ehr.hl7_attempts] == ["AE", "AR", "AA"]
    assert len(ehr.received_hl7) == 1 and "|E3|" in ehr.received_hl7[0]


def test_mllp_stall_and_drop(ehr: StandInEHR) -> None:
    ehr.mllp_mode = "stall"
    with connect(ehr.mllp_port) as sock:
        sock.settimeout(0.3)
        sock.sendall(frame(oru("S1")))
        with pytest.raises(TimeoutError):
            sock.recv(100)
    ehr.mllp_mode = "drop"
    with connect(ehr.mllp_port) as sock:
        sock.sendall(frame(oru("S2")))
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    assert [a for _, a in ehr.hl7_attempts] == ["stall", "drop"]
    assert ehr.received_hl7 == []


def test_mllp_down_refuses_then_same_port_again(ehr: StandInEHR) -> None:
    port = ehr.mllp_port
    idle = connect(port)  # an open connection is cut too
    ehr.set_mllp_down(True)
    try:
        assert idle.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        idle.close()
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()
    ehr.set_mllp_down(False)
    assert ehr.mllp_port == port
    with connect(port) as sock:
        sock.sendall(frame(oru("U1")))
        assert segments(read_frame(sock))["MSA"] == ["MSA", "AA", "U1"]


# ---------------------------------------------------------------------------------------------------- FHIR


def call(ehr: StandInEHR, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ehr.fhir_base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/fhir+json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read() or b"null")


def ident_query() -> str:
    return "?identifier=" + urllib.parse.quote(f"{SYSTEM}|{VALUE}")


def test_fhir_conditional_put_creates_then_updates(ehr: StandInEHR) -> None:
    status, headers, first = call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)
    assert status == 201, first
    assert headers["Content-Type"].startswith("application/fhir+json")
    rid = first["id"]
    assert headers["Location"] == f"{ehr.fhir_base}/ImagingStudy/{rid}/_history/1"
    assert first["meta"]["versionId"] == "1"
    status, _, second = call(ehr, "PUT", "/ImagingStudy" + ident_query(), dict(STUDY, status="cancelled"))
    assert status == 200 and second["id"] == rid and second["meta"]["versionId"] == "2"
    stored = ehr.resources
    assert list(stored) == [("ImagingStudy", rid)]
    assert stored[("ImagingStudy", rid)]["meta"]["versionId"] == "2"
    assert stored[("ImagingStudy", rid)]["status"] == "cancelled"
    assert [r["id"] for r in ehr.find("ImagingStudy", SYSTEM, VALUE)] == [rid]
    assert [(r["method"], r["status"]) for r in ehr.fhir_requests] == [("PUT", 201), ("PUT", 200)]
    assert ehr.fhir_requests[0]["query"] == {"identifier": f"{SYSTEM}|{VALUE}"}
    assert ehr.fhir_requests[0]["authorization"] == f"Bearer {TOKEN}"
    assert ehr.fhir_requests[0]["body"] == STUDY
    # a body id that differs from the match is refused
    status, _, outcome = call(ehr, "PUT", "/ImagingStudy" + ident_query(), dict(STUDY, id="other"))
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"


def test_fhir_put_by_id_post_and_if_none_exist(ehr: StandInEHR) -> None:
    status, _, res = call(ehr, "PUT", "/ImagingStudy/abc", STUDY)
    assert status == 201 and res["id"] == "abc"
    status, _, res = call(ehr, "PUT", "/ImagingStudy/abc", dict(STUDY, id="abc"))
    assert status == 200 and res["meta"]["versionId"] == "2"
    cond = {"If-None-Exist": "identifier=" + urllib.parse.quote(f"{SYSTEM}|{VALUE}")}
    status, _, res = call(ehr, "POST", "/ImagingStudy", STUDY, headers=cond)
    assert status == 200 and res["id"] == "abc"
    other = dict(STUDY, identifier=[{"system": SYSTEM, "value": "urn:oid:9.9"}])
    status, headers, res = call(ehr, "POST", "/ImagingStudy", other)
    assert status == 201 and "Location" in headers
    assert len(ehr.resources) == 2


def test_fhir_invalid_resources_are_400(ehr: StandInEHR) -> None:
    for bad in (dict(STUDY, foo=1), dict(STUDY, status="bogus"), dict(STUDY, resourceType="Patient")):
        status, _, outcome = call(ehr, "PUT", "/ImagingStudy" + ident_query(), bad)
        assert status == 400, bad
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"]
    assert "foo" in call(ehr, "POST", "/ImagingStudy", dict(STUDY, foo=1))[2]["issue"][0]["diagnostics"]
    assert ehr.resources == {}
    assert [r["status"] for r in ehr.fhir_requests] == [400, 400, 400, 400]


def test_fhir_token_required(ehr: StandInEHR) -> None:
    for token in (None, "wrong"):
        status, _, outcome = call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY, token=token)
        assert status == 401 and outcome["resourceType"] == "OperationOutcome"
    assert call(ehr, "GET", "/ImagingStudy/x", token=None)[0] == 401
    assert ehr.resources == {}
    assert [(r["status"], r["authorization"]) for r in ehr.fhir_requests] == [
        (401, None), (401, "Bearer wrong"), (401, None)]


def test_fhir_failure_modes(ehr: StandInEHR) -> None:
    ehr.fhir_mode = "500"
    status, _, outcome = call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)
    assert status == 500 and outcome["resourceType"] == "OperationOutcome"
    ehr.fhir_mode = "429"
    status, headers, _ = call(ehr, "POST", "/ImagingStudy", STUDY)
    assert status == 429 and headers["Retry-After"] == "1"
    assert call(ehr, "GET", "/ImagingStudy")[0] == 200  # reads always work
    assert ehr.resources == {}
    ehr.fhir_mode = "ok"
    assert call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)[0] == 201


def test_fhir_timeout_mode_client_gives_up(ehr: StandInEHR) -> None:
    ehr.fhir_mode = "timeout"
    req = urllib.request.Request(ehr.fhir_base + "/ImagingStudy", data=json.dumps(STUDY).encode(),
                                 method="POST", headers={"Content-Type": "application/fhir+json",
                                                         "Authorization": f"Bearer {TOKEN}"})
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(req, timeout=0.5)
    assert ehr.wait_for(lambda: len(ehr.fhir_requests) == 1, timeout=2)
    assert ehr.fhir_requests[0]["status"] is None  # still hanging; stop() wakes it
    assert ehr.resources == {}


def test_fhir_search_bundle_and_get(ehr: StandInEHR) -> None:
    rid = call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)[2]["id"]
    status, _, bundle = call(ehr, "GET", "/ImagingStudy" + ident_query())
    assert status == 200
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1
    assert bundle["entry"][0]["resource"]["id"] == rid
    status, _, bundle = call(ehr, "GET", "/ImagingStudy?identifier=" + urllib.parse.quote(f"{SYSTEM}|nope"))
    assert status == 200 and bundle["total"] == 0 and bundle["entry"] == []
    status, _, res = call(ehr, "GET", f"/ImagingStudy/{rid}")
    assert status == 200 and res["identifier"] == STUDY["identifier"]
    status, _, outcome = call(ehr, "GET", "/ImagingStudy/missing")
    assert status == 404 and outcome["resourceType"] == "OperationOutcome"


def test_fhir_down_and_up_on_same_port(ehr: StandInEHR) -> None:
    port = ehr.fhir_port
    assert ehr.fhir_base == f"http://127.0.0.1:{port}/fhir"
    keepalive = socket.create_connection(("127.0.0.1", port), timeout=5)  # an open connection is cut too
    keepalive.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    assert keepalive.recv(4096).startswith(b"HTTP/1.1 200")
    ehr.set_fhir_down(True)
    try:
        assert keepalive.recv(4096) == b""
    except ConnectionResetError:
        pass
    finally:
        keepalive.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    ehr.set_fhir_down(False)
    assert ehr.fhir_port == port
    assert call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)[0] == 201


def test_no_token_means_no_auth_check_and_wait_for_is_bounded() -> None:
    with StandInEHR() as e:
        status, _, _ = call(e, "POST", "/ImagingStudy", STUDY, token=None)
        assert status == 201
        start = time.monotonic()
        assert e.wait_for(lambda: False, timeout=0.2) is False
        assert time.monotonic() - start < 1
    assert e._thread is None  # stopped and joined


def test_fhir_reference_check_refuses_what_is_not_stored_and_delete_removes(ehr: StandInEHR) -> None:
    assert call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)[0] == 201  # off by default: Patient/1 unknown
    ehr.check_references = True
    status, _, outcome = call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)
    assert status == 400 and outcome["issue"][0]["code"] == "not-found"
    assert "Patient/1" in outcome["issue"][0]["diagnostics"]
    assert call(ehr, "PUT", "/Patient/1", {"resourceType": "Patient"})[0] == 201
    contained = dict(STUDY, endpoint=[{"reference": "#dicomweb"}],
                     basedOn=[{"reference": "ServiceRequest?identifier=A1"}])  # neither is a literal reference
    contained["contained"] = [{"resourceType": "Endpoint", "id": "dicomweb", "status": "active",
                               "connectionType": {"code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}],
                               "address": "http://127.0.0.1/dicomweb"}]
    assert call(ehr, "PUT", "/ImagingStudy" + ident_query(), contained)[0] == 200
    assert ehr.delete("Patient", "1") and not ehr.delete("Patient", "1")
    assert call(ehr, "PUT", "/ImagingStudy" + ident_query(), STUDY)[0] == 400
