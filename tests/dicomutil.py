"""DICOM test helpers: real objects (pydicom's and pydicom-data's test files, rewritten with new
UIDs and demographics) and dcmtk's command-line tools as the peers on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk waits ~40 ms per PDU without it


def data_store_file(name: str) -> Path:
    """A file from the pydicom-data package (large and compressed test objects)."""
    import data_store  # the pydicom-data package

    path = Path(data_store.__file__).parent / "data" / name
    assert path.exists(), f"{name} missing from pydicom-data"
    return path


def bundled(name: str) -> Path:
    """A small file that ships with pydicom itself (no download)."""
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not bundled with pydicom"
    return Path(str(path))


def require_dcmtk() -> None:
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk is not installed (scripts/test installs it; or apt-get install dcmtk)")


@dataclass
class Obj:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str


def make_instance(out: Path, *, source: Path | None = None, patient_id: str = "P1", name: str = "DOE^JANE",
                  birth_date: str = "19700101", sex: str = "F", accession: str = "A1", study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None, modality: str | None = None,
                  number: int = 1, issuer: str | None = None, edit: Any = None) -> Obj:
    """A copy of a real object with the identity given (new UIDs unless named)."""
    ds = pydicom.dcmread(source or bundled("CT_small.dcm"))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, birth_date, sex
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.AccessionNumber = accession
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.InstanceNumber = number
    if modality:
        ds.Modality = modality
    if edit:
        edit(ds)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return Obj(out, study_uid, series_uid, sop_uid)


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def storescu(port: int, files: list[Path], *, aet: str = "RADBRIDGE", calling: str = "TESTSCU",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send with dcmtk's storescu (uncompressed unless ``extra`` proposes a syntax, see propose())."""
    return run(["storescu", "-v", "-aet", calling, "-aec", aet, *(extra or []), "127.0.0.1", str(port),
                *map(str, files)], timeout=120)


PROPOSE = {  # storescu's option proposing a file's own (compressed) transfer syntax
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.2": "-xb", "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.1": "-xe",
}


def propose(path: Path) -> list[str]:
    """storescu options to send ``path`` in its own transfer syntax (no conversion)."""
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return [PROPOSE[ts]]


def findscu(port: int, level: str, keys: list[str], *, model: str = "-S", out_dir: Path | None = None,
            aet: str = "RADBRIDGE", query_file: Path | None = None,
            debug: bool = False) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """C-FIND with dcmtk's findscu; responses are written as files (-X) and read back. ``query_file``:
    a DICOM file holding the identifier (for keys too long for a command line); ``debug``: log the
    whole responses (-d), their Error Comment included."""
    assert out_dir is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-d" if debug else "-v", model, "-aet", "TESTSCU", "-aec", aet, "-X", "-od", str(out_dir)]
    if level:
        args += ["-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    proc = run([*args, "127.0.0.1", str(port), *([str(query_file)] if query_file else [])])
    return proc, [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
