"""Content the store cannot hold as text, and error answers that must not leak: on SQLite and
PostgreSQL alike, a message is stored (its raw bytes exactly) and answered with a specific ERR,
never an endless AR, and no answer to a peer carries SQL or patient values."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import selectinload

from engine.store.models import Message
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, segment, send


def stored(e: RunningEngine) -> list[Message]:
    with e.db.read_session() as s:
        return list(s.execute(select(Message).order_by(Message.id)
                              .options(selectinload(Message.content), selectinload(Message.events))).scalars())


def test_nul_byte_in_a_field_is_stored_exactly_and_answered_ae_naming_the_field(running: RunningEngine) -> None:
    raw = adt("A01", "N1\x00", "Nul").encode()
    assert b"N1\x00^^^GENHOSP^MR" in raw
    for _ in range(2):  # the resend gets the same answer: nothing wedges
        reply = send(running.mllp_port, raw)
        assert ack_code(reply) == "AE", reply
        err = segment(reply, "ERR")
        assert err[2].startswith("PID^1^3"), err
        assert "NUL" in reply and "N1" not in reply
    rows = stored(running)
    assert [m.status for m in rows] == ["error", "error"]
    assert all(m.content is not None and m.content.raw == raw for m in rows)
    assert "\x00" not in (rows[0].error or "")
    # the feed goes on
    assert ack_code(send(running.mllp_port, adt("A01", "N2", "After"))) == "AA"


def test_nul_byte_in_the_header_is_stored_and_answered(running: RunningEngine) -> None:
    raw = adt("A01", "N3", "Nul", ctrl="C\x00TL").encode()
    reply = send(running.mllp_port, raw)
    assert ack_code(reply) in ("AE", "AR") and "resend" not in reply.lower(), reply
    assert "MSH^1^10" in reply
    (row,) = stored(running)
    assert row.content is not None and row.content.raw == raw
    assert ack_code(send(running.mllp_port, adt("A01", "N4", "After"))) == "AA"


def test_unreadable_message_with_a_nul_in_its_control_id_is_stored_and_rejected(running: RunningEngine) -> None:
    raw = b"MSH|^~\\&|EPIC|GENHOSP|RADBRIDGE|RAD|20240101||\x00|C\x00TL|P|2.5.1\rPID|1||X^^^GENHOSP^MR\r"
    reply = send(running.mllp_port, raw)
    assert ack_code(reply) == "AR" and "resend" not in reply.lower(), reply
    (row,) = stored(running)
    assert row.status == "rejected" and row.content is not None and row.content.raw == raw


def test_reprocessing_a_message_with_a_nul_keeps_it_unapplied(running: RunningEngine) -> None:
    send(running.mllp_port, adt("A01", "N5\x00", "Nul").encode())
    (row,) = stored(running)
    status, body = running.api(f"/api/messages/{row.id}/reprocess", method="POST")
    assert status == 200, body
    (row,) = stored(running)
    assert row.status == "error" and "NUL" in (row.error or "")
    with running.db.read_session() as s:
        from engine.store.models import Patient
        assert s.execute(select(Patient)).first() is None


def test_fhir_body_with_a_nul_character_is_400_naming_where(running: RunningEngine) -> None:
    from tests.fhirutil import call, patient
    body = patient("FN1", family="Sec\u0000ret")
    answer = call(running, "POST", "Patient", body)
    assert answer.status == 400, answer.body
    text = " ".join(answer.issues())
    assert "NUL" in text and "Patient.name" in text and "Sec" not in text and "INSERT" not in text
    assert call(running, "POST", "Patient", patient("FN2")).status == 201


SECRET = "Secretname"


def refuse(e: RunningEngine, table: str, *, when_secret: bool) -> Callable[[], None]:
    """A trigger that makes the database itself refuse rows of ``table`` (on PostgreSQL with the
    row's family name in its message, as real constraint messages carry values); returns its undo."""
    eng = create_engine(e.settings.database_url)
    cond = f"NEW.family_name = '{SECRET}'" if when_secret else "1 = 1"
    with eng.begin() as c:
        if eng.dialect.name == "postgresql":
            value = "NEW.family_name" if when_secret else "'x'"
            c.execute(text(f"CREATE FUNCTION refuse_{table}() RETURNS trigger AS $$ BEGIN IF {cond} THEN "
                           f"RAISE EXCEPTION 'refused %', {value}; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
            c.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW "
                           f"EXECUTE FUNCTION refuse_{table}()"))
        else:
            c.execute(text(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN {cond} "
                           "BEGIN SELECT RAISE(ABORT, 'refused'); END"))

    def undo() -> None:
        with eng.begin() as c:
            c.execute(text(f"DROP TRIGGER refuse_{table}" + (f" ON {table}" if eng.dialect.name == "postgresql" else "")))
        eng.dispose()
    return undo


LEAKS = (SECRET, "INSERT", "SELECT", "[SQL", "parameters", "Traceback")


def test_database_refusal_while_applying_is_ae_without_sql_or_patient_values(running: RunningEngine) -> None:
    undo = refuse(running, "patients", when_secret=True)
    reply = send(running.mllp_port, adt("A01", "S1", SECRET))
    assert ack_code(reply) == "AE", reply
    assert segment(reply, "ERR")[3].startswith("207"), reply
    assert not [w for w in LEAKS if w in reply], reply
    assert "ref " in reply  # the operator finds the detail in the log by this reference
    (row,) = stored(running)
    assert row.status == "error" and not [w for w in LEAKS if w in (row.error or "")]
    details = [str(ev.detail) for ev in row.events if ev.kind == "error"]
    assert details and "refused" in details[0]  # the store keeps the detail
    undo()


def test_storage_failure_answer_has_no_sql_or_patient_values(running: RunningEngine) -> None:
    undo = refuse(running, "message_content", when_secret=False)
    reply = send(running.mllp_port, adt("A01", "S2", SECRET))
    assert ack_code(reply) == "AR" and "not stored" in reply, reply
    assert not [w for w in LEAKS if w in reply], reply
    undo()
    assert ack_code(send(running.mllp_port, adt("A01", "S2", SECRET))) == "AA"


def test_fhir_database_refusal_answers_without_sql_or_patient_values(running: RunningEngine) -> None:
    from tests.fhirutil import call, patient
    undo = refuse(running, "patients", when_secret=True)
    answer = call(running, "POST", "Patient", patient("FS1", family=SECRET))
    assert answer.status >= 400 and answer.status != 503, answer.body
    text_ = " ".join(answer.issues())
    assert not [w for w in LEAKS if w in text_], text_
    assert "ref " in text_
    undo()
