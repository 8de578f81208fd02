"""HL7 error conditions (table 0357) with the location they refer to."""

from __future__ import annotations

from engine.errors import RadBridgeError

# HL7 table 0357, message error condition codes.
ERROR_CODES: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

SEGMENT_SEQUENCE = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
VALUE_TOO_LONG = 104
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION = 203
UNKNOWN_KEY = 204
DUPLICATE_KEY = 205
RECORD_LOCKED = 206
INTERNAL_ERROR = 207


class HL7Error(RadBridgeError):
    """One error to report in an ERR segment: a table 0357 code, a text and where it is.

    Raised where the problem is found, or collected (several per message) for the ACK; equal when
    every part is equal, like the value it describes."""

    def __init__(self, code: int, text: str, segment: str | None = None, sequence: int | None = None,
                 field: int | None = None, repetition: int | None = None, component: int | None = None,
                 subcomponent: int | None = None, severity: str = "E", detail: str | None = None) -> None:
        super().__init__(text)
        self.detail = detail  # for the engine's store only (an internal failure's own text), never in ERR
        self.code = code
        self.text = text
        self.segment = segment
        self.sequence = sequence  # which occurrence of the segment, 1-based
        self.field = field
        self.repetition = repetition
        self.component = component
        self.subcomponent = subcomponent
        self.severity = severity  # E error, W warning, I information

    def _key(self) -> tuple[object, ...]:
        return (self.code, self.text, self.segment, self.sequence, self.field, self.repetition, self.component,
                self.subcomponent, self.severity)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HL7Error) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"HL7Error({self.describe()!r})"

    def __str__(self) -> str:
        return self.describe()

    @property
    def code_text(self) -> str:
        return ERROR_CODES.get(self.code, "Error")

    def location(self) -> str:
        """Human readable location, e.g. PID-7 or MSH-18."""
        if not self.segment:
            return ""
        loc = self.segment
        if self.sequence and self.sequence > 1:
            loc += f"[{self.sequence}]"
        if self.field is not None:
            loc += f"-{self.field}"
            if self.repetition and self.repetition > 1:
                loc += f"({self.repetition})"
            if self.component is not None:
                loc += f".{self.component}"
                if self.subcomponent is not None:
                    loc += f".{self.subcomponent}"
        return loc

    def describe(self) -> str:
        where = self.location()
        return f"{self.code} {self.code_text}{' at ' + where if where else ''}: {self.text}"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "condition": self.code_text, "location": self.location(),
                                  "text": self.text, "severity": self.severity}
        if self.detail:
            out["detail"] = self.detail
        return out


class HL7ParseError(RadBridgeError, ValueError):
    """The bytes are not an HL7 v2 message we can read; carries the ERR detail for the NAK."""

    def __init__(self, error: HL7Error) -> None:
        super().__init__(error.describe())
        self.error = error
