"""A cheap HL7 v2 message: split once into segments and fields, read everything else lazily.

Field values keep the HL7 distinction the domain relies on:
  * an empty field (``||``) means "no information" and is returned as ``None``;
  * a field holding two double quotes (``|""|``) is an explicit null ("delete this value") and is
    returned as the ``NULL`` sentinel.
Leaf values (a component or subcomponent, or a field without separators) are unescaped; composite
values are returned with their separators, still escaped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from engine.hl7 import errors as E
from engine.hl7.charsets import codec_for
from engine.hl7.errors import HL7Error, HL7ParseError


class _Null:
    """HL7's explicit null ``""``: the sender asks for the value to be cleared."""

    _instance: _Null | None = None

    def __new__(cls) -> _Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False


NULL: Final = _Null()
Value = str | _Null | None

_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")


@dataclass(frozen=True, slots=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


DEFAULT_SEPARATORS = Separators()


def unescape(value: str, seps: Separators) -> str:
    """Resolve HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\ ...)."""
    esc = seps.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != esc:
            out.append(ch)
            i += 1
            continue
        end = value.find(esc, i + 1)
        if end < 0:  # a lone escape character: keep it as text
            out.append(value[i:])
            break
        seq = value[i + 1:end]
        i = end + 1
        if seq == "F":
            out.append(seps.field)
        elif seq == "S":
            out.append(seps.component)
        elif seq == "T":
            out.append(seps.subcomponent)
        elif seq == "R":
            out.append(seps.repetition)
        elif seq == "E":
            out.append(esc)
        elif seq == ".br":
            out.append("\n")
        elif seq.startswith("X") and len(seq) > 1:
            try:
                out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
            except ValueError:
                out.append(esc + seq + esc)
        elif seq in ("H", "N") or seq.startswith(("C", "M", ".")):
            # highlighting, character-set switches and formatting commands carry no text
            continue
        else:
            out.append(esc + seq + esc)
    return "".join(out)


def escape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Escape text for use inside a field (the inverse of :func:`unescape` for the delimiters)."""
    esc = seps.escape
    if not any(c in value for c in (seps.field, seps.component, seps.repetition, esc, seps.subcomponent,
                                    "\r", "\n")):
        return value
    value = value.replace(esc, f"{esc}E{esc}")
    value = value.replace(seps.field, f"{esc}F{esc}")
    value = value.replace(seps.component, f"{esc}S{esc}")
    value = value.replace(seps.subcomponent, f"{esc}T{esc}")
    value = value.replace(seps.repetition, f"{esc}R{esc}")
    value = value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{esc}.br{esc}")
    return value


class Segment:
    """One segment; ``field(n)`` follows HL7 numbering (for MSH, MSH-1 is the field separator)."""

    __slots__ = ("name", "_parts", "_is_msh", "seps")

    def __init__(self, name: str, parts: list[str], seps: Separators) -> None:
        self.name = name
        self._parts = parts
        self._is_msh = name == "MSH"
        self.seps = seps

    def raw_field(self, n: int) -> str:
        """The field's text as sent (all repetitions, still escaped); '' when absent."""
        if self._is_msh:
            if n == 1:
                return self.seps.field
            idx = n - 1
        else:
            idx = n
        if idx < 1 or idx >= len(self._parts):
            return ""
        return self._parts[idx]

    def text(self, *, blank: int | None = None) -> str:
        """The segment as sent (still escaped), with field ``blank`` (HL7 numbering) left empty."""
        parts = self._parts
        idx = None if blank is None else (blank - 1 if self._is_msh else blank)
        if idx is not None and 1 <= idx < len(parts):
            parts = [*parts[:idx], "", *parts[idx + 1:]]
        return self.seps.field.join(parts)

    @property
    def field_count(self) -> int:
        return len(self._parts) if self._is_msh else len(self._parts) - 1

    def repetitions(self, n: int) -> list[str]:
        raw = self.raw_field(n)
        if raw == "":
            return []
        if self._is_msh and n in (1, 2):
            return [raw]
        return raw.split(self.seps.repetition)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {len(self._parts) - 1} fields)"


def component(rep: str, comp: int | None, sub: int | None, seps: Separators) -> Value:
    """Pick a component/subcomponent out of one field repetition and unescape leaves."""
    if rep == "":
        return None
    if rep == '""' and comp in (None, 1) and sub in (None, 1):
        return NULL
    value = rep
    if comp is not None:
        parts = value.split(seps.component)
        if comp < 1 or comp > len(parts):
            return None
        value = parts[comp - 1]
        if sub is not None:
            subs = value.split(seps.subcomponent)
            if sub < 1 or sub > len(subs):
                return None
            value = subs[sub - 1]
    if value == "":
        return None
    if value == '""':
        return NULL
    if comp is None and seps.component in value:
        return value  # composite: caller asked for the whole field
    if sub is None and comp is not None and seps.subcomponent in value:
        return value
    return unescape(value, seps)


class Message:
    """A parsed HL7 v2 message. Construct with :func:`parse_message`."""

    __slots__ = ("text", "seps", "segments", "charset", "_index", "_header")

    def __init__(self, text: str, seps: Separators, segments: list[Segment], charset: str) -> None:
        self.text = text
        self.seps = seps
        self.segments = segments
        self.charset = charset  # the Python codec used to decode it
        self._index: dict[str, list[Segment]] = {}
        self._header: dict[tuple[int, int | None], str] = {}
        for seg in segments:
            self._index.setdefault(seg.name, []).append(seg)

    # --- segment access -------------------------------------------------------------------------
    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        segs = self._index.get(name)
        if not segs or occurrence < 1 or occurrence > len(segs):
            return None
        return segs[occurrence - 1]

    def all(self, name: str) -> list[Segment]:
        return self._index.get(name, [])

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def msh_value(self, field: int, comp: int | None = None) -> str:
        """A header value (first repetition), read once per message."""
        key = (field, comp)
        cached = self._header.get(key)
        if cached is not None:
            return cached
        reps = self.msh.repetitions(field)
        if not reps:
            value = ""
        elif field in (1, 2):
            value = reps[0]
        else:
            v = component(reps[0], comp, None, self.seps)
            value = v if isinstance(v, str) else ""
        self._header[key] = value
        return value

    # --- header shortcuts -----------------------------------------------------------------------
    @property
    def sending_application(self) -> str:
        return self.msh_value(3, 1)

    @property
    def sending_facility(self) -> str:
        return self.msh_value(4, 1)

    @property
    def receiving_application(self) -> str:
        return self.msh_value(5, 1)

    @property
    def receiving_facility(self) -> str:
        return self.msh_value(6, 1)

    @property
    def timestamp(self) -> str:
        return self.msh_value(7, 1)

    @property
    def message_code(self) -> str:
        return self.msh_value(9, 1).upper()

    @property
    def trigger_event(self) -> str:
        return self.msh_value(9, 2).upper()

    @property
    def message_structure(self) -> str:
        return self.msh_value(9, 3).upper()

    @property
    def message_type(self) -> str:
        """``CODE^EVENT``, e.g. ``ADT^A08``."""
        code, event = self.message_code, self.trigger_event
        return f"{code}^{event}" if event else code

    @property
    def control_id(self) -> str:
        return self.msh_value(10, 1)

    @property
    def processing_id(self) -> str:
        return self.msh_value(11, 1)

    @property
    def version(self) -> str:
        return self.msh_value(12, 1)

    @property
    def accept_ack_type(self) -> str:
        return self.msh_value(15, 1).upper()

    @property
    def application_ack_type(self) -> str:
        return self.msh_value(16, 1).upper()

    @property
    def charset_declared(self) -> str:
        return self.msh_value(18, 1)

    def content_digest(self) -> str:
        """SHA-256 (hex) of what the message says: its segments as sent, joined by CR, with MSH-7 (the
        time the sender built it) left out, so that a resend stamped anew still matches its original
        while any other difference, down to one byte, does not."""
        h = hashlib.sha256()
        for seg in self.segments:
            h.update(seg.text(blank=7 if seg.name == "MSH" else None).encode("utf-8", "surrogatepass"))
            h.update(b"\r")
        return h.hexdigest()

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)


def _read_separators(first_segment: str) -> Separators:
    if not first_segment.startswith("MSH"):
        raise HL7ParseError(HL7Error(E.SEGMENT_SEQUENCE, "message does not start with an MSH segment",
                                     segment="MSH", sequence=1))
    if len(first_segment) < 8:
        raise HL7ParseError(HL7Error(E.REQUIRED_FIELD_MISSING, "MSH is too short to hold its separators",
                                     segment="MSH", sequence=1, field=2))
    field_sep = first_segment[3]
    enc_end = first_segment.find(field_sep, 4)
    enc = first_segment[4:enc_end] if enc_end > 0 else first_segment[4:]
    chars = [field_sep, *enc]
    bad = (len(enc) not in (4, 5) or len(set(chars)) != len(chars)
           or any(c.isalnum() or c.isspace() for c in chars))
    if bad:
        raise HL7ParseError(HL7Error(
            E.DATA_TYPE_ERROR,
            f"invalid encoding characters {field_sep + enc!r}: MSH-1 and MSH-2 must be five distinct "
            "non-alphanumeric characters such as |^~\\&",
            segment="MSH", sequence=1, field=2))
    return Separators(field=field_sep, component=enc[0], repetition=enc[1], escape=enc[2],
                      subcomponent=enc[3])


def decode_bytes(data: bytes, default_charset: str = "utf-8", fallback_charset: str | None = "cp1252"
                 ) -> tuple[str, str]:
    """Decode a message's bytes by its MSH-18 (or the default); returns (text, codec).

    MSH-18 is read from the ASCII-compatible header before the body is decoded. A body that is not
    valid in the declared charset is an error (AR); one that is not valid in the *default* charset is
    decoded with ``fallback_charset`` when one is configured, as many feeds send Windows-1252
    without declaring it.
    """
    head_end = len(data)
    for term in (b"\r", b"\n"):
        pos = data.find(term)
        if 0 <= pos < head_end:
            head_end = pos
    head = data[:head_end].decode("latin-1")
    declared = ""
    if head.startswith("MSH") and len(head) > 3:
        parts = head.split(head[3])
        if len(parts) > 17:
            declared = parts[17].split(head[5] if len(head) > 5 else "~")[0].strip()
    if declared:
        codec = codec_for(declared)
        if codec is None:
            raise HL7ParseError(HL7Error(E.TABLE_VALUE_NOT_FOUND,
                                         f"character set {declared!r} is not one of HL7 table 0211",
                                         segment="MSH", sequence=1, field=18))
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError as exc:
            raise HL7ParseError(HL7Error(
                E.DATA_TYPE_ERROR,
                f"message is not valid {declared} (MSH-18): byte 0x{data[exc.start]:02x} at offset {exc.start}",
                segment="MSH", sequence=1, field=18)) from None
    try:
        return data.decode(default_charset), default_charset
    except UnicodeDecodeError as exc:
        if fallback_charset:
            return data.decode(fallback_charset, errors="replace"), fallback_charset
        raise HL7ParseError(HL7Error(
            E.DATA_TYPE_ERROR,
            f"MSH-18 is empty and the message is not valid {default_charset}: byte 0x{data[exc.start]:02x} "
            f"at offset {exc.start}", segment="MSH", sequence=1, field=18)) from None


def parse_text(text: str, charset: str = "utf-8") -> Message:
    """Split a decoded message into segments and fields; raises HL7ParseError with ERR detail."""
    text = text.lstrip("\r\n\x00 \t")
    lines = [s for s in _SEGMENT_SPLIT.split(text) if s]
    if not lines:
        raise HL7ParseError(HL7Error(E.SEGMENT_SEQUENCE, "empty message", segment="MSH", sequence=1))
    seps = _read_separators(lines[0])
    fs = seps.field
    segments: list[Segment] = []
    for i, line in enumerate(lines):
        parts = line.split(fs)
        name = parts[0]
        if not _SEGMENT_NAME.match(name):
            raise HL7ParseError(HL7Error(
                E.SEGMENT_SEQUENCE, f"segment {i + 1} has an invalid name {name[:10]!r}",
                segment=name[:3] if name[:3].isalnum() else None, sequence=None))
        if i > 0 and name == "MSH":
            raise HL7ParseError(HL7Error(E.SEGMENT_SEQUENCE,
                                         "a second MSH segment: batches must be split before sending",
                                         segment="MSH", sequence=2))
        segments.append(Segment(name, parts, seps))
    msg = Message(text, seps, segments, charset)
    if not msg.message_code:
        raise HL7ParseError(HL7Error(E.REQUIRED_FIELD_MISSING, "MSH-9 message type is empty",
                                     segment="MSH", sequence=1, field=9))
    if not msg.control_id:
        raise HL7ParseError(HL7Error(E.REQUIRED_FIELD_MISSING, "MSH-10 message control ID is empty",
                                     segment="MSH", sequence=1, field=10))
    return msg


def nul_error(text: str) -> HL7Error | None:
    """Where the first NUL character (0x00) is, as an ERR: no store keeps it in text (PostgreSQL
    refuses it), so such a message is kept as received bytes and not applied."""
    at = text.find("\x00")
    if at < 0:
        return None
    lines = _SEGMENT_SPLIT.split(text[:at])
    before = lines[-1]
    fs = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    name = before.split(fs, 1)[0][:3] if fs in before else ""
    occurrence = sum(1 for line in lines[:-1] if line.split(fs, 1)[0] == name) + 1 if name else None
    field_no = before.count(fs) + (1 if name == "MSH" else 0) if name else None
    where = f"{name}-{field_no}" if name and field_no else "the message"
    return HL7Error(E.DATA_TYPE_ERROR, f"{where} contains a NUL character (0x00), which cannot be stored as text;"
                    " the message is kept as received and not applied",
                    segment=name or None, sequence=occurrence, field=field_no or None)


def parse_message(data: bytes | str, default_charset: str = "utf-8",
                  fallback_charset: str | None = "cp1252") -> Message:
    if isinstance(data, bytes):
        text, codec = decode_bytes(data, default_charset, fallback_charset)
        return parse_text(text, codec)
    return parse_text(data)


def split_groups(msg: Message, start: str, members: Sequence[str] | None = None) -> list[list[Segment]]:
    """Split the message into groups each starting at segment ``start`` (e.g. one per ORC).

    Segments before the first ``start`` are not part of any group. When ``members`` is given, a
    group ends at the first segment not in it.
    """
    groups: list[list[Segment]] = []
    current: list[Segment] | None = None
    for seg in msg.segments:
        if seg.name == start:
            current = [seg]
            groups.append(current)
        elif current is not None:
            if members is not None and seg.name not in members:
                current = None
                continue
            current.append(seg)
    return groups
