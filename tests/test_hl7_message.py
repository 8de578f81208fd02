"""The cheap parser: separators, escapes, empty vs "" null, repetitions, charsets, and its errors."""

from __future__ import annotations

import pytest

from engine.hl7 import errors as E
from engine.hl7.ack import build_ack
from engine.hl7.errors import HL7Error, HL7ParseError
from engine.hl7.message import NULL, escape, parse_message, split_groups, unescape
from engine.hl7.paths import PathError, SegmentSource, parse_path
from tests.conftest import SAMPLES


def read(msg_bytes: bytes, path: str) -> object:
    m = parse_message(msg_bytes)
    p = parse_path(path)
    src = SegmentSource(m)
    return src.read_all(p) if p.all_repetitions else src.read(p)


def test_header_fields_of_a_standard_adt() -> None:
    m = parse_message((SAMPLES / "adt_a01.hl7").read_bytes())
    assert (m.message_type, m.message_structure, m.control_id, m.version) == ("ADT^A01", "ADT_A01", "ADT0001", "2.5.1")
    assert (m.sending_application, m.sending_facility) == ("EPIC", "GENHOSP")
    assert (m.accept_ack_type, m.application_ack_type) == ("AL", "NE")


def test_repetitions_components_and_subcomponents() -> None:
    raw = (SAMPLES / "adt_a01.hl7").read_bytes()
    assert read(raw, "PID-3(2).1") == "555-44-3333"
    assert read(raw, "PID-3(*).5") == ["MR", "SS", "PI"]
    assert read(raw, "PID-3(3).4.2") == "1.2.3.4"
    assert read(raw, "PID-3(3).4") == "GENHOSP&1.2.3.4&ISO"  # composite left as sent
    assert read(raw, "PID-5.5") == "Dr"
    assert read(raw, "PID-99") is None
    assert read(raw, "ZZZ-1") is None


@pytest.mark.parametrize("escaped,plain", [
    ("A\\F\\B", "A|B"), ("A\\S\\B", "A^B"), ("A\\T\\B", "A&B"), ("A\\R\\B", "A~B"),
    ("A\\E\\B", "A\\B"), ("line1\\.br\\line2", "line1\nline2"), ("\\X41\\\\X42\\", "AB"),
    ("\\H\\bold\\N\\", "bold"),
])
def test_escape_sequences(escaped: str, plain: str) -> None:
    raw = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rNTE|1||{escaped}\r".encode()
    assert read(raw, "NTE-3") == plain


def test_escape_round_trip() -> None:
    text = "a|b^c&d~e\\f\ng"
    from engine.hl7.message import DEFAULT_SEPARATORS
    assert unescape(escape(text), DEFAULT_SEPARATORS) == text


def test_empty_field_is_none_and_double_quotes_are_null() -> None:
    raw = (SAMPLES / "adt_a08.hl7").read_bytes()
    assert read(raw, "PID-13") is NULL  # "" : delete the phone number
    assert read(raw, "PID-12") is None  # empty: no information


def test_custom_separators_are_honoured() -> None:
    raw = b"MSH#$%@*#A#B#C#D#20240101##ADT$A08#X1#P#2.5\rPID#1##123$$$HOSP$MR~ignored##Doe$Jo\r"
    m = parse_message(raw)
    assert m.message_type == "ADT^A08"
    assert read(raw, "PID-3.4") == "HOSP"
    assert read(raw, "PID-5.2") == "Jo"


@pytest.mark.parametrize("raw,code,field", [
    (b"PID|1||123\r", E.SEGMENT_SEQUENCE, None),
    (b"MSH|^~\\\\&|A\r", E.DATA_TYPE_ERROR, 2),
    (b"MSH|^^\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r", E.DATA_TYPE_ERROR, 2),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r", E.REQUIRED_FIELD_MISSING, 10),
    (b"MSH|^~\\&|A|B|C|D|2024|||1|P|2.5\r", E.REQUIRED_FIELD_MISSING, 9),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1\rMSH|^~\\&|A\r", E.SEGMENT_SEQUENCE, None),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rP@D|1\r", E.SEGMENT_SEQUENCE, None),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||KLINGON\r", E.TABLE_VALUE_NOT_FOUND, 18),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||ASCII\rPID|1||\xc3\xa9\r", E.DATA_TYPE_ERROR, 18),
])
def test_unreadable_messages_raise_with_a_location(raw: bytes, code: int, field: int | None) -> None:
    with pytest.raises(HL7ParseError) as info:
        parse_message(raw)
    assert info.value.error.code == code
    assert info.value.error.field == field


def test_msh18_charsets_decode_names() -> None:
    latin = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||8859/1\rPID|1||1||Müller^Zoë\r".encode("latin-1")
    utf8 = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller^Zoë\r".encode()
    for raw, codec in ((latin, "latin-1"), (utf8, "utf-8")):
        assert parse_message(raw, fallback_charset=None).charset == codec
        assert read(raw, "PID-5.1") == "Müller"
        assert read(raw, "PID-5.2") == "Zoë"


def test_undeclared_latin1_falls_back_to_cp1252_or_is_rejected() -> None:
    raw = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1||1||Müller\r".encode("latin-1")
    assert SegmentSource(parse_message(raw)).read(parse_path("PID-5")) == "Müller"
    with pytest.raises(HL7ParseError) as info:
        parse_message(raw, fallback_charset=None)
    assert info.value.error.field == 18


def test_lf_and_crlf_segment_terminators_are_accepted() -> None:
    for sep in (b"\n", b"\r\n"):
        m = parse_message(sep.join([b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5", b"PID|1||42"]))
        assert [s.name for s in m.segments] == ["MSH", "PID"]


def test_order_groups_split_at_each_orc() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|2024||ORM^O01|1|P|2.3\rPID|1||1\rORC|NW|P1\rOBR|1|P1\rORC|NW|P2\rOBR|1|P2\rZXX|1\r"
    groups = split_groups(parse_message(raw), "ORC", ("ORC", "OBR"))
    assert [[s.name for s in g] for g in groups] == [["ORC", "OBR"], ["ORC", "OBR"]]
    m = parse_message(raw)
    assert SegmentSource(m, groups[1]).read(parse_path("OBR-2")) == "P2"
    assert SegmentSource(m, groups[1]).read(parse_path("PID-3")) == "1"


@pytest.mark.parametrize("bad", ["PID5", "PID-0", "pid-5", "PID-3(0)", "PID-5.0", "PID-5..1", "PIDX-1"])
def test_bad_paths_are_refused(bad: str) -> None:
    with pytest.raises(PathError):
        parse_path(bad)


def test_ack_mirrors_the_sender_and_carries_err_in_version_layout() -> None:
    m = parse_message((SAMPLES / "adt_a01.hl7").read_bytes())
    err = HL7Error(E.DATA_TYPE_ERROR, "bad | date", segment="PID", sequence=1, field=7)
    ack = build_ack("AE", original=m, errors=[err]).split("\r")
    msh = ack[0].split("|")
    assert msh[2:6] == ["RADBRIDGE", "RAD", "EPIC", "GENHOSP"]
    assert msh[8] == "ACK^A01^ACK" and msh[11] == "2.5.1"
    assert ack[1].split("|")[:3] == ["MSA", "AE", "ADT0001"]
    errf = ack[2].split("|")
    assert errf[2] == "PID^1^7^1" and errf[3].startswith("102^") and errf[4] == "E"
    assert "bad \\F\\ date" in ack[2]
    old = parse_message((SAMPLES / "orm_o01.hl7").read_bytes())  # v2.3.1: ERR-1 ELD layout
    err1 = build_ack("AE", original=old, errors=[err]).split("\r")[2].split("|")
    assert err1[1].startswith("PID^1^7^102&")


def test_ack_declares_the_senders_charset_in_msh18() -> None:
    m = parse_message((SAMPLES / "omi_o23.hl7").read_bytes())
    ack = parse_message(build_ack("AA", original=m).encode("utf-8"))
    assert ack.charset_declared == "UNICODE UTF-8"


def test_ack_timestamps_are_the_local_time_of_their_second() -> None:
    """hl7_timestamp keeps the text of the last second it wrote; other seconds get their own."""
    import time

    from engine.hl7.ack import hl7_timestamp

    def expected(t: float) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.localtime(t)) + time.strftime("%z", time.localtime(t))
    base = 1_780_000_000.0
    for t in (base, base + 0.25, base + 0.999, base + 1.0, base + 3600.5, base):
        assert hl7_timestamp(t) == expected(t), t
    now = hl7_timestamp()
    assert len(now) == 19 and now[:8].isdigit()
