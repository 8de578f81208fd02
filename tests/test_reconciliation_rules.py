"""Reconciliation rules files (validation with file and line), the comparison rules, and rewriting
stored files: every transfer syntax keeps its pixel data byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

import pydicom
import pytest

from engine.domain.rows import OrderRow, PatientRow
from engine.mappings.registry import load_mapping_file
from engine.reconciliation.coerce import Target, rewrite_instance
from engine.reconciliation.compare import Authority, authoritative, differences, names_agree
from engine.reconciliation.rules import NameRules, ReconciliationRules, default_rules
from engine.runtime import MAPPING_SOURCES
from engine.storage.local import LocalStorage
from tests.conftest import REPO
from tests.dicomutil import bundled, data_store_file
from tests.test_cli import radbridge


def test_shipped_rules_compile_and_equal_the_built_in_defaults() -> None:
    rules, problems = load_mapping_file(REPO / "mappings" / "reconciliation.yaml", sources=MAPPING_SOURCES)
    assert problems == [] and isinstance(rules, ReconciliationRules)
    assert [(a.keyword, a.source, a.severity, a.table) for a in rules.attributes] == \
        [(a.keyword, a.source, a.severity, a.table) for a in default_rules().attributes]


def test_check_reports_rule_errors_with_file_and_line(workdir: Path) -> None:
    path = workdir / "mappings" / "reconciliation.yaml"
    path.write_text(
        "source: reconciliation\n"
        "match:\n"
        "  missing_issuer: guess\n"
        "  by_acession: true\n"
        "attributes:\n"
        "  PatientName: {from: patient.nickname}\n"
        "  StudyInstanceUID: {from: order.accession}\n"
        "  PatientNmae: {from: patient.name}\n"
        "  PatientSex: {from: patient.sex, severity: loud}\n")
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("check", env=env)
    assert out.returncode == 1
    err = out.stderr
    assert f"{path}:3: match.missing_issuer: 'guess' is not one of any, default, unmatched" in err
    assert f"{path}:4: match.by_acession: unknown option" in err
    assert f"{path}:6: attributes.PatientName.from: unknown source 'patient.nickname'" in err
    assert f"{path}:7: attributes.StudyInstanceUID: StudyInstanceUID (UI) cannot be coerced" in err
    assert f"{path}:8: attributes.PatientNmae: 'PatientNmae' is not a DICOM attribute keyword" in err
    assert f"{path}:9: attributes.PatientSex.severity: 'loud' is not one of info, warning, error" in err
    # the channel names rules that did not load
    assert "options.reconciliation_rules: no reconciliation rules named 'reconciliation'" in err


@pytest.mark.parametrize(("received", "expected", "rules", "agree"), [
    ("DOE^JANE", "Doe^Jane", NameRules(), True),
    ("DOE^JANE", "Doe^Jane", NameRules(case_sensitive=True), False),
    ("Doe ^  Jane", "Doe^Jane", NameRules(), True),
    ("Van  Dam^Jo", "Van Dam^Jo", NameRules(whitespace="exact"), False),
    ("Doe^Jane", "Doe^Jane^Marie", NameRules(), False),
    ("Doe^Jane", "Doe^Jane^Marie", NameRules(missing_components_match=True), True),
    ("Doe^Jane^Ann", "Doe^Jane^Marie", NameRules(components=("family", "given")), True),
    ("Doe^Jane=ドウ^ジェーン", "Doe^Jane", NameRules(), True),  # ideographic group not compared
    (None, "Doe^Jane", NameRules(), False),
])
def test_name_comparison_rules(received: str | None, expected: str, rules: NameRules, agree: bool) -> None:
    assert names_agree(received, expected, rules) is agree


def test_authoritative_values_and_differences() -> None:
    rules = default_rules()
    auth = Authority(patient=cast(PatientRow, {"id": 1, "family_name": "Doe", "given_name": "Jane", "middle_name": None,
                              "prefix": None, "suffix": "Jr", "birth_date": "1970-01-31", "sex": "U"}),
                     identifier=("MRN1", "GENHOSP"), order=cast(OrderRow, {"id": 2, "accession": "ACC1"}))
    values = {r.keyword: authoritative(r, auth) for r in rules.attributes}
    assert values == {"PatientName": "Doe^Jane^^^Jr", "PatientID": "MRN1", "IssuerOfPatientID": "GENHOSP",
                      "PatientBirthDate": "19700131", "PatientSex": "O", "AccessionNumber": "ACC1"}
    got = differences(rules, auth, {"PatientName": "DOE^JANE^^^JR", "PatientID": "MRN1", "IssuerOfPatientID": None,
                                    "PatientBirthDate": "19700131", "PatientSex": "F", "AccessionNumber": "ACC1"})
    assert got == {"IssuerOfPatientID": (None, "GENHOSP"), "PatientSex": ("F", "O")}
    partial = Authority(patient=cast(PatientRow, {**auth.patient, "birth_date": "1970"}), identifier=auth.identifier)  # type: ignore[dict-item]
    assert authoritative(rules.attributes[3], partial) is None  # a partial date is not coerced


SYNTAXES = [bundled("CT_small.dcm"), bundled("MR_small_bigendian.dcm"), bundled("image_dfl.dcm"),
            data_store_file("693_J2KR.dcm"), data_store_file("OBXXXX1A_rle.dcm"),
            data_store_file("color3d_jpeg_baseline.dcm"), data_store_file("gdcm-US-ALOKA-16.dcm")]


@pytest.mark.parametrize("source", SYNTAXES, ids=lambda p: p.name)
def test_rewrite_keeps_pixel_data_and_syntax_and_records_originals(tmp_path: Path, source: Path) -> None:
    storage = LocalStorage(tmp_path / "store", fsync=False)
    (tmp_path / "store" / "in").mkdir()
    shutil.copy(source, tmp_path / "store" / "in" / "x.dcm")
    before = pydicom.dcmread(source)
    rules = default_rules()
    auth = Authority(patient=cast(PatientRow, {"id": 1, "family_name": "Ivanov", "given_name": "Иван", "birth_date": "1970-01-31",
                              "sex": "M"}), identifier=("MRN1", "GENHOSP"), order=cast(OrderRow, {"id": 1, "accession": "ACC1"}))
    values = [(r, v) for r in rules.attributes if (v := authoritative(r, auth)) is not None]
    target = Target(values, rules.names, "COERCE", "RADBRIDGE")
    out = rewrite_instance(storage, "in/x.dcm", target, study_uid="1.2.3", series_uid="1.2.3.4",
                           sop_instance_uid=str(before.SOPInstanceUID), source="CT1", tmp_dir=tmp_path)
    assert out is not None
    after = pydicom.dcmread(storage.path(out.stored.key))
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.PixelData == before.PixelData  # encapsulated fragments too: copied, not transcoded
    assert (str(after.PatientName), after.PatientID, after.AccessionNumber) == ("Ivanov^Иван", "MRN1", "ACC1")
    assert after.SpecificCharacterSet == "ISO_IR 192"  # Cyrillic needed more than the file's character set
    [item] = after.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE" and item.SourceOfPreviousValues == "CT1"
    old = item.ModifiedAttributesSequence[0]
    assert old.PatientID == before.PatientID and str(old.PatientName) == str(before.PatientName)
    # what was not asked to change did not change
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "Rows", "Columns", "StudyDescription", "Modality"):
        assert after.get(kw) == before.get(kw)
    # agreeing now: nothing to do; a later correction appends a second item
    assert rewrite_instance(storage, out.stored.key, target, study_uid="1.2.3", series_uid="1.2.3.4",
                            sop_instance_uid=str(before.SOPInstanceUID), source="CT1", tmp_dir=tmp_path) is None
    values2 = [(r, "MRN2" if r.keyword == "PatientID" else v) for r, v in values]
    again = rewrite_instance(storage, out.stored.key, Target(values2, rules.names, "CORRECT", "RADBRIDGE"),
                             study_uid="1.2.3", series_uid="1.2.3.4", sop_instance_uid=str(before.SOPInstanceUID),
                             source="CT1", tmp_dir=tmp_path)
    assert again is not None and again.changes == {"PatientID": ["MRN1", "MRN2"]}
    final = pydicom.dcmread(storage.path(again.stored.key))
    assert [i.ReasonForTheAttributeModification for i in final.OriginalAttributesSequence] == ["COERCE", "CORRECT"]
    assert final.PixelData == before.PixelData


def test_mappings_try_dry_runs_the_rules_on_an_image(workdir: Path, tmp_path: Path) -> None:
    from tests.dicomutil import make_instance
    img = make_instance(tmp_path / "img.dcm", patient_id="NOBODY", accession="ACC404", name="DOE^JANE")
    env = {"RADBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'rb.db'}", "RADBRIDGE_STORAGE_DIR": str(tmp_path / "var"),
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("mappings", "try", "reconciliation", str(img.path), env=env)
    assert out.returncode == 0, out.stderr
    # no store yet: tried against an empty one, said so, and nothing is created where the store would be
    assert "no database yet; matching against an empty store" in out.stderr
    assert not (tmp_path / "rb.db").exists() and not (tmp_path / "var").exists()
    import json
    result = json.loads(out.stdout)
    assert result["matched_by"] is None and result["header"]["PatientName"] == "DOE^JANE"
    assert {f["kind"] for f in result["findings"]} == {"order_unknown", "patient_unknown"}
    assert [f["detail"] for f in result["findings"] if f["kind"] == "order_unknown"] == [{"accession": "ACC404"}]
