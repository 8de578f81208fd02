"""What hl7apy's structure definitions tell us: segments, their fields and field layouts per version.

Used off the hot path: to warn about mapping paths that point past a segment's defined fields, to
read the field layouts outbound mappings are written with when they load, and to validate a stored
message in depth on demand (`radbridge messages show --validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=512)
def _segment_children(name: str, version: str) -> tuple[Any, ...] | None:
    """hl7apy's reference entries of a segment's fields, or None for Z-segments and unknown names."""
    if name.startswith("Z"):
        return None
    from hl7apy import load_reference
    try:
        ref = load_reference(name, "Segment", version)
    except Exception:  # hl7apy raises ChildNotFound / InvalidName / UnsupportedVersion
        return None
    return tuple(ref[1]) if isinstance(ref, tuple | list) and len(ref) > 1 else ()


def segment_field_count(name: str, version: str = "2.5") -> int | None:
    """Number of fields hl7apy defines for a segment, or None for Z-segments and unknown names."""
    children = _segment_children(name, version)
    if children is None:
        return None
    return len(children) + 1 if name == "MSH" else len(children)


@dataclass(frozen=True, slots=True)
class Layout:
    """A field or a component as hl7apy defines it: its data type and, for a composite type, the
    layouts of its components (or subcomponents); ``parts`` is None for a primitive (ST, NM, varies)."""

    datatype: str
    parts: tuple[Layout, ...] | None = None

    def part(self, index: int) -> Layout | None:
        """The layout of component ``index`` (0-based); None past the defined ones."""
        return self.parts[index] if self.parts is not None and index < len(self.parts) else None


def _layout(ref: object) -> Layout:
    kind, datatype = ref[0], str(ref[2])  # type: ignore[index]
    if kind == "leaf":
        return Layout(datatype)
    return Layout(datatype, tuple(_layout(child[1]) for child in ref[1]))  # type: ignore[index]


@lru_cache(maxsize=256)
def segment_layout(name: str, version: str = "2.5") -> dict[int, Layout] | None:
    """The layout of each field hl7apy defines for a segment, by HL7 field number (MSH-1 is the field
    separator), or None for Z-segments and names it does not know. Read when a mapping loads, so the
    outbound renderer can place values as hl7apy would without building its object tree per message."""
    children = _segment_children(name, version)
    if children is None:
        return None
    out: dict[int, Layout] = {}
    for child in children:
        try:
            out[int(str(child[0]).rsplit("_", 1)[1])] = _layout(child[1])
        except (IndexError, ValueError, TypeError):  # an entry of another shape: no layout, placed as text
            continue
    return out


def validate_message(text: str) -> list[str]:
    """Strict structural validation with hl7apy: slow (a full object tree), for on-demand use only."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message as hl7apy_parse
    try:
        msg = hl7apy_parse(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT,
                           find_groups=True)
        msg.validate()
    except Exception as exc:  # hl7apy reports every problem as an exception
        return [f"{type(exc).__name__}: {exc}"]
    return []


# Words hl7apy's long names spell in capitals that read better as such (PATIENT_ID -> Patient ID).
_UPPER_WORDS = frozenset({"ID", "PID", "MSH", "EVN", "PV1", "ORC", "OBR", "OBX", "MRG", "UID", "DT", "DR", "MD",
                          "HL7", "SSN", "II", "III", "JR", "SR", "URL", "NK1", "PD1", "PV2"})


def readable(long_name: str) -> str:
    """hl7apy's long name as words: PATIENT_NAME -> Patient Name, MOTHER_S_MAIDEN_NAME -> Mother's Maiden Name."""
    words = [w for w in long_name.replace("_S_", "'S_").replace("_E_G_", "_e.g._").split("_") if w]
    return " ".join(w if w in _UPPER_WORDS or w == "e.g." else w.capitalize() for w in words)


@lru_cache(maxsize=512)
def field_names(segment: str, version: str = "2.5") -> dict[int, tuple[str, str, tuple[str, ...]]]:
    """What hl7apy defines for a segment's fields: {number: (name, data type, component names)}, in
    HL7 numbering (MSH-1 is the field separator). Empty for Z-segments and segments it does not know."""
    out: dict[int, tuple[str, str, tuple[str, ...]]] = {}
    for child in _segment_children(segment, version) or ():
        try:
            number = int(str(child[0]).rsplit("_", 1)[1])
            kind, parts = child[1][0], child[1]
            if kind == "leaf":
                out[number] = (readable(str(parts[3])), str(parts[2]), ())
            else:
                comps = tuple(readable(str(c[1][3])) for c in parts[1])
                out[number] = (readable(str(parts[3])), str(parts[2]), comps)
        except (IndexError, ValueError, TypeError):  # an entry of another shape: shown without a name
            continue
    return out
