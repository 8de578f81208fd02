"""Mapping files: every spec form, transforms, tables, and errors that name file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.hl7 import errors as E
from engine.hl7.message import parse_message
from engine.hl7.paths import SegmentSource
from engine.mappings.registry import MappingRegistry, load_mapping_file
from engine.mappings.spec import MappingResult
from engine.runtime import MAPPING_SOURCES
from tests.conftest import REPO, SAMPLES


def compile_text(tmp_path: Path, body: str, name: str = "m") -> tuple[object, list]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return load_mapping_file(path)


def apply(tmp_path: Path, body: str, sample: str | bytes) -> MappingResult:
    mapping, problems = compile_text(tmp_path, body)
    assert mapping is not None, [str(p) for p in problems]
    raw = sample if isinstance(sample, bytes) else (SAMPLES / sample).read_bytes()
    return mapping.apply(SegmentSource(parse_message(raw)))  # type: ignore[attr-defined]


def test_shipped_mappings_compile_without_problems() -> None:
    reg = MappingRegistry(REPO / "mappings", sources=MAPPING_SOURCES)
    problems = reg.load_all()
    assert [str(p) for p in problems] == []
    assert {"hl7-patient", "hl7-merge", "hl7-orm", "hl7-omi"} <= set(reg.names())


def test_patient_mapping_on_a_standard_a01() -> None:
    reg = MappingRegistry(REPO / "mappings", sources=MAPPING_SOURCES)
    reg.load_all()
    m = reg.get("hl7-patient")
    assert m is not None
    res = m.apply(SegmentSource(parse_message((SAMPLES / "adt_a01.hl7").read_bytes())))
    v = res.values
    assert (v["patient.id"], v["patient.issuer"], v["patient.identifier_type"]) == ("100001", "GENHOSP", "MR")
    assert (v["patient.family_name"], v["patient.given_name"], v["patient.prefix"]) == ("Smith", "John", "Dr")
    assert v["patient.birth_date"] == "1965-04-12" and v["patient.sex"] == "M"
    assert v["patient.identifiers"][1] == {"value": "555-44-3333", "issuer": "SSA", "type": "SS"}
    assert v["message.event_time"] == "2024-03-15T08:15:00"


def test_select_by_identifier_type_with_and_without_fallback(tmp_path: Path) -> None:
    body = """
        source: hl7v2
        fields:
          patient.id: {from: PID-3.1, select: {5: SS}}
          patient.issuer: {from: PID-3.4.1, select: {5: XX, 4.1: HOSP}, fallback: last}
          patient.identifier_type: {from: PID-3.1, select: {5: [XX, YY]}}
    """
    v = apply(tmp_path, body, "adt_a01.hl7").values
    assert v["patient.id"] == "555-44-3333"
    assert v["patient.issuer"] == "GENHOSP"  # no match: fallback last repetition
    assert "patient.identifier_type" not in v  # no match, no fallback: no value


def test_transforms_tables_templates_conditions_and_constants(tmp_path: Path) -> None:
    body = """
        source: hl7v2
        tables:
          sex: {M: male, F: female}
          strict_sex: {values: {M: male}, strict: true}
        fields:
          patient.sex: {from: PID-8, transform: [{table: sex}]}
          patient.extra.strict: {from: PID-8, transform: [{table: strict_sex}]}
          patient.family_name: {from: PID-5.1, transform: [upper, {prefix: "X-"}, {truncate: 5}]}
          patient.given_name: {template: "{PID-5.2} {PID-5.3} ({PID-5.99})"}
          patient.extra.site: {value: NORTH}
          patient.extra.when_epic: {value: yes, when: {path: MSH-3, equals: EPIC}}
          patient.extra.when_other: {value: yes, when: {path: MSH-3, in: [OTHER]}}
          patient.extra.ssn: {from: PID-3.1, select: {5: SS}, transform: [{replace: {pattern: "-", with: ""}}]}
          patient.extra.missing: {from: PID-30, transform: [{default: N}]}
          patient.extra.first: {first_of: [PID-40, {from: PID-3.1, select: {5: PI}}]}
          patient.birth_date: {from: PID-7, transform: [{date: {format: "%Y%m%d"}}]}
    """
    v = apply(tmp_path, body, "adt_a01.hl7").values
    assert v["patient.sex"] == "male"
    assert v["patient.extra.strict"] == "male"
    assert v["patient.family_name"] == "X-SMI"
    assert v["patient.given_name"] == "John Quincy ()"
    assert v["patient.extra.site"] == "NORTH"
    assert v["patient.extra.when_epic"] == "yes" and "patient.extra.when_other" not in v
    assert v["patient.extra.ssn"] == "555443333"
    assert v["patient.extra.missing"] == "N"
    assert v["patient.extra.first"] == "E12345"
    assert v["patient.birth_date"] == "1965-04-12"


def test_z_segment_and_explicit_null(tmp_path: Path) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||7^^^H^MR||Doe^\"\"\rZPI|1|VIP^Very important\r"
    body = """
        source: hl7v2
        fields:
          patient.id: PID-3.1
          patient.given_name: PID-5.2
          patient.extra.vip: ZPI-2.1
    """
    v = apply(tmp_path, body, raw).values
    assert v["patient.extra.vip"] == "VIP"
    assert "patient.given_name" in v and v["patient.given_name"] is None  # "" clears


def test_invalid_date_and_strict_table_are_value_errors_with_the_source_path(tmp_path: Path) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||7^^^H^MR||Doe||19651341|Q\r"
    body = """
        source: hl7v2
        tables:
          sex: {values: {M: M, F: F}, strict: true}
        fields:
          patient.id: {from: PID-3.1, required: true}
          patient.birth_date: {from: PID-7, transform: [date]}
          patient.sex: {from: PID-8, transform: [{table: sex}]}
          patient.family_name: {from: PID-6, required: true}
    """
    res = apply(tmp_path, body, raw)
    errs = {e.field: (e.path, e.code) for e in res.errors}
    assert errs["patient.birth_date"] == ("PID-7", E.DATA_TYPE_ERROR)
    assert errs["patient.sex"] == ("PID-8", E.TABLE_VALUE_NOT_FOUND)
    assert errs["patient.family_name"] == ("PID-6", E.REQUIRED_FIELD_MISSING)


def test_problems_name_file_line_and_field(tmp_path: Path) -> None:
    body = """\
        source: hl7v2
        tables:
          sex: {M: M}
        fields:
          patient.id: PID-3.1
          patient.nickname: PID-5.2
          patient.given_name: PID-5.x
          patient.sex: {from: PID-8, transform: [{table: nosuch}]}
          patient.birth_date: {from: PID-7, transform: [shout]}
          patient.family_name: {from: PID-5.1, colour: blue}
          patient.prefix: {from: PID-5.5, value: X}
    """
    mapping, problems = compile_text(tmp_path, body, "broken")
    assert mapping is None
    text = "\n".join(str(p) for p in problems)
    f = str(tmp_path / "broken.yaml")
    assert f"{f}:6: patient.nickname: unknown domain field" in text
    assert f"{f}:7: patient.given_name: 'PID-5.x' is not an HL7 path" in text
    assert f"{f}:8: patient.sex.transform: table 'nosuch' is not defined" in text
    assert f"{f}:9: patient.birth_date.transform: unknown transform 'shout'" in text
    assert f"{f}:10: patient.family_name.colour: unknown key" in text
    assert f"{f}:11: patient.prefix: give exactly one of from:, value:, template: or first_of:" in text


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    mapping, problems = compile_text(tmp_path, "source: hl7v2\nfields:\n  patient.id: [PID-3\n", "syntax")
    assert mapping is None
    assert problems[0].line in (3, 4) and "YAML syntax" in problems[0].message


def test_structure_warnings_for_fields_beyond_the_segment_definition(tmp_path: Path) -> None:
    mapping, problems = compile_text(tmp_path, """
        source: hl7v2
        fields:
          patient.id: PID-3.1
          patient.extra.x: PID-99
          patient.extra.y: QQQ-1
          patient.extra.z: ZZZ-4
    """)
    assert mapping is not None
    warnings = {str(p).split(": ", 2)[-1] for p in problems}
    assert all(p.severity == "warning" for p in problems)
    assert any("PID-99: PID has" in w for w in warnings)
    assert any("segment QQQ is not defined" in w for w in warnings)
    assert not any("ZZZ" in w for w in warnings)  # Z-segments are site-defined


@pytest.mark.parametrize("value,expected", [
    ("19650412", "1965-04-12"), ("196504", "1965-04"), ("1965", "1965"), ("19650412083000", "1965-04-12"),
])
def test_date_transform_accepts_partial_dates(tmp_path: Path, value: str, expected: str) -> None:
    raw = f"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||7||Doe||{value}\r".encode()
    res = apply(tmp_path, "source: hl7v2\nfields:\n  patient.birth_date: {from: PID-7, transform: [date]}\n", raw)
    assert res.values["patient.birth_date"] == expected


def test_reload_keeps_the_last_good_version_when_an_edit_breaks_it(tmp_path: Path) -> None:
    d = tmp_path / "maps"
    d.mkdir()
    f = d / "m.yaml"
    f.write_text("source: hl7v2\nfields:\n  patient.id: PID-3.1\n")
    reg = MappingRegistry(d)
    assert reg.load_all() == []
    good = reg.get("m")
    f.write_text("source: hl7v2\nfields:\n  patient.id: PID-3.1\n  patient.family_name: PID-5.1\n")
    import os
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert reg.reload_changed() == ["m"]
    assert reg.get("m") is not good and "patient.family_name" in reg.get("m").targets()  # type: ignore[union-attr]
    second = reg.get("m")
    f.write_text("source: hl7v2\nfields:\n  patient.id: NOT A PATH\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 2 * 10**9))
    assert reg.reload_changed() == ["m"]
    assert reg.get("m") is second
    assert any("not an HL7 path" in str(p) for p in reg.problems("m"))


def test_yes_no_and_country_codes_stay_text_in_tables(tmp_path: Path) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||7||Doe|||||||||||||||||||||||NO\r"
    body = """
        source: hl7v2
        tables:
          country: {NO: Norway, Y: yes}
        fields:
          patient.extra.country: {from: PID-28, transform: [{table: country}]}
          patient.extra.flag: {value: N}
    """
    v = apply(tmp_path, body, raw).values
    assert v["patient.extra.country"] == "Norway" and v["patient.extra.flag"] == "N"


@pytest.mark.parametrize("body,message", [
    ("patient.identifiers: PID-3", "patient.identifiers is a list"),
    ("patient.family_name: {from: PID-5, each: {value: 1}}", "each: makes a list"),
])
def test_list_and_single_fields_cannot_be_confused(tmp_path: Path, body: str, message: str) -> None:
    """Review regression: a list field (patient.identifiers) mapped as one value, or a single
    field mapped with each:, is a problem reported at its line (4)."""
    f = tmp_path / "m.yaml"
    f.write_text(f"source: hl7v2\nfields:\n  patient.id: PID-3.1\n  {body}\n")
    mapping, problems = load_mapping_file(f)
    assert mapping is None and any(message in str(p) and ":4:" in str(p) for p in problems)


def test_each_honours_select_matches_and_repetition(tmp_path: Path) -> None:
    """Review regression: each: lists only the repetitions select: matches (PID-3.5 MR here), and
    only the one repetition a path names (PID-3(2))."""
    f = tmp_path / "m.yaml"
    f.write_text("source: hl7v2\nfields:\n  patient.identifiers: {from: PID-3, select: {5: MR}, each: {value: 1}}\n")
    mapping, _ = load_mapping_file(f)
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5\rPID|1||1^^^H^MR~2^^^H^SS~3^^^K^MR\r"
    assert mapping is not None
    assert mapping.apply(SegmentSource(parse_message(raw))).values["patient.identifiers"] == [
        {"value": "1"}, {"value": "3"}]
    f.write_text("source: hl7v2\nfields:\n  patient.identifiers: {from: PID-3(2), each: {value: 1}}\n")
    mapping, _ = load_mapping_file(f)
    assert mapping is not None
    assert mapping.apply(SegmentSource(parse_message(raw))).values["patient.identifiers"] == [{"value": "2"}]
