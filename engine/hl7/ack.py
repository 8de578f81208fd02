"""ACK messages built from a template: ~0.05 ms each, against ~5 ms through hl7apy's Message API.

Original mode answers AA/AE/AR; enhanced mode (MSH-15/MSH-16 present) answers CA/CE/CR for the
commit acknowledgement. ERR is written in the layout of the sender's version: ERR-1 (ELD) before
v2.5, ERR-2/3/4 (ERL, CWE from table 0357, severity) from v2.5 on.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence

from engine.hl7.errors import HL7Error
from engine.hl7.message import DEFAULT_SEPARATORS, Message, Separators, escape

_counter = itertools.count(1)
_prefix = f"{os.getpid() % 100000:05d}"


def new_control_id() -> str:
    """Unique per process and run: time, pid and a counter (fits the 20 characters of MSH-10)."""
    return f"{int(time.time()) % 10**8:08d}{_prefix}{next(_counter) % 10**7:07d}"


_last_timestamp: tuple[int, str] = (-1, "")  # (second, its text): every ACK of a busy second has the same


def hl7_timestamp(t: float | None = None) -> str:
    global _last_timestamp
    t = time.time() if t is None else t
    second = int(t // 1)
    last = _last_timestamp
    if last[0] == second:
        return last[1]
    local = time.localtime(second)
    text = time.strftime("%Y%m%d%H%M%S", local) + time.strftime("%z", local)
    _last_timestamp = (second, text)
    return text


def _version_tuple(version: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def _err_segment(err: HL7Error, version: str, seps: Separators) -> str:
    c, s, f = seps.component, seps.subcomponent, seps.field
    text = escape(err.text, seps)
    loc_parts = [err.segment or "", str(err.sequence or (1 if err.segment else "")) if err.segment else "",
                 str(err.field) if err.field is not None else "",
                 str(err.repetition or (1 if err.field is not None else "")) if err.field is not None else "",
                 str(err.component) if err.component is not None else "",
                 str(err.subcomponent) if err.subcomponent is not None else ""]
    while loc_parts and loc_parts[-1] == "":
        loc_parts.pop()
    if _version_tuple(version) >= (2, 5):
        erl = c.join(loc_parts)
        cwe = c.join([str(err.code), escape(err.code_text, seps), "HL70357"])
        # ERR-1 (withdrawn), ERR-2 location, ERR-3 code, ERR-4 severity, ERR-5..7, ERR-8 user message
        return f"ERR{f}{f}{erl}{f}{cwe}{f}{err.severity}{f}{f}{f}{f}{text}"
    # v2.1-2.4: ERR-1 ELD = segment^sequence^field^code&text&table
    eld = c.join([err.segment or "", str(err.sequence or 1) if err.segment else "",
                  str(err.field) if err.field is not None else "",
                  s.join([str(err.code), escape(err.code_text + ": " + err.text, seps), "HL70357"])])
    return f"ERR{f}{eld}"


def build_ack(
    code: str,
    *,
    original: Message | None = None,
    original_control_id: str = "",
    errors: Sequence[HL7Error] = (),
    text: str = "",
    application: str = "RADBRIDGE",
    facility: str = "",
    charset_field: str = "",
) -> str:
    """Build an acknowledgement for ``original`` (may be None when the message could not be parsed).

    ``code`` is AA/AE/AR (original mode) or CA/CE/CR (enhanced mode). Returns the message text with
    CR segment terminators.
    """
    seps = original.seps if original is not None else DEFAULT_SEPARATORS
    f = seps.field
    if original is not None:
        version = original.version or "2.5.1"
        their_app = escape(original.sending_application, seps)
        their_fac = escape(original.sending_facility, seps)
        our_app = escape(original.receiving_application or application, seps)
        our_fac = escape(original.receiving_facility or facility, seps)
        event = original.trigger_event
        msh9 = f"ACK{seps.component}{event}{seps.component}ACK" if event else "ACK"
        processing = original.processing_id or "P"
        ctrl = original_control_id or original.control_id
        charset_field = charset_field or original.msh.raw_field(18).split(seps.repetition)[0]
    else:
        version, their_app, their_fac = "2.5.1", "", ""
        our_app, our_fac, msh9, processing, ctrl = escape(application), escape(facility), "ACK", "P", original_control_id
    msh = (f"MSH{f}{seps.encoding_characters}{f}{our_app}{f}{our_fac}{f}{their_app}{f}{their_fac}{f}"
           f"{hl7_timestamp()}{f}{f}{msh9}{f}{new_control_id()}{f}{processing}{f}{version}")
    if charset_field:
        msh += f"{f * 6}{charset_field}"  # MSH-18
    msa = f"MSA{f}{code}{f}{escape(ctrl, seps)}"
    if not text and errors:
        text = errors[0].text
    if text:
        msa += f"{f}{escape(text[:80], seps)}"
    segs = [msh, msa]
    segs.extend(_err_segment(e, version, seps) for e in errors)
    return "\r".join(segs) + "\r"
