"""HL7 v2: a cheap parser for the hot path, ACK building, error codes and charsets.

hl7apy builds a full object tree per message (about 20 messages/s here); this package splits the
message once and reads fields lazily, so ingest is bounded by the database, not the parser.
hl7apy is used where its structure definitions help (see `structure.py`).
"""

from engine.hl7.errors import HL7Error, HL7ParseError
from engine.hl7.message import NULL, Message, parse_message

__all__ = ["HL7Error", "HL7ParseError", "Message", "NULL", "parse_message"]
