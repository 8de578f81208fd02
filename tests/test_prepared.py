"""The store's prepared-statement fast path (engine/store/prepared.py), on SQLite and PostgreSQL:
what it writes and reads is what SQLAlchemy Core writes and reads (types converted the same way),
driver errors surface as SQLAlchemy's exception classes, statements it cannot run faithfully are
refused when prepared, and its SAVEPOINT rolls back only its own work."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from engine.domain.records import (
    IDENTIFIERS,
    MESSAGES,
    OWNERS_AT_ONCE,
    PATIENTS,
    add,
    add_many,
    fetch,
    fetch_all,
    identifier_owners,
    update_row,
)
from engine.store.db import Database
from engine.store.prepared import Prepared, UnpreparableStatement, pipelined, savepoint

PATIENT_BY_FAMILY = select(PATIENTS).where(PATIENTS.c.family_name == bindparam("family")).order_by(PATIENTS.c.id)



def test_rows_written_on_the_driver_read_back_through_core_with_the_same_types(db: Database) -> None:
    born = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    with db.writer.begin() as conn:
        pid = add(conn, PATIENTS, family_name="Doe", given_name="Jane", birth_date="1980-01-01", sex="F",
                  extra={"race": ["2106-3"], "vip": True})
        update_row(conn, PATIENTS, pid, given_name="Janet")
        mid = add(conn, MESSAGES, channel="c", control_id="X1", received_at=born, status="processed")
    with db.reader.connect() as conn:
        core = conn.execute(select(PATIENTS).where(PATIENTS.c.id == pid)).mappings().one()
        fast = fetch(conn, PATIENT_BY_FAMILY.limit(1), family="Doe")
        message = conn.execute(select(MESSAGES).where(MESSAGES.c.id == mid)).mappings().one()
    assert fast == dict(core)
    assert core["given_name"] == "Janet"
    assert core["extra"] == {"race": ["2106-3"], "vip": True}  # JSON's bind and result processors ran
    assert core["active"] is True and core["version"] == 1  # the column defaults Core would fill in
    assert core["updated_at"] >= core["created_at"]
    assert message["received_at"] == born  # UTCDateTime's processors: an aware datetime comes back


def test_fetch_all_returns_every_row_in_order_and_none_is_no_row(db: Database) -> None:
    with db.writer.begin() as conn:
        ids = [add(conn, PATIENTS, family_name="Roe", given_name=g) for g in ("A", "B", "C")]
    with db.reader.connect() as conn:
        assert [r["id"] for r in fetch_all(conn, PATIENT_BY_FAMILY, family="Roe")] == ids
        assert fetch_all(conn, PATIENT_BY_FAMILY, family="Nobody") == []
        assert fetch(conn, PATIENT_BY_FAMILY, family="Nobody") is None


def test_a_unique_violation_is_sqlalchemys_integrity_error_without_breaking_the_transaction_savepoint(
        db: Database) -> None:
    with db.writer.begin() as conn:
        pid = add(conn, PATIENTS, family_name="Poe")
        with pytest.raises(IntegrityError), savepoint(conn, "rb_test"):
            add(conn, PATIENTS, id=pid, family_name="Again")
        add(conn, PATIENTS, family_name="After")  # the transaction goes on after ROLLBACK TO SAVEPOINT
    with db.reader.connect() as conn:
        assert [r["family_name"] for r in conn.execute(select(PATIENTS.c.family_name).order_by(PATIENTS.c.id)).mappings()] \
            == ["Poe", "After"]


def test_an_expanding_in_list_is_refused_when_prepared_not_run_wrongly(db: Database) -> None:
    stmt = select(PATIENTS.c.id).where(PATIENTS.c.id.in_(bindparam("ids", expanding=True)))
    with pytest.raises(UnpreparableStatement, match="expanding"):
        Prepared.of(stmt, db.writer.dialect)


def test_add_many_writes_every_row_with_its_defaults_and_a_conflict_is_integrity_error(db: Database) -> None:
    with db.writer.begin() as conn:
        pid = add(conn, PATIENTS, family_name="Many")
        add_many(conn, IDENTIFIERS, [{"patient_id": pid, "value": f"M{i}", "issuer": "H", "type_code": None,
                                      "kind": "other"} for i in range(3)])
        add_many(conn, IDENTIFIERS, [])  # nothing to write: no statement
        with pytest.raises(IntegrityError), savepoint(conn, "rb_test"):
            add_many(conn, IDENTIFIERS, [{"patient_id": pid, "value": v, "issuer": "H", "type_code": None,
                                          "kind": "other"} for v in ("M9", "M1")])
    with db.reader.connect() as conn:
        rows = conn.execute(select(IDENTIFIERS).order_by(IDENTIFIERS.c.id)).mappings().all()
    assert [r["value"] for r in rows] == ["M0", "M1", "M2"]  # M9 went with its statement
    assert all(r["created_at"] is not None for r in rows)  # the column default Core would fill in


def test_identifier_owners_answers_for_more_identifiers_than_one_statement_takes(db: Database) -> None:
    keys = [(f"O{i}", "H") for i in range(OWNERS_AT_ONCE * 2 + 1)]
    with db.writer.begin() as conn:
        a, b = add(conn, PATIENTS, family_name="A"), add(conn, PATIENTS, family_name="B")
        add_many(conn, IDENTIFIERS, [{"patient_id": a if i % 2 else b, "value": v, "issuer": s, "type_code": None,
                                      "kind": "other"} for i, (v, s) in enumerate(keys) if i % 3])
    with db.reader.connect() as conn:
        owners = identifier_owners(conn, [*keys, ("O1", "other issuer")])
    assert owners == {k: (a if i % 2 else b) for i, k in enumerate(keys) if i % 3}


def test_pipelined_statements_are_written_and_a_failure_is_integrity_error_at_the_end_of_the_block(
        db: Database) -> None:
    with db.writer.begin() as conn:
        pid = add(conn, PATIENTS, family_name="Pipe")
        with pipelined(conn):
            update_row(conn, PATIENTS, pid, given_name="Line")
            add_many(conn, IDENTIFIERS, [{"patient_id": pid, "value": "P1", "issuer": "H", "type_code": None,
                                          "kind": "primary"}])
        with pytest.raises(IntegrityError), savepoint(conn, "rb_test"), pipelined(conn):
            add_many(conn, IDENTIFIERS, [{"patient_id": pid, "value": "P2", "issuer": "H", "type_code": None,
                                          "kind": "other"}])
            add(conn, PATIENTS, id=pid, family_name="Again")
        add(conn, PATIENTS, family_name="After")  # the transaction goes on after ROLLBACK TO SAVEPOINT
    with db.reader.connect() as conn:
        assert [r["given_name"] for r in conn.execute(select(PATIENTS).order_by(PATIENTS.c.id)).mappings()] \
            == ["Line", None]
        assert list(conn.execute(select(IDENTIFIERS.c.value)).scalars()) == ["P1"]


def test_utc_datetimes_are_written_to_sqlite_as_the_same_text_as_sqlalchemys_datetime() -> None:
    """UTCDateTime's one-step SQLite bind writes what the decorator plus SQLAlchemy's DATETIME wrote,
    so rows written before and after compare (ORDER BY, >=) as they did."""
    from datetime import timedelta, timezone

    from sqlalchemy import DateTime
    from sqlalchemy.dialects import sqlite

    from engine.store.types import UTCDateTime

    dialect = sqlite.dialect()
    fast = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    general = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert fast is not None and general is not None
    values = [datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC), datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC),
              datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
              datetime(2026, 3, 4, 1, 30, tzinfo=timezone(timedelta(hours=-5))),
              datetime(2026, 3, 4, 1, 30, 0, 500, tzinfo=timezone(timedelta(hours=5, minutes=30))),
              datetime.now(UTC)]
    for v in values:
        assert fast(v) == general(v.astimezone(UTC).replace(tzinfo=None)), v
    assert fast(None) is None
    with pytest.raises(ValueError):
        fast(datetime(2026, 3, 4))  # naive: refused as before
