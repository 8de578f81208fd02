"""Values longer than their column are refused as AE 104 (not truncated, not a database error)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import String

from engine.domain.errors import DomainError
from engine.hl7 import errors as E


def check_length(model: Any, column: str, value: Any, field: str) -> None:
    if not isinstance(value, str):
        return
    typ = model.__table__.c[column].type
    if isinstance(typ, String) and typ.length is not None and len(value) > typ.length:
        raise DomainError(f"{field} is {len(value)} characters; at most {typ.length} are kept",
                          code=E.VALUE_TOO_LONG, field=field)
