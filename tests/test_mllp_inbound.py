"""ADT and orders over real MLLP connections into the store, on SQLite and PostgreSQL.

Messages are sent with python-hl7's MLLPClient (a real client that is not ours)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, selectinload

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
    p = q(running, lambda s: (lambda p: (p.family_name, p.birth_date, p.sex, p.version))(patient_by(s, "P1")))
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
        assert "stale update" in notes.detail["notes"][0]
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
        accs = sorted(o.accession for o in s.execute(select(Order).where(Order.patient_id == surv.id)).scalars())
        assert accs == ["ACCM1", "ACCM2", "ACCM3"]
        old = s.execute(select(Patient).where(Patient.merged_into_id == surv.id)).scalar_one()
        assert old.active is False
        merged = [h for h in surv.history if h.kind == "merged"]
        assert len(merged) == 1 and merged[0].changes["prior_patient"] == old.id
        assert len(merged[0].changes["orders_moved"]) == 1
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
