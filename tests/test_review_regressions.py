"""Regressions found in review: order groups, event times, nulls, limits and ACK modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from engine.channels import load_channels
from engine.connectors.mllp.channel import MllpConnector
from engine.connectors.registry import connector_specs
from engine.mappings.registry import load_mapping_file
from engine.store.models import Message, Order, Patient, PatientIdentifier
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, msh, orm, segment, send


def two_orders(second_has_tq1: bool = False, z_between: bool = True) -> str:
    segs = [msh("OMI^O23^OMI_O23", "TWO1"), "PID|1||TW1^^^GENHOSP^MR||Two^Orders||19700101|F",
            "ORC|NW|PA^EPIC|FA^RIS||SC||||20240301080000", "TQ1|1||||||20240320090000",
            "OBR|1|PA^EPIC|FA^RIS|A^Exam A", "IPC|ACCA^RIS|RPA|1.2.3.1|SPSA|CT"]
    if z_between:
        segs.append("ZOB|site data")
    segs += ["ORC|NW|PB^EPIC|FB^RIS||SC||||20240302080000"]
    if second_has_tq1:
        segs.append("TQ1|1||||||20240322090000")
    segs += ["OBR|1|PB^EPIC|FB^RIS|B^Exam B", "IPC|ACCB^RIS|RPB||SPSB|MR"]
    return "\r".join(segs) + "\r"


def orders(running: RunningEngine) -> dict[str, Order]:
    with running.db.read_session() as s:
        return {o.accession: o for o in s.execute(select(Order)).scalars()}


def test_second_order_does_not_inherit_the_first_orders_segments(running: RunningEngine) -> None:
    assert ack_code(send(running.mllp_port, two_orders())) == "AA"
    o = orders(running)
    assert o["ACCA"].scheduled_at is not None and o["ACCA"].study_uid == "1.2.3.1"
    assert o["ACCB"].scheduled_at is None  # no TQ1 in its group: not the first order's time
    assert o["ACCB"].study_uid is None  # no IPC-3: not the first order's UID
    assert (o["ACCA"].source_time, o["ACCB"].source_time) == ("2024-03-01T08:00:00", "2024-03-02T08:00:00")


def test_errors_in_the_second_group_name_its_occurrence(running: RunningEngine) -> None:
    msg = two_orders(second_has_tq1=True).replace("20240322090000", "2024-03-22")
    reply = send(running.mllp_port, msg)
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[2].startswith("TQ1^2^7"), reply


def test_missing_order_numbers_error_points_at_the_mapped_field(running: RunningEngine) -> None:
    reply = send(running.mllp_port, orm("NW", "", "", "NONUM").replace("^EPIC|F^RIS", "|"))
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[1].startswith("ORC^1^2^101&"), reply


def test_patient_created_by_an_order_still_takes_an_earlier_adt(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, orm("NW", "PE1", "ACCE1", "EARLY", family="FromOrder", ts="20240320000000"))) == "AA"
    assert ack_code(send(port, adt("A04", "EARLY", "FromAdt", ts="20240310000000"))) == "AA"
    with running.db.read_session() as s:
        ident = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "EARLY")).scalar_one()
        assert ident.patient.family_name == "FromAdt"


def test_null_order_control_is_refused(running: RunningEngine) -> None:
    reply = send(running.mllp_port, orm('""', "PN1", "ACCN1", "NULLCTL"))
    assert ack_code(reply) == "AE" and segment(reply, "ERR")[1].startswith("ORC^1^1^101&")
    assert "ACCN1" not in orders(running)


def test_hold_holds_whatever_orc5_says(running: RunningEngine) -> None:
    send(running.mllp_port, orm("NW", "PH1", "ACCH1", "HOLD"))
    assert ack_code(send(running.mllp_port, orm("HD", "PH1", "ACCH1", "HOLD", status="IP"))) == "AA"
    assert orders(running)["ACCH1"].status == "HD"


def test_overlong_value_is_ae_104_and_the_message_kept(running: RunningEngine) -> None:
    reply = send(running.mllp_port, adt("A01", "LONG1", "X" * 200))
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[3].startswith("104^") and segment(reply, "ERR")[2].startswith("PID^1^5")
    with running.db.read_session() as s:
        assert s.execute(select(Message.status).where(Message.ack_code == "AE")).scalar_one() == "error"


def test_resend_after_ae_is_applied_once_the_data_is_good(running: RunningEngine) -> None:
    bad = adt("A01", "RS1", "Resend", dob="notadate", ctrl="RESEND1")
    assert ack_code(send(running.mllp_port, bad)) == "AE"
    good = bad.replace("notadate", "19700101")
    assert ack_code(send(running.mllp_port, good)) == "AA"
    with running.db.read_session() as s:
        assert s.execute(select(Patient).join(PatientIdentifier).where(PatientIdentifier.value == "RS1")
                         ).scalar_one() is not None


def test_storage_failure_in_enhanced_mode_is_ce(running: RunningEngine) -> None:
    from engine.pipeline.hl7_inbound import HL7Inbound
    inbound: HL7Inbound = running.engine.connector("hl7-inbound", MllpConnector).inbound
    p = inbound.prepare(adt("A01", "CE1", "X", msh_extra="|||AL|NE").encode())
    (reply,) = inbound.storage_failure_acks(p, "disk full")
    assert ack_code(reply) == "CE" and "disk full" in reply


def test_send_shows_both_acks_in_enhanced_mode(running: RunningEngine, tmp_path: Path) -> None:
    import subprocess
    import sys
    f = tmp_path / "alal.hl7"
    f.write_text(adt("A01", "AL1", "Both", msh_extra="|||AL|AL") + adt("A01", "AL2", "Both", msh_extra="|||AL|AL"))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "send", "hl7", str(f), "--to",
                          f"127.0.0.1:{running.mllp_port}"], capture_output=True, text=True, timeout=60)
    lines = [line.split("  ")[0] for line in out.stdout.splitlines()]
    assert lines == ["message 1/2: CA", "message 1/2: AA", "message 2/2: CA", "message 2/2: AA"], out.stdout


def test_phone_is_cleared_by_double_quotes(running: RunningEngine) -> None:
    from tests.conftest import SAMPLES
    send(running.mllp_port, (SAMPLES / "adt_a01.hl7").read_bytes())
    with running.db.read_session() as s:
        p = s.execute(select(Patient)).scalar_one()
        assert (p.extra or {}).get("phone") == "(217)555-0100"
    send(running.mllp_port, (SAMPLES / "adt_a08.hl7").read_bytes())
    with running.db.read_session() as s:
        assert "phone" not in (s.execute(select(Patient)).scalar_one().extra or {})


@pytest.mark.parametrize("body,message", [
    ("patient.identifiers: PID-3", "patient.identifiers is a list"),
    ("patient.family_name: {from: PID-5, each: {value: 1}}", "each: makes a list"),
])
def test_list_and_single_fields_cannot_be_confused(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(f"source: hl7v2\nfields:\n  patient.id: PID-3.1\n  {body}\n")
    mapping, problems = load_mapping_file(f)
    assert mapping is None and any(message in str(p) and ":4:" in str(p) for p in problems)


def test_zero_idle_timeout_and_wildcard_codes(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\noptions:\n  idle_timeout_seconds: 0\n"
                                     "routes:\n  - messages: [O*^O01]\n    action: ignore\n")
    channels, problems = load_channels(tmp_path, connector_specs())
    assert any("options.idle_timeout_seconds: must be greater than 0" in str(p) for p in problems)
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\n"
                                     "routes:\n  - messages: [O*^O01]\n    action: ignore\n")
    (ch,), _ = load_channels(tmp_path, connector_specs())
    assert ch.knows_code("ORM") and not ch.knows_code("ADT")


def test_each_honours_select_matches_and_repetition(tmp_path: Path) -> None:
    from engine.hl7.message import parse_message
    from engine.hl7.paths import SegmentSource
    f = tmp_path / "m.yaml"
    f.write_text("source: hl7v2\nfields:\n  patient.identifiers: {from: PID-3, select: {5: MR}, each: {value: 1}}\n")
    mapping, _ = load_mapping_file(f)
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||1^^^H^MR~2^^^H^SS~3^^^K^MR\r"
    assert mapping is not None
    assert mapping.apply(SegmentSource(parse_message(raw))).values["patient.identifiers"] == [
        {"value": "1"}, {"value": "3"}]
    f.write_text("source: hl7v2\nfields:\n  patient.identifiers: {from: PID-3(2), each: {value: 1}}\n")
    mapping, _ = load_mapping_file(f)
    assert mapping is not None
    assert mapping.apply(SegmentSource(parse_message(raw))).values["patient.identifiers"] == [{"value": "2"}]


def test_channel_lists_each_mapping_problem_once(running: RunningEngine) -> None:
    f = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    f.write_text(f.read_text() + "  patient.extra.beyond: PID-99\n")
    running.engine.mappings.reload_changed()
    ch = next(c for c in running.api("/api/channels")[1]["channels"] if c["name"] == "hl7-inbound")
    assert sum("PID-99" in p for p in ch["mapping_problems"]) == 1



def test_a_refusal_in_the_first_order_names_the_first_orders_segment(running: RunningEngine) -> None:
    one = orm("SN", "PR1", "ACCR1", "REF").rstrip("\r").split("\r")  # SN: a control we do not support
    two = orm("NW", "PR2", "ACCR2", "REF").rstrip("\r").split("\r")
    reply = send(running.mllp_port, "\r".join(one + two[2:]) + "\r")
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[1].startswith("ORC^1^1^103&"), reply  # not ORC^2


def test_required_error_text_names_the_groups_occurrence(running: RunningEngine) -> None:
    one = orm("NW", "PQ1", "ACCQ1", "REQ").rstrip("\r").split("\r")
    two = orm("", "PQ2", "ACCQ2", "REQ").rstrip("\r").split("\r")
    reply = send(running.mllp_port, "\r".join(one + two[2:]) + "\r")
    assert ack_code(reply) == "AE"
    assert "ORC[2]-1" in reply and segment(reply, "ERR")[1].startswith("ORC^2^1^101&"), reply


def test_a_cancel_with_another_patients_pid_does_not_move_the_order(running: RunningEngine) -> None:
    send(running.mllp_port, orm("NW", "PMV1", "ACCMV1", "OWNER"))
    assert ack_code(send(running.mllp_port, orm("CA", "PMV1", "ACCMV1", "STRANGER"))) == "AA"
    with running.db.read_session() as s:
        o = s.execute(select(Order).where(Order.accession == "ACCMV1")).scalar_one()
        owner = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "OWNER")).scalar_one()
        assert o.status == "CA" and o.patient_id == owner.patient_id


@pytest.mark.parametrize("message,field", [
    (adt("A40", "M1", "Merge", mrg="X" * 70), "MRG^1^1"),
    (adt("A01", "T1", "Type", pid_extra="").replace("^MR|", "^" + "T" * 20 + "|"), "PID^1^3"),
])
def test_overlong_merge_ids_and_identifier_types_are_ae_104(running: RunningEngine, message: str, field: str) -> None:
    reply = send(running.mllp_port, message)
    assert ack_code(reply) == "AE"
    err = segment(reply, "ERR")
    assert err[3].startswith("104^") and err[2].startswith(field), reply


def test_zero_message_size_says_greater_than_zero(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\noptions:\n  max_message_bytes: 0\n"
                                     "routes:\n  - messages: [ADT^*]\n    action: ignore\n")
    _channels, problems = load_channels(tmp_path, connector_specs())
    assert [str(p).split(": ", 1)[1] for p in problems] == ["options.max_message_bytes: must be greater than 0"]


def test_an_a01_overtaken_by_its_a08_still_adds_its_identifiers(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, adt("A08", "OVT", "Newer", ts="20240320000000"))) == "AA"
    assert ack_code(send(port, adt("A01", "OVT", "Older", ts="20240301000000",
                                   pid_extra="~999-00-1111^^^SSA^SS"))) == "AA"
    with running.db.read_session() as s:
        ident = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "999-00-1111")).scalar_one()
        owner = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "OVT")).scalar_one()
        assert ident.patient_id == owner.patient_id
        assert owner.patient.family_name == "Newer"  # the older demographics did not win
