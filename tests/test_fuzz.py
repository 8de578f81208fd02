"""The standing adversarial suite: property-based fuzzing (hypothesis) of what reads peers' bytes.

Each property says "any input gets an answer, never a crash": the MLLP decoder, the HL7 parser and
paths, the whole HL7 inbound step against a real database (SQLite and PostgreSQL), FHIR bodies (in
process, and over HTTP to a running engine: never a 500), and the DICOM header reader on mutated
real files (in process, and sent by dcmtk's storescu to a running engine: always a status).

Examples are derandomized and bounded in CI (profile ``ci``, RADBRIDGE_FUZZ_EXAMPLES scales them);
the long run (random, many more examples) is in docs/reliability.md:

    HYPOTHESIS_PROFILE=long RADBRIDGE_FUZZ_EXAMPLES=20000 scripts/test tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement

from engine.connectors.mllp.framing import Frame, MLLPDecoder
from engine.dicom.headers import HeaderError, read_header
from engine.fhir.outcome import FhirError
from engine.fhir.validate import check_resource, parse_json
from engine.hl7.errors import HL7ParseError
from engine.hl7.message import Message, parse_text
from engine.hl7.paths import PathError, parse_path
from engine.pipeline.hl7_inbound import HL7Inbound
from engine.store.db import Database
from tests.conftest import SAMPLES, RunningEngine, make_settings
from tests.dicomutil import DCMTK_ENV, bundled, make_instance, require_dcmtk
from tests.fhirutil import call

EXAMPLES = int(os.environ.get("RADBRIDGE_FUZZ_EXAMPLES", "100"))
COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=EXAMPLES, derandomize=True, database=None, **COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=EXAMPLES, **COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HL7_SAMPLES = sorted(SAMPLES.glob("*.hl7"))
FHIR_SAMPLES = sorted((SAMPLES / "fhir").glob("*.json"))
SEPARATORS = "|^~\\&\r\n"
# values a hostile or broken sender writes: separators, escapes, control characters, any Unicode
field_text = st.one_of(
    st.text(alphabet=st.sampled_from(list(SEPARATORS + "\\E\\F\\S\\T\\R\\X0D\\.br\\H\\N\\" + "\x00\x0b\x1c\t ")),
            max_size=40),
    st.text(max_size=60),
    st.sampled_from(["", '""', "99999999999999999999999", "-1", "2024-13-45", "20240230", "19000101000000.0000+9999",
                     "^^^^^^", "~~~~", "A" * 300, "1.2.3." + "9" * 70, "NW", "CA", "XO", "DC", "A40", "O23"]),
)


def edit_fields(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace field ``f`` of segment ``s`` (both taken modulo what exists, or appended) with ``v``."""
    segments = text.replace("\n", "\r").split("\r")
    segments = [s for s in segments if s]
    for s_no, f_no, value in edits:
        seg = segments[s_no % len(segments)].split("|")
        f = 1 + f_no % (len(seg) + 2)
        seg += [""] * (f + 1 - len(seg))
        if not (seg[0] == "MSH" and f == 1):  # MSH-2 breaks every field after it: covered by bytes below
            seg[f] = value
        segments[s_no % len(segments)] = "|".join(seg)
    return "\r".join(segments) + "\r"


def mutate_bytes(data: bytes, mutations: list[tuple[int, int, int]]) -> bytes:
    """Byte-level mutations: 0 flip, 1 insert, 2 delete, 3 duplicate a run, 4 truncate."""
    out = bytearray(data)
    for kind, pos, value in mutations:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] ^= value or 1
        elif kind == 1:
            out.insert(i, value)
        elif kind == 2:
            del out[i]
        elif kind == 3:
            out[i:i] = out[i:i + 1 + value % 64]
        else:
            del out[max(1, i):]
    return bytes(out)


byte_mutations = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
field_edits = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 40), field_text), min_size=1, max_size=6)


@st.composite
def hl7_inputs(draw: st.DrawFn) -> bytes:
    sample = draw(st.sampled_from(HL7_SAMPLES)).read_text(encoding="latin-1")
    text = edit_fields(sample, draw(field_edits))
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    data = text.encode(encoding, errors="replace")
    return mutate_bytes(data, draw(byte_mutations)) if draw(st.booleans()) else data


# --- MLLP decoder ---------------------------------------------------------------------------------
mllp_pieces = st.lists(st.one_of(st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r", b"\r", b"MSH|^~\\&|A|B\r"]),
                                 st.binary(max_size=50)), max_size=40)


@given(pieces=mllp_pieces, cuts=st.lists(st.integers(0, 4000), max_size=10), limit=st.integers(1, 300))
def test_mllp_decoder_frames_any_bytes_the_same_however_they_are_split(pieces: list[bytes], cuts: list[int],
                                                                        limit: int) -> None:
    data = b"".join(pieces)
    whole = MLLPDecoder(limit)
    frames, _ = whole.feed(data)
    split = MLLPDecoder(limit)
    got: list[Frame] = []
    edges = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(edges, edges[1:], strict=False):
        some, _problems = split.feed(data[a:b])
        got += some
        assert len(split.pending) <= max(limit, 1024)  # memory stays bounded by the limit
    assert [(g.data, g.size, g.oversized) for g in got] == [(w.data, w.size, w.oversized) for w in frames]
    for w in frames:
        assert b"\x0b" not in w.data and len(w.data) <= max(limit, 1024) and w.oversized == (w.size > limit)
    (whole.close(), split.close())  # never raises


# --- HL7 parser and paths ---------------------------------------------------------------------------
@given(text=st.one_of(st.text(max_size=300), hl7_inputs().map(lambda b: b.decode("latin-1"))))
def test_hl7_parser_reads_or_names_the_error(text: str) -> None:
    try:
        msg = parse_text(text)
    except HL7ParseError as exc:
        assert exc.error.code in (100, 101, 102, 103, 104, 200, 207) and exc.error.text
        return
    assert isinstance(msg, Message) and msg.control_id and msg.message_code
    for seg in msg:
        for n in range(1, seg.field_count + 1):
            seg.raw_field(n)
    msg.content_digest()


@given(text=st.text(max_size=40))
def test_hl7_paths_parse_or_name_the_error(text: str) -> None:
    try:
        parse_path(text)
    except PathError as exc:
        assert str(exc)


# --- the whole HL7 inbound step, against a real database ----------------------------------------------
@given(data=hl7_inputs())
@settings(max_examples=max(10, EXAMPLES // 2))
def test_any_hl7_message_is_stored_and_answered(hl7_stage: tuple[Database, HL7Inbound], data: bytes) -> None:
    db, stage = hl7_stage
    p = stage.prepare(data, "127.0.0.1:1")
    with db.write_session() as s, s.begin():
        stored = stage.apply(s, p)
    assert stored.message_id is not None and stored.ack_code in ("AA", "AE", "AR")
    # no reply only where the sender asked for none (enhanced mode, MSH-15/16 NE, ER or SU)
    assert stored.replies or (p.message is not None and (p.message.accept_ack_type or p.message.application_ack_type))
    for reply in stored.replies:
        ack = parse_text(reply)  # our own ACK always parses
        assert ack.message_code == "ACK" and "[SQL" not in reply and "INSERT" not in reply
    with db.read_session() as s:
        from engine.store.models import Message as Row
        row = s.get(Row, stored.message_id)
        assert row is not None and row.content is not None and row.content.raw == data  # kept exactly


# --- FHIR bodies ------------------------------------------------------------------------------------
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=30)),
                           lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                  st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                           max_leaves=20)


def mutate_json(doc: Any, path: list[int], value: Any) -> Any:
    """Replace (or add) one member somewhere inside ``doc``, choosing the way down with ``path``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    if isinstance(doc, dict):
        keys = sorted(doc)
        key = keys[path[0] % len(keys)]
        return {**doc, key: mutate_json(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], mutate_json(doc[i], path[1:], value), *doc[i + 1:]]


@st.composite
def fhir_bodies(draw: st.DrawFn) -> bytes:
    doc = json.loads(draw(st.sampled_from(FHIR_SAMPLES)).read_text())
    doc.pop("id", None)
    for _ in range(draw(st.integers(1, 4))):
        doc = mutate_json(doc, draw(st.lists(st.integers(0, 50), max_size=6)), draw(json_values))
    body = json.dumps(doc).encode()
    return mutate_bytes(body, draw(byte_mutations)) if draw(st.integers(0, 4)) == 0 else body


@given(body=st.one_of(fhir_bodies(), st.binary(max_size=200)))
def test_fhir_body_is_a_resource_or_a_400(body: bytes) -> None:
    try:
        data = parse_json(body)
        check_resource(data, ("Patient", "ServiceRequest", "Bundle", "ImagingStudy"))
    except FhirError as exc:
        assert exc.status == 400 and exc.issues


@pytest.fixture
def running_engine(workdir: Path, db_url: str) -> Iterator[RunningEngine]:
    e = RunningEngine(make_settings(workdir, db_url)).start()
    yield e
    e.stop()


@given(body=fhir_bodies(), where=st.sampled_from(["Patient", "ServiceRequest", "", "Patient/1"]))
@settings(max_examples=max(10, EXAMPLES // 4))
def test_fhir_requests_over_http_never_get_a_500(running_engine: RunningEngine, body: bytes, where: str) -> None:
    reply = call(running_engine, "PUT" if "/" in where else "POST", where, raw=body)
    assert reply.status < 500, reply.body
    if reply.status >= 400:
        assert reply.issues() and not [t for t in reply.issues() if "[SQL" in t or "Traceback" in t]


# --- DICOM headers ----------------------------------------------------------------------------------
CT = bundled("CT_small.dcm")
CT_BYTES = CT.read_bytes()
HEADER_END = CT_BYTES.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data: mutate the header before it


@given(mutations=st.lists(st.tuples(st.integers(0, 4), st.integers(0, HEADER_END), st.integers(0, 255)),
                          min_size=1, max_size=6))
@example(mutations=[(0, 340, 0)])  # found by the long run: a VR pydicom does not know (NotImplementedError)
def test_dicom_header_reader_reads_or_names_a_status(tmp_path_factory: pytest.TempPathFactory,
                                                     mutations: list[tuple[int, int, int]]) -> None:
    path = tmp_path_factory.mktemp("hdr") / "x.dcm"
    path.write_bytes(mutate_bytes(CT_BYTES[:HEADER_END], mutations) + CT_BYTES[HEADER_END:])
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    try:
        header = read_header(path, command_sop_class=ds.SOPClassUID, command_sop_instance=ds.SOPInstanceUID,
                             transfer_syntax=ds.file_meta.TransferSyntaxUID)
    except HeaderError as exc:
        assert exc.status >= 0xA000 and exc.comment and len(exc.comment) <= 64
        return
    assert header.sop_instance_uid == ds.SOPInstanceUID


dicom_values = st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                         st.sampled_from(["", "19000230", "1.2.3..4", "A" * 70, "\x00", "ISO_IR 999", "-5"]))
DICOM_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyDate", "StudyTime", "Modality", "StudyDescription", "SeriesNumber", "InstanceNumber",
                  "SpecificCharacterSet", "IssuerOfPatientID", "ReferringPhysicianName", "StudyID"]


@given(edits=st.lists(st.tuples(st.sampled_from(DICOM_KEYWORDS), dicom_values), min_size=1, max_size=5))
@settings(max_examples=max(5, EXAMPLES // 10))
def test_dicom_instances_with_hostile_values_get_a_status_from_a_running_engine(
        running_engine: RunningEngine, tmp_path_factory: pytest.TempPathFactory,
        edits: list[tuple[str, str]]) -> None:
    require_dcmtk()

    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in edits:
            tag = pydicom.datadict.tag_for_keyword(keyword)
            assert tag is not None
            vr = pydicom.datadict.dictionary_VR(tag)
            raw = value.encode("latin-1", errors="replace")
            raw += b" " * (len(raw) % 2)
            # the bytes as they are, read only when the file is: no validation on the way in
            ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(raw), raw, 0, True, True)

    obj = make_instance(tmp_path_factory.mktemp("dcm") / "x.dcm", edit=edit)
    res = subprocess.run(["storescu", "-v", "-aec", "RADBRIDGE", "127.0.0.1", str(running_engine.dicom_port),
                          str(obj.path)], capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)
    out = res.stdout + res.stderr
    # storescu may refuse to send a file it cannot read itself; whatever it sent got a status
    if "Sending Store Request" in out or "Received Store Response" in out:
        assert "Received Store Response" in out, out
    echo = subprocess.run(["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(running_engine.dicom_port)],
                          capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)
    assert echo.returncode == 0, echo.stderr
