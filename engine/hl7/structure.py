"""What hl7apy's structure definitions tell us: segments and field counts per version.

Used off the hot path: to warn about mapping paths that point past a segment's defined fields, and
to validate a stored message in depth on demand (`radbridge messages show --validate`).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)
def segment_field_count(name: str, version: str = "2.5") -> int | None:
    """Number of fields hl7apy defines for a segment, or None for Z-segments and unknown names."""
    if name.startswith("Z"):
        return None
    from hl7apy import load_reference
    try:
        ref = load_reference(name, "Segment", version)
    except Exception:  # hl7apy raises ChildNotFound / InvalidName / UnsupportedVersion
        return None
    children = ref[1] if isinstance(ref, tuple) and len(ref) > 1 else ()
    count = len(children)
    return count + 1 if name == "MSH" else count


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
