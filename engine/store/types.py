"""Column types shared by the models."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# SQLite keeps DATETIME as text in SQLAlchemy's storage format: YYYY-MM-DD HH:MM:SS.ffffff (always the
# microseconds), which is what datetime.isoformat(" ", "microseconds") writes before its offset.
SQLITE_TEXT_LENGTH = 26

# JSON everywhere, JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")

# A JSON object whose shape is open: what a JSON column holds (an event's detail, a finding's
# evidence, a history entry's changes) and what a FHIR resource body is. Rows and values whose
# keys are known have TypedDicts of their own (engine/domain/rows.py and the modules that own them).
JsonObject = dict[str, Any]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: the same on SQLite (no time zones) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite the text in one step (this decorator's UTC conversion, then SQLAlchemy's DATETIME
        text, were two calls and a dict of fields for every timestamp of every row written); the
        same text, so stored rows keep comparing as before (tests/test_rows.py checks it)."""
        general = super().bind_processor(dialect)
        if dialect.name != "sqlite" or general is None:
            return general

        def sqlite_text(value: Any) -> Any:
            if type(value) is not datetime or value.tzinfo is None:
                return general(value)  # None, or what the general path accepts or refuses
            if value.utcoffset():
                value = value.astimezone(UTC)
            return value.isoformat(" ", "microseconds")[:SQLITE_TEXT_LENGTH]
        return sqlite_text

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)
