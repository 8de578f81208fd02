"""ADT and orders over real MLLP connections into the store, on SQLite and PostgreSQL.

Messages are sent with python-hl7's MLLPClient (a real client that is not ours)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, selectinload

from engine.connectors.mllp.channel import MllpConnector
from engine.store.models import Message, MessageEvent, Order, OrderStatusChange, Patient, PatientIdentifier
from tests.conftest import SAMPLES, RunningEngine
from tests.hl7util import ack_code, adt, ctrl_id, msh, orm, segment, send, send_many


def patient_by(session: Session, value: str, issuer: str = "GENHOSP") -> Patient | None:
    ident = session.execute(select(PatientIdentifier).where(PatientIdentifier.value == value,
                                                            PatientIdentifier.issuer == issuer)).scalar_one_or_none()
    return ident.patient if ident else None


def q(running: RunningEngine, fn: Any) -> Any:
    with running.db.read_session() as s:
        return fn(s)


def orders_by_accession(running: RunningEngine) -> dict[str, Order]:
    with running.db.read_session() as s:
        return {o.accession: o for o in s.execute(select(Order)).scalars()}


def two_orders(second_has_tq1: bool = False, z_between: bool = True) -> str:
    """An OMI^O23 with two order groups; only the first has a TQ1 and an IPC-3 study UID."""
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


def test_a01_is_acked_after_commit_and_visible_to_another_connection(running: RunningEngine) -> None:
    reply = send(running.mllp_port, (SAMPLES / "adt_a01.hl7").read_bytes())
    # enhanced mode (MSH-15 AL, MSH-16 NE): a commit ACK only
    assert ack_code(reply) == "CA" and segment(reply, "MSA")[2] == "ADT0001"
    other = create_engine(running.settings.database_url)  # a separate connection pool
    with Session(other) as s:
        p = patient_by(s, "100001")
        assert p is not None
        assert (p.family_name, p.given_name, p.birth_date, p.sex) == ("Smith", "John", "1965-04-12", "M")
        kinds = sorted((i.value, i.issuer, i.kind) for i in p.identifiers)
        assert kinds == [("100001", "GENHOSP", "primary"), ("555-44-3333", "SSA", "other"),
                         ("E12345", "GENHOSP", "other")]
        m = s.execute(select(Message).where(Message.control_id == "ADT0001")).scalar_one()
        # the row keeps the application outcome; the reply sent was the commit ACK
        assert (m.status, m.ack_code, m.patient_id, m.message_type) == ("processed", "AA", p.id, "ADT^A01")
        assert m.content is not None and m.content.raw.startswith(b"MSH|") and "MSA|CA" in (m.content.ack or "")
    other.dispose()


def test_a08_updates_and_double_quotes_clear_while_empty_fields_keep(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, adt("A04", "P1", "Brown", "Ann", dob="19800202", sex="F"))) == "AA"
    # A08: new family name, "" for birth date (clear), empty sex (keep)
    msg = adt("A08", "P1", "Browne", "Ann", dob='""', sex="", ts="20240316000000")
    assert ack_code(send(port, msg)) == "AA"
    p = q(running, lambda s: (lambda p: p and (p.family_name, p.birth_date, p.sex, p.version))(patient_by(s, "P1")))
    assert p == ("Browne", None, "F", 2)
    status, body = running.api("/api/patients?identifier=P1")
    history = body["patients"][0]["history"]
    assert [h["kind"] for h in history] == ["created", "updated"]
    assert history[1]["changes"]["fields"] == {"family_name": ["Brown", "Browne"], "birth_date": ["1980-02-02", None]}
    assert history[1]["message_id"] is not None and history[1]["source_time"] == "2024-03-16T00:00:00"


def test_update_for_unknown_patient_creates_it_and_says_so(running: RunningEngine) -> None:
    assert ack_code(send(running.mllp_port, adt("A08", "NEW1", "Late", "Lou"))) == "AA"

    def check(s: Session) -> None:
        assert patient_by(s, "NEW1") is not None
    q(running, check)


def test_stale_update_does_not_overwrite_newer_demographics(running: RunningEngine) -> None:
    port = running.mllp_port
    send(port, adt("A01", "S1", "Newest", ts="20240320120000"))
    ctrl = ctrl_id("OLD")
    assert ack_code(send(port, adt("A08", "S1", "Older", ts="20240301120000", ctrl=ctrl))) == "AA"

    def check(s: Session) -> None:
        assert patient_by(s, "S1").family_name == "Newest"  # type: ignore[union-attr]
        m = s.execute(select(Message).where(Message.control_id == ctrl)).scalar_one()
        notes = s.execute(select(MessageEvent).where(MessageEvent.message_id == m.id)).scalar_one()
        assert "stale update" in (notes.detail or {})["notes"][0]
    q(running, check)


def test_merge_moves_orders_and_keeps_the_old_id_as_alias(running: RunningEngine) -> None:
    port = running.mllp_port
    send_many(port, [adt("A01", "SURV", "Keep"), adt("A01", "GONE", "Dup"),
                     orm("NW", "PM1", "ACCM1", "GONE"), orm("NW", "PM2", "ACCM2", "SURV")])
    assert ack_code(send(port, adt("A40", "SURV", "Keep", mrg="GONE", ts="20240316000000"))) == "AA"
    # a later order under the old ID lands on the survivor
    assert ack_code(send(port, orm("NW", "PM3", "ACCM3", "GONE"))) == "AA"

    def check(s: Session) -> None:
        surv = patient_by(s, "SURV")
        assert surv is not None
        gone_ident = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "GONE")).scalar_one()
        assert gone_ident.patient_id == surv.id and gone_ident.kind == "alias"
        accs = sorted(o.accession or "" for o in s.execute(select(Order).where(Order.patient_id == surv.id)).scalars())
        assert accs == ["ACCM1", "ACCM2", "ACCM3"]
        old = s.execute(select(Patient).where(Patient.merged_into_id == surv.id)).scalar_one()
        assert old.active is False
        merged = [h for h in surv.history if h.kind == "merged"]
        assert len(merged) == 1 and (merged[0].changes or {})["prior_patient"] == old.id
        assert len((merged[0].changes or {})["orders_moved"]) == 1
        assert [h.kind for h in old.history] == ["created", "merged_away"]
    q(running, check)
    # a resent merge is harmless
    assert ack_code(send(port, adt("A40", "SURV", "Keep", mrg="GONE"))) == "AA"


def test_merge_with_unknown_prior_keeps_an_alias_and_identifier_change(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, adt("A40", "S2", "Solo", mrg="NEVERSEEN"))) == "AA"
    send(port, adt("A01", "OLDID", "Renamed"))
    assert ack_code(send(port, adt("A40", "NEWID", "Renamed", mrg="OLDID"))) == "AA"

    def check(s: Session) -> None:
        assert patient_by(s, "NEVERSEEN").id == patient_by(s, "S2").id  # type: ignore[union-attr]
        renamed = patient_by(s, "NEWID")
        assert renamed is not None and renamed.id == patient_by(s, "OLDID").id  # type: ignore[union-attr]
        assert s.execute(select(func.count()).select_from(Patient).where(Patient.family_name == "Renamed")
                         ).scalar() == 1
    q(running, check)


def test_merge_into_itself_is_an_application_error(running: RunningEngine) -> None:
    reply = send(running.mllp_port, adt("A40", "SAME", "X", mrg="SAME"))
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[2].startswith("MRG^1^1")


def test_order_lifecycle_and_status_history(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, (SAMPLES / "orm_o01.hl7").read_bytes())) == "AA"

    def created(s: Session) -> None:
        o = s.execute(select(Order).where(Order.accession == "ACC1001")).scalar_one()
        assert (o.status, o.placer_number, o.filler_number, o.modality) == ("SC", "PL1001", "FL1001", "CR")
        assert o.procedure_text == "Chest X-ray 2 views&PA & lateral"  # \T\ unescaped
        assert o.reason == "Cough | fever"  # \F\ unescaped
        assert o.study_uid == "1.2.840.113619.2.55.3.1001" and o.requested_procedure_id == "RP1001"
        assert o.scheduled_at is not None and o.scheduled_at.isoformat() == "2024-03-20T14:00:00"
        assert o.ordering_provider == "Dr Marcus Welby"
        assert patient_by(s, "100001") is not None  # order before its patient: created from the PID
    q(running, created)
    xo = orm("XO", "PL1001", "ACC1001", "100001", status="IP", ts="20240315084000", proc="71021^Chest 3 views^C4")
    assert ack_code(send(port, xo)) == "AA"
    assert ack_code(send(port, (SAMPLES / "orm_o01_cancel.hl7").read_bytes())) == "AA"
    late = orm("XO", "PL1001", "ACC1001", "100001", status="SC", ts="20240315100000")
    assert ack_code(send(port, late)) == "AA"

    def history(s: Session) -> None:
        o = s.execute(select(Order).where(Order.accession == "ACC1001")).scalar_one()
        assert o.status == "CA" and o.procedure_code == "71021"
        rows = s.execute(select(OrderStatusChange).where(OrderStatusChange.order_id == o.id)
                         .order_by(OrderStatusChange.id)).scalars().all()
        assert [(h.control, h.to_status, h.applied) for h in rows] == [
            ("NW", "SC", True), ("XO", "IP", True), ("CA", "CA", True), ("XO", "SC", False)]
        assert "does not revive" in (rows[-1].note or "")
    q(running, history)


def test_cancel_before_new_order_is_kept_so_the_late_nw_does_not_schedule(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, orm("CA", "PX1", "ACCX1", "PX", ts="20240315090000"))) == "AA"
    assert ack_code(send(port, orm("NW", "PX1", "ACCX1", "PX", ts="20240315080000"))) == "AA"

    def check(s: Session) -> None:
        o = s.execute(select(Order).where(Order.placer_number == "PX1")).scalar_one()
        assert o.status == "CA"
    q(running, check)


def test_two_order_groups_in_one_orm_make_two_orders(running: RunningEngine) -> None:
    one = orm("NW", "PG1", "ACCG1", "G1").rstrip("\r").split("\r")
    two = orm("NW", "PG2", "ACCG2", "G1", proc="74177^CT abdomen^C4", modality="CT").rstrip("\r").split("\r")
    message = "\r".join(one + two[2:]) + "\r"
    assert ack_code(send(running.mllp_port, message)) == "AA"

    def check(s: Session) -> None:
        orders = s.execute(select(Order).order_by(Order.id)).scalars().all()
        assert [(o.accession, o.modality) for o in orders] == [("ACCG1", "CR"), ("ACCG2", "CT")]
    q(running, check)


def test_omi_o23_with_utf8_names_and_ipc_keys(running: RunningEngine) -> None:
    reply = send(running.mllp_port, (SAMPLES / "omi_o23.hl7").read_bytes())
    assert ack_code(reply) == "CA"

    def check(s: Session) -> None:
        p = patient_by(s, "200002")
        assert p is not None and (p.family_name, p.given_name) == ("Müller", "Zoë")
        o = s.execute(select(Order).where(Order.accession == "ACC2002")).scalar_one()
        assert (o.modality, o.station_aet, o.sps_id, o.study_uid) == ("CT", "CT01", "SPS2002",
                                                                    "1.2.840.113619.2.55.3.2002")
    q(running, check)


def test_latin1_name_under_msh18_is_stored_correctly(running: RunningEngine) -> None:
    text = adt("A01", "L1", "Ångström", "Sølvi", msh_extra="||||||8859/1")
    reply = send(running.mllp_port, text.encode("latin-1"), encoding="latin-1")
    assert ack_code(reply) == "AA" and segment(reply, "MSH")[17] == "8859/1"
    assert q(running, lambda s: patient_by(s, "L1").family_name) == "Ångström"  # type: ignore[union-attr]


def test_resent_control_id_is_acked_again_but_applied_once(running: RunningEngine) -> None:
    port = running.mllp_port
    msg = adt("A01", "D1", "Dup")
    first, again = send_many(port, [msg, msg])
    assert ack_code(first) == ack_code(again) == "AA"
    assert "duplicate of message" in segment(again, "MSA")[3]
    other_sender = msg.replace("|EPIC|GENHOSP|", "|OTHERAPP|GENHOSP|")
    assert ack_code(send(port, other_sender)) == "AA"

    def check(s: Session) -> None:
        statuses = s.execute(select(Message.status).order_by(Message.id)).scalars().all()
        assert statuses == ["processed", "duplicate", "processed"]
        dup = s.execute(select(Message).where(Message.status == "duplicate")).scalar_one()
        assert dup.duplicate_of is not None
    q(running, check)


def test_control_ids_differing_after_64_characters_are_two_messages(running: RunningEngine) -> None:
    """MSH-10 may be 199 characters (v2.7+): two IDs sharing their first 64 are distinct messages."""
    stem = "X" * 64
    first = adt("A01", "LC1", "Long", ctrl=stem + "-1")
    second = adt("A01", "LC2", "Long", ctrl=stem + "-2")
    assert [ack_code(r) for r in send_many(running.mllp_port, [first, second])] == ["AA", "AA"]

    def check(s: Session) -> None:
        rows = s.execute(select(Message.status, Message.control_id).order_by(Message.id)).all()
        assert rows == [("processed", stem + "-1"), ("processed", stem + "-2")]
        assert patient_by(s, "LC1") is not None and patient_by(s, "LC2") is not None
    q(running, check)


def test_reused_control_id_with_other_content_is_applied_with_a_warning(running: RunningEngine) -> None:
    """A sender that restarts its counter reuses MSH-10: a different message is applied, never dropped
    as a duplicate; the same message again (even with a new MSH-7 timestamp) stays a duplicate."""
    port = running.mllp_port
    original = adt("A01", "RU1", "Reuse", ctrl="C1")
    other = adt("A01", "RU2", "Other", ctrl="C1")
    restamped = original.replace("|RAD|20240315081500|", "|RAD|20250101000000|", 1)  # MSH-7 only
    assert restamped != original
    replies = send_many(port, [original, other, restamped, other])
    assert [ack_code(r) for r in replies] == ["AA", "AA", "AA", "AA"]
    assert "duplicate" not in replies[1]
    assert "duplicate of message" in segment(replies[2], "MSA")[3]
    assert "duplicate of message" in segment(replies[3], "MSA")[3]

    def check(s: Session) -> None:
        rows = s.execute(select(Message).order_by(Message.id)).scalars().all()
        assert [m.status for m in rows] == ["processed", "processed", "duplicate", "duplicate"]
        assert [m.duplicate_of for m in rows] == [None, None, rows[0].id, rows[1].id]
        assert patient_by(s, "RU2") is not None
        warnings = [e.detail or {} for e in rows[1].events if e.kind == "warning"]
        assert warnings and warnings[0]["reused_control_id_of"] == rows[0].id
        assert not [e for m in rows if m.id != rows[1].id for e in m.events if e.kind == "warning"]
    q(running, check)


def test_enhanced_mode_sends_commit_then_application_ack(running: RunningEngine) -> None:
    from tests.hl7util import frames, raw_exchange
    msg = adt("A01", "E1", "Enh", msh_extra="|||AL|AL")
    data = raw_exchange(running.mllp_port, b"\x0b" + msg.encode() + b"\x1c\r")
    replies = frames(data)
    assert [ack_code(r) for r in replies] == ["CA", "AA"]
    # NE: the sender wants no commit ACK; the next message on the connection is still answered
    quiet = adt("A01", "E2", "Quiet", msh_extra="|||NE|NE")
    loud = adt("A01", "E3", "Loud")
    data = raw_exchange(running.mllp_port, b"".join(b"\x0b" + m.encode() + b"\x1c\r" for m in (quiet, loud)))
    assert [ack_code(r) for r in frames(data)] == ["AA"]
    assert q(running, lambda s: patient_by(s, "E2") is not None)


def test_unsupported_type_event_processing_id_and_version_are_rejected(running: RunningEngine) -> None:
    port = running.mllp_port
    cases = {
        "200": msh("ORU^R01", ctrl_id()) + "\rOBR|1\r",
        "201": msh("ORM^O02", ctrl_id()) + "\rPID|1||1\r",
        "202": (msh("ADT^A01", ctrl_id()) + "\rPID|1||1\r").replace("|P|2.5.1", "|X|2.5.1"),
        "203": msh("ADT^A01", ctrl_id(), version="9.9") + "\rPID|1||1\r",
    }
    for code, msg in cases.items():
        reply = send(port, msg)
        assert ack_code(reply) == "AR", (code, reply)
        assert segment(reply, "ERR")[3].startswith(code + "^"), reply

    def check(s: Session) -> None:
        assert s.execute(select(func.count()).select_from(Message).where(Message.status == "rejected")).scalar() == 4
    q(running, check)


def test_invalid_birth_date_is_ae_with_location_and_nothing_applied(running: RunningEngine) -> None:
    ctrl = ctrl_id("BAD")
    reply = send(running.mllp_port, adt("A01", "BD1", "Bad", dob="19651341", ctrl=ctrl))
    assert ack_code(reply) == "AE"
    err = segment(reply, "ERR")
    assert err[2] == "PID^1^7^1^1" and err[3].startswith("102^")
    assert "19651341" in err[8]

    def check(s: Session) -> None:
        assert patient_by(s, "BD1") is None
        m = s.execute(select(Message).where(Message.control_id == ctrl).options(selectinload(Message.content))
                      ).scalar_one()
        assert m.status == "error" and "PID-7" in (m.error or "") and m.content is not None
    q(running, check)


def test_concurrent_senders_are_all_applied(running: RunningEngine) -> None:
    import concurrent.futures
    port = running.mllp_port

    def sender(n: int) -> list[str]:
        return [ack_code(r) for r in send_many(port, [adt("A01", f"C{n}-{i}", f"Conc{n}") for i in range(25)])]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = [c for batch in pool.map(sender, range(8)) for c in batch]
    assert codes == ["AA"] * 200
    assert q(running, lambda s: s.execute(select(func.count()).select_from(Patient)).scalar()) == 200


# --- regressions found in review: patients ------------------------------------------------------------


def test_phone_is_cleared_by_double_quotes(running: RunningEngine) -> None:
    """Review regression: the sample A08's PID-13 "" removes the patient.extra.phone its A01 set."""
    send(running.mllp_port, (SAMPLES / "adt_a01.hl7").read_bytes())
    with running.db.read_session() as s:
        p = s.execute(select(Patient)).scalar_one()
        assert (p.extra or {}).get("phone") == "(217)555-0100"
    send(running.mllp_port, (SAMPLES / "adt_a08.hl7").read_bytes())
    with running.db.read_session() as s:
        assert "phone" not in (s.execute(select(Patient)).scalar_one().extra or {})


def test_an_a01_overtaken_by_its_a08_still_adds_its_identifiers(running: RunningEngine) -> None:
    """Review regression: an A01 arriving after its A08 (older event time) is stale for the
    demographics, but the identifiers it brings (an SSN here) are still added to the patient."""
    port = running.mllp_port
    assert ack_code(send(port, adt("A08", "OVT", "Newer", ts="20240320000000"))) == "AA"
    assert ack_code(send(port, adt("A01", "OVT", "Older", ts="20240301000000",
                                   pid_extra="~999-00-1111^^^SSA^SS"))) == "AA"
    with running.db.read_session() as s:
        ident = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "999-00-1111")).scalar_one()
        owner = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "OVT")).scalar_one()
        assert ident.patient_id == owner.patient_id
        assert owner.patient.family_name == "Newer"  # the older demographics did not win


def test_patient_created_by_an_order_still_takes_an_earlier_adt(running: RunningEngine) -> None:
    """Review regression: a patient created from an order's PID does not take the order's event
    time, so an ADT that arrives later with an earlier EVN-2 is applied, not dropped as stale."""
    port = running.mllp_port
    assert ack_code(send(port, orm("NW", "PE1", "ACCE1", "EARLY", family="FromOrder", ts="20240320000000"))) == "AA"
    assert ack_code(send(port, adt("A04", "EARLY", "FromAdt", ts="20240310000000"))) == "AA"
    with running.db.read_session() as s:
        ident = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "EARLY")).scalar_one()
        assert ident.patient.family_name == "FromAdt"


# --- regressions found in review: orders --------------------------------------------------------------


def test_second_order_does_not_inherit_the_first_orders_segments(running: RunningEngine) -> None:
    """Review regression: an order group reads only its own segments: the second order, without
    a TQ1 or an IPC-3 of its own (and after a Z segment), takes neither the first order's scheduled
    time nor its study UID, and each order keeps its own ORC-9 event time."""
    assert ack_code(send(running.mllp_port, two_orders())) == "AA"
    o = orders_by_accession(running)
    assert o["ACCA"].scheduled_at is not None and o["ACCA"].study_uid == "1.2.3.1"
    assert o["ACCB"].scheduled_at is None  # no TQ1 in its group: not the first order's time
    assert o["ACCB"].study_uid is None  # no IPC-3: not the first order's UID
    assert (o["ACCA"].source_time, o["ACCB"].source_time) == ("2024-03-01T08:00:00", "2024-03-02T08:00:00")


def test_hold_holds_whatever_orc5_says(running: RunningEngine) -> None:
    """Review regression: an HD whose ORC-5 still says IP puts the order on hold (HD): for a hold
    the control code decides the status, not ORC-5."""
    send(running.mllp_port, orm("NW", "PH1", "ACCH1", "HOLD"))
    assert ack_code(send(running.mllp_port, orm("HD", "PH1", "ACCH1", "HOLD", status="IP"))) == "AA"
    assert orders_by_accession(running)["ACCH1"].status == "HD"


def test_a_cancel_with_another_patients_pid_does_not_move_the_order(running: RunningEngine) -> None:
    """Review regression: a CA whose PID names another patient cancels the order without moving
    it to that patient (a cancel identifies the order; it does not re-attach it)."""
    send(running.mllp_port, orm("NW", "PMV1", "ACCMV1", "OWNER"))
    assert ack_code(send(running.mllp_port, orm("CA", "PMV1", "ACCMV1", "STRANGER"))) == "AA"
    with running.db.read_session() as s:
        o = s.execute(select(Order).where(Order.accession == "ACCMV1")).scalar_one()
        owner = s.execute(select(PatientIdentifier).where(PatientIdentifier.value == "OWNER")).scalar_one()
        assert o.status == "CA" and o.patient_id == owner.patient_id


def test_null_order_control_is_refused(running: RunningEngine) -> None:
    """Review regression: ORC-1 sent as "" (null) is refused, AE 101 at ORC-1, instead of being
    applied with a default control; no order is made."""
    reply = send(running.mllp_port, orm('""', "PN1", "ACCN1", "NULLCTL"))
    assert ack_code(reply) == "AE" and segment(reply, "ERR")[1].startswith("ORC^1^1^101&")
    assert "ACCN1" not in orders_by_accession(running)


# --- regressions found in review: where an error is reported (ERR) --------------------------------------


def test_errors_in_the_second_group_name_its_occurrence(running: RunningEngine) -> None:
    """Review regression: a bad value in the second order group's TQ1 is reported at TQ1^2 (the
    occurrence it is in), not at the first group's TQ1."""
    msg = two_orders(second_has_tq1=True).replace("20240322090000", "2024-03-22")
    reply = send(running.mllp_port, msg)
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[2].startswith("TQ1^2^7"), reply


def test_a_refusal_in_the_first_order_names_the_first_orders_segment(running: RunningEngine) -> None:
    """Review regression: an unsupported control code (SN) in the first of two order groups is
    reported at the first ORC (ORC^1), not at the last one."""
    one = orm("SN", "PR1", "ACCR1", "REF").rstrip("\r").split("\r")  # SN: a control we do not support
    two = orm("NW", "PR2", "ACCR2", "REF").rstrip("\r").split("\r")
    reply = send(running.mllp_port, "\r".join(one + two[2:]) + "\r")
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[1].startswith("ORC^1^1^103&"), reply  # not ORC^2


def test_required_error_text_names_the_groups_occurrence(running: RunningEngine) -> None:
    """Review regression: a required field missing in the second order group is named with its
    occurrence both in the error text (ORC[2]-1) and in ERR-1 (ORC^2)."""
    one = orm("NW", "PQ1", "ACCQ1", "REQ").rstrip("\r").split("\r")
    two = orm("", "PQ2", "ACCQ2", "REQ").rstrip("\r").split("\r")
    reply = send(running.mllp_port, "\r".join(one + two[2:]) + "\r")
    assert ack_code(reply) == "AE"
    assert "ORC[2]-1" in reply and segment(reply, "ERR")[1].startswith("ORC^2^1^101&"), reply


def test_missing_order_numbers_error_points_at_the_mapped_field(running: RunningEngine) -> None:
    """Review regression: an order without placer, filler or accession number is AE 101 at ORC-2,
    the field order.placer_number is mapped from."""
    reply = send(running.mllp_port, orm("NW", "", "", "NONUM").replace("^EPIC|F^RIS", "|"))
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[1].startswith("ORC^1^2^101&"), reply


# --- regressions found in review: limits ------------------------------------------------------------


def test_overlong_value_is_ae_104_and_the_message_kept(running: RunningEngine) -> None:
    """Review regression: a value longer than its column (a 200-character family name) is AE 104
    at its field (not truncated, not a database error), and the message is kept as an error."""
    reply = send(running.mllp_port, adt("A01", "LONG1", "X" * 200))
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[3].startswith("104^") and segment(reply, "ERR")[2].startswith("PID^1^5")
    with running.db.read_session() as s:
        assert s.execute(select(Message.status).where(Message.ack_code == "AE")).scalar_one() == "error"


@pytest.mark.parametrize("message,field", [
    (adt("A40", "M1", "Merge", mrg="X" * 70), "MRG^1^1"),
    (adt("A01", "T1", "Type", pid_extra="").replace("^MR|", "^" + "T" * 20 + "|"), "PID^1^3"),
])
def test_overlong_merge_ids_and_identifier_types_are_ae_104(running: RunningEngine, message: str, field: str) -> None:
    """Review regression: an overlong prior identifier (MRG-1) or identifier type code (PID-3.5)
    is AE 104 at its field, like any other value longer than its column."""
    reply = send(running.mllp_port, message)
    assert ack_code(reply) == "AE"
    err = segment(reply, "ERR")
    assert err[3].startswith("104^") and err[2].startswith(field), reply


# --- regressions found in review: resends and ACK modes ---------------------------------------------


def test_resend_after_ae_is_applied_once_the_data_is_good(running: RunningEngine) -> None:
    """Review regression: a resend (same control ID) of a message that got AE is processed again,
    not re-ACKed as a duplicate, so once its data is fixed it is applied."""
    bad = adt("A01", "RS1", "Resend", dob="notadate", ctrl="RESEND1")
    assert ack_code(send(running.mllp_port, bad)) == "AE"
    good = bad.replace("notadate", "19700101")
    assert ack_code(send(running.mllp_port, good)) == "AA"
    with running.db.read_session() as s:
        assert s.execute(select(Patient).join(PatientIdentifier).where(PatientIdentifier.value == "RS1")
                         ).scalar_one() is not None


def test_storage_failure_in_enhanced_mode_is_ce(running: RunningEngine) -> None:
    """Review regression: in enhanced mode (MSH-15 AL) a storage failure is answered with a
    commit reject, CE, that carries the reason."""
    from engine.pipeline.hl7_inbound import HL7Inbound
    inbound: HL7Inbound = running.engine.connector("hl7-inbound", MllpConnector).inbound
    p = inbound.prepare(adt("A01", "CE1", "X", msh_extra="|||AL|NE").encode())
    (reply,) = inbound.storage_failure_acks(p, "disk full")
    assert ack_code(reply) == "CE" and "disk full" in reply
