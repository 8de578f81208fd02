"""Outbound HL7 v2 is written without hl7apy per message, byte for byte as hl7apy wrote it.

The reference below is the renderer as it was (an hl7apy Segment per segment, a field added per
repetition, ``to_er7``), kept here only to compare against: every shipped hl7v2 mapping and a mapping
that uses what analysts can write (repetitions, subcomponents, templates, constants with separators,
numbers, a Z-segment) are rendered with both over many contexts shaped like the store's, with values
that need escaping, blank and empty values, report lines and PDFs.
"""

from __future__ import annotations

import random
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.hl7.message import escape
from engine.outbound.mapping import OutboundMapping, RenderError, Scope, compile_outbound
from engine.outbound.render import er7_field, field_repetitions, placed_segments, render_hl7
from engine.yamlfile import load_yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "mappings").glob("*.yaml") if "target: hl7v2" in p.read_text())


def hl7apy_render(mapping: OutboundMapping, scope: Scope) -> str:
    """The renderer before: hl7apy builds each segment and writes it."""
    from hl7apy.core import Segment
    out = []
    for spec, values in placed_segments(mapping, scope):
        seg = Segment(spec.name, version=mapping.version)
        if spec.name == "MSH":
            seg.msh_1, seg.msh_2 = "|", "^~\\&"
        for n in sorted(values):
            if spec.name == "MSH" and n in (1, 2):
                continue
            for rep in field_repetitions(values[n]):
                seg.add_field(f"{spec.name.lower()}_{n}").value = rep
        out.append(seg.to_er7())
    return "\r".join(out)


LINE_BREAK_ESCAPED = "\\E\\.br\\E\\"  # hl7apy's writing of a line break (\\.br\\), changed on purpose


LINE_MARK = "\x1e"
# hl7apy escaped the backslashes of a \.br\ (either or both: one may close the escape before it)
LINE_BREAK_AS_HL7APY_WROTE_IT = re.compile(r"(?:\\E\\|\\)\.br(?:\\E\\|\\)")


def marked_line_breaks(value: Any) -> Any:
    """The context with each line break in its text made LINE_MARK, which nothing escapes."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", LINE_MARK)
    if isinstance(value, dict):
        return {k: marked_line_breaks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [marked_line_breaks(v) for v in value]
    return value


def compile_file(path: Path) -> OutboundMapping:
    mapping, problems = compile_outbound(load_yaml(path), str(path), path.stem)
    assert mapping is not None, problems
    return mapping


# A mapping with what the shipped ones leave out: repetitions, subcomponents, a template whose last
# placeholder may be empty (PID-5), constants carrying ^ & ~ and a backslash, numbers in NM/SI fields,
# a list of identifiers, a Z-segment.
ANALYST = """\
source: store
target: hl7v2
message: ORU^R01
version: "2.5.1"
segments:
  - segment: MSH
    fields:
      MSH-3.1: engine.name
      MSH-4: {template: "{engine.facility}^{engine.aet}^"}
      MSH-6: {value: "EHR^^"}
  - segment: PID
    fields:
      PID-1: {value: " 01 "}
      PID-3(1).1: patient.id
      PID-3(1).4.1: patient.issuer
      PID-3(1).4.2: patient.system
      PID-3(1).5: patient.type_code
      PID-3(3).1: order.accession
      PID-5: {template: "{patient.family_name}^{patient.given_name}^{patient.middle_name}"}
      PID-6.1.1: patient.suffix
      PID-6.2: patient.prefix
      PID-11: {template: "{order.reason}^^{order.priority} ^ "}
      PID-13: {value: "a~b|c\\\\d\\\\F\\\\"}
      PID-19: patient.name
  - segment: OBR
    fields:
      OBR-1: {value: "1"}
      OBR-4: {template: "{order.procedure_code}^{order.procedure_text}^{order.procedure_scheme}"}
      OBR-7: {from: study.started, transform: [hl7_datetime]}
      OBR-9: {value: " 2.50&mL "}
      OBR-32.1.2: order.ordering_provider
      OBR-32.1.3: report.observer
  - segment: OBX
    each: patient.identifiers
    as: ident
    fields:
      OBX-1: ident.value
      OBX-2: {value: ST}
      OBX-3: {template: "{ident.kind}^{ident.issuer}&{ident.system}&"}
      OBX-5: {template: "{ident.value}\\\\.br\\\\{ident.type_code}^ "}
      OBX-6: {value: "  "}
  - segment: OBX
    each: report.lines
    as: line
    fields:
      OBX-1: line.index
      OBX-5: line.text
      OBX-7: {value: "1&2^3&4~5"}
  - segment: ZRB
    fields:
      ZRB-1: study.uid
      ZRB-2: {template: "{study.description}^^"}
      ZRB-3: {value: " x ^ "}
"""

# values that need escaping or are blank, and ordinary ones
NASTY = ["", " ", "  ", "Doe", "O'Brien", "Smith^John", "A&B", "x|y", "r~s", "back\\slash", "\\F\\",
         "line1\nline2", "cr\r\nlf", "Müller", "李", " lead", "trail ", "^", "&&", "~", "|", "\\", "01", "2.50",
         "1e3", "-0", "+7", "9" * 40, "\\E\\", "a\\Hb\\N", "20260101", "x^^", "\t"]


def maybe(rnd: random.Random, pool: list[str] | None = None) -> str | None:
    r = rnd.random()
    if r < 0.15:
        return None
    if r < 0.5:
        return rnd.choice(pool or NASTY)
    return "".join(rnd.choice(NASTY) for _ in range(rnd.randint(1, 3)))


def context(rnd: random.Random, i: int) -> dict[str, Any]:
    """A context shaped like engine.outbound.context.build_context's, with values from NASTY."""
    date = rnd.choice(["20260107", "2026", "202601", None, "19991231"])
    started = None if date is None else date + rnd.choice(["", "1230", "123045", "123045.5"])
    kind = rnd.choice(["sr", "pdf", None])
    lines = [{"index": k + 1, "text": maybe(rnd) or ""} for k in range(rnd.randint(0, 4))] if kind == "sr" else []
    ids = [{"value": maybe(rnd) or f"ID{k}", "issuer": maybe(rnd) or "", "system": rnd.choice(["urn:oid:1.2.3", None]),
            "type_code": maybe(rnd, ["MR", "PI", ""]), "kind": rnd.choice(["primary", "other", "alias"])}
           for k in range(rnd.randint(0, 3))]
    return {
        "study": {"uid": f"1.2.826.0.1.3680043.8.498.{i}", "accession": maybe(rnd), "id": maybe(rnd), "date": date,
                  "time": None, "started": started, "description": maybe(rnd),
                  "modalities": rnd.choice([[], ["CT"], ["MR", "SR"], [maybe(rnd) or "OT"]]), "num_series": 1,
                  "num_instances": rnd.randint(0, 3), "referring_physician": maybe(rnd), "series": [],
                  "state": "stable", "reconciliation": "matched", "times_reconciled": 1, "matched_by": None,
                  "size_bytes": 0},
        "patient": {} if rnd.random() < 0.1 else {
            "id": maybe(rnd) or "MRN1", "issuer": maybe(rnd), "system": maybe(rnd), "type_code": maybe(rnd, ["MR", ""]),
            "family_name": maybe(rnd), "given_name": maybe(rnd), "middle_name": maybe(rnd), "prefix": maybe(rnd),
            "suffix": maybe(rnd), "name": maybe(rnd), "birth_date": rnd.choice(["1970-01-31", "19700131", "1970", None]),
            "sex": maybe(rnd, ["F", "M", "O", "U", ""]), "identifiers": ids, "extra": {}},
        "order": {} if rnd.random() < 0.2 else {
            "accession": maybe(rnd), "placer_number": maybe(rnd), "placer_issuer": maybe(rnd),
            "filler_number": maybe(rnd), "status": "IP", "procedure_code": maybe(rnd), "procedure_text": maybe(rnd),
            "procedure_scheme": maybe(rnd), "modality": maybe(rnd), "requested_procedure_id": maybe(rnd),
            "sps_id": maybe(rnd), "ordering_provider": maybe(rnd), "reason": maybe(rnd), "priority": maybe(rnd),
            "scheduled_at": None, "extra": {}},
        "event": {"kind": "study.reconciled", "at": "2026-12-07T10:00:00+00:00",
                  "result_status": rnd.choice(["F", "C"]), "corrected": False},
        "engine": {"name": rnd.choice(["RADBRIDGE", "RB^X", ""]), "facility": maybe(rnd), "aet": "RADBRIDGE",
                   "dicomweb_base": rnd.choice([None, "http://127.0.0.1:8042/dicom-web"])},
        "delivery": {"id": i, "control_id": f"RB{i:010d}", "now": "20261207101500+0100"},
        "report": {} if kind is None else {
            "instance_uid": "1.2.3", "sop_class": "1.2.840.10008.5.1.4.1.1.88.11", "kind": kind,
            "title": maybe(rnd), "text": "\n".join(str(x["text"]) for x in lines), "lines": lines,
            "pdf_base64": "JVBERi0xLjQK" * rnd.randint(1, 3) if kind == "pdf" else None,
            "completion": "COMPLETE", "verification": "VERIFIED", "observer": maybe(rnd),
            "content_datetime": rnd.choice([None, "20261207101500"]), "series_uid": "1.2.3.4"},
    }


def mappings(tmp_path: Path) -> list[OutboundMapping]:
    f = tmp_path / "analyst.yaml"
    f.write_text(ANALYST)
    return [*(compile_file(p) for p in SHIPPED), compile_file(f)]


def test_the_shipped_hl7_mappings_are_compared() -> None:
    assert {p.stem for p in SHIPPED} >= {"hl7-oru-images", "hl7-oru-report"}


def test_every_message_is_byte_identical_to_hl7apys(tmp_path: Path) -> None:
    rnd = random.Random(20261207)
    compared = 0
    for mapping in mappings(tmp_path):
        for i in range(400):
            ctx = context(rnd, i)
            scope = Scope(ctx)
            try:  # line breaks differ on purpose (test_a_line_break_goes_out_as_hl7s_line_break_escape):
                # hl7apy is given a mark where a value breaks a line, the mark then made \.br\
                # (and a \.br\ the mapping's own text writes is one too)
                want = LINE_BREAK_AS_HL7APY_WROTE_IT.sub(r"\\.br\\", hl7apy_render(
                    mapping, Scope(marked_line_breaks(ctx))).replace(LINE_MARK, "\\.br\\"))
            except RenderError:  # a required value is empty: both refuse alike
                with pytest.raises(RenderError):
                    render_hl7(mapping, scope)
                continue
            assert render_hl7(mapping, scope) == want, (mapping.name, i)
            compared += 1
    assert compared > 900


@pytest.mark.parametrize("segment,field", [("PID", 1), ("PID", 3), ("PID", 5), ("PID", 8), ("OBR", 4), ("OBR", 7),
                                           ("OBR", 9), ("OBR", 32), ("OBX", 3), ("OBX", 5), ("MSH", 9), ("PV1", 7),
                                           ("ORC", 7), ("ZRB", 2)])
def test_any_field_text_is_written_as_hl7apy_writes_it(segment: str, field: int) -> None:
    """Text an analyst writes goes in unescaped: its separators, blanks and stray backslashes are
    written as hl7apy wrote them, in composite, primitive, numeric and Z-segment fields."""
    from hl7apy.core import Segment

    from engine.hl7.structure import segment_layout
    rnd = random.Random(f"{segment}-{field}")
    tokens = ["a", "B1", "^", "&", "~", "|", "\\", "\\.br\\", "\\E\\", "\\S\\", " ", "  ", " x ", "2.5", "07", "\\X0D\\"]
    layout = (segment_layout(segment, "2.5.1") or {}).get(field)
    for _ in range(300):
        text = escape(rnd.choice(NASTY)) if rnd.random() < 0.2 else "".join(
            rnd.choice(tokens) for _ in range(rnd.randint(1, 6)))
        seg = Segment(segment, version="2.5.1")
        seg.add_field(f"{segment.lower()}_{field}").value = text
        want = seg.to_er7()
        if LINE_BREAK_ESCAPED in want:  # differs on purpose: test_a_line_break_goes_out_as_hl7s_line_break_escape
            continue
        assert f"{segment}|" + "|" * (field - 1 - (segment == "MSH")) + er7_field(text, layout) == want, text


def test_a_field_or_segment_hl7apy_does_not_define_is_an_error_when_the_mapping_loads(tmp_path: Path) -> None:
    """It used to fail at every delivery that had a value for it (dead letters); now at load, with its line."""
    body = textwrap.dedent("""\
        source: store
        target: hl7v2
        message: ORU^R01
        segments:
          - segment: MSH
            fields: {MSH-3: engine.name}
          - segment: PID
            fields:
              PID-3.1: patient.id
              PID-40: patient.sex
          - segment: QQQ
            fields: {QQQ-1: patient.id}
          - segment: ZXY
            fields: {ZXY-7: patient.id}
        """)
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    mapping, problems = compile_outbound(load_yaml(f), str(f), "bad")
    assert mapping is None
    assert [(p.line, p.message) for p in problems if p.severity == "error"] == [
        (10, "PID has 39 fields in HL7 v2.5.1"), (11, "segment QQQ is not defined in HL7 v2.5.1")]


def test_fields_go_to_their_numbers_where_a_version_withdrew_earlier_ones(tmp_path: Path) -> None:
    """HL7 v2.8 withdrew OBR-14, OBR-15 and OBR-27; hl7apy wrote the fields after them by position,
    so OBR-18 (the accession) came out as OBR-16. Each value goes to its field number."""
    f = tmp_path / "v28.yaml"
    f.write_text(ANALYST.replace('version: "2.5.1"', 'version: "2.8"').replace(
        "      OBR-32.1.2: order.ordering_provider\n", "      OBR-18: study.accession\n      OBR-25: event.result_status\n"))
    mapping = compile_file(f)
    ctx = context(random.Random(1), 1)
    ctx["study"]["accession"], ctx["event"]["result_status"] = "ACC9", "F"
    obr = next(s for s in render_hl7(mapping, Scope(ctx)).split("\r") if s.startswith("OBR|"))
    fields = obr.split("|")
    assert (fields[18], fields[25]) == ("ACC9", "F")


def test_a_line_break_goes_out_as_hl7s_line_break_escape() -> None:
    """A value with a line break (a report line, an address) is escaped to ``\\.br\\`` as it is read in
    (engine.hl7.message.escape): the field keeps that sequence, not ``\\E\\.br\\E\\``, which an EHR
    would show as the text \\.br\\ (hl7apy wrote it so; so did the renderer built on it)."""
    from engine.hl7.structure import segment_layout
    for segment, field in (("OBX", 5), ("PID", 11), ("NTE", 3)):
        layout = (segment_layout(segment, "2.5.1") or {}).get(field)
        assert er7_field(escape("first line\nsecond | line"), layout) == "first line\\.br\\second \\F\\ line"
    assert er7_field("a \\ b", None) == "a \\E\\ b"  # a backslash that starts no escape is still escaped
    # the text \.br\ in a value (not a line break) is escaped as it is read in, and stays text
    assert er7_field(escape("see \\.br\\ here"), None) == "see \\E\\.br\\E\\ here"
