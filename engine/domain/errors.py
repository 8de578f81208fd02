"""Why a message could not be applied (becomes AE with an ERR segment)."""

from __future__ import annotations

from engine.errors import RadBridgeError
from engine.hl7 import errors as E


class DomainError(RadBridgeError):
    """A message that parsed and mapped but cannot be applied to the store."""

    def __init__(self, message: str, *, code: int = E.INTERNAL_ERROR, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field  # the domain field at fault, e.g. patient.id (the pipeline finds its source path)
        self.group: int | None = None  # which ORC group of the message, for order fields
