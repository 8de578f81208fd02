"""The message search's parameters (GET /api/messages and the console's /messages), read from a
query string into a MessageFilter: one reading for both, so they accept the same."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from engine.errors import RadBridgeError
from engine.store.message_search import MessageFilter

TEXT_PARAMETERS = {"control_id": "control_id", "status": "status", "channel": "channel", "type": "message_type",
                   "identifier": "identifier", "issuer": "issuer", "accession": "accession"}
ID_PARAMETERS = {"patient_id": "patient_id", "before_id": "before_id", "after_id": "after_id"}
TIME_PARAMETERS = {"received_from": "received_from", "received_to": "received_to"}
PARAMETERS = (*TEXT_PARAMETERS, *ID_PARAMETERS, *TIME_PARAMETERS)


class FilterError(RadBridgeError):
    """A search parameter that cannot be used; the text names it (never echoes a value)."""


def parse_time(name: str, raw: str) -> datetime:
    """ISO 8601 (2026-12-07T04:00, seconds and an offset optional); without an offset it is UTC."""
    try:
        at = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise FilterError(f"{name} is not a date and time like 2026-12-07T04:00 (UTC)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def message_filter(query: Mapping[str, str]) -> MessageFilter:
    """The filter a query string asks for; empty parameters are ignored (a form sends them all)."""
    values: dict[str, object] = {}
    for param, key in TEXT_PARAMETERS.items():
        if query.get(param, "").strip():
            values[key] = query[param].strip()
    for param, key in ID_PARAMETERS.items():
        raw = query.get(param, "").strip()
        if raw:
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
                raise FilterError(f"{param} must be a whole number")
            values[key] = int(raw)
    for param, key in TIME_PARAMETERS.items():
        raw = query.get(param, "").strip()
        if raw:
            values[key] = parse_time(param, raw)
    if "issuer" in values and "identifier" not in values:
        raise FilterError("issuer narrows identifier: give identifier too")
    return MessageFilter(**values)  # type: ignore[arg-type]
