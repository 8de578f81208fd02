"""WADO-RS transcoding on retrieve (issue 17 item 2): an Accept that does not take an instance's stored
transfer syntax but takes Explicit VR Little Endian (the PS3.18 default) gets it decoded on the fly.
The compressed objects of tests/test_transcode_retrieve.py stored with dcmtk's storescu, retrieved with
dicomweb-client and plain HTTP; pixel data compared with pydicom's own decode of the original."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import TOKEN, start_dicom_engine
from tests.test_transcode_retrieve import J2K_PART2, LOSSY, Archive, Study

DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
UNCOMPRESSED_FRAMES = (("application/octet-stream", "1.2.840.10008.1.2.1"),)


class Web:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.url = f"http://127.0.0.1:{archive.eng.engine.http_port}/dicomweb"
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        self.client = DICOMwebClient(url=self.url, session=session)

    def get(self, path: str, **headers: str) -> requests.Response:
        headers["Authorization"] = f"Bearer {TOKEN}"
        return requests.get(self.url + path, headers=headers, timeout=60)

    def stored(self) -> dict[Path, bytes]:
        """Every file the engine stored, by path."""
        folder = Path(self.archive.eng.settings.storage.dir) / "studies"
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def stored_file(self, sop_uid: str) -> bytes:
        [found] = [data for p, data in self.stored().items() if sop_uid in p.name]
        return found


@pytest.fixture
def web_archive(workdir: Path, db_url: str, tmp_path: Path) -> Iterator[Web]:
    eng = start_dicom_engine(workdir, db_url)
    try:
        yield Web(Archive(eng, 0, tmp_path / "objects"))  # no C-MOVE destination: WADO-RS only
    finally:
        eng.stop()


def parts(answer: requests.Response) -> list[tuple[str, bytes]]:
    """The multipart/related body's parts: (Content-Type, bytes)."""
    ctype = answer.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    assert answer.content.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in answer.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        [part_type] = [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-type:")]
        assert body.endswith(b"\r\n")
        out.append((part_type, body[:-2]))
    return out


def syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def assert_decoded(got: pydicom.Dataset, original: Path) -> None:
    """Explicit VR little endian, pixels equal to pydicom's decode of the original (the lossy ones say so)."""
    ref = pydicom.dcmread(original)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, original.name
    assert got.SOPInstanceUID == ref.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ref.pixel_array), original.name
    if syntax_of(original) in LOSSY:
        assert got.LossyImageCompression == "01"


def test_default_accept_gets_every_instance_decoded_and_star_the_stored_bytes(web_archive: Web) -> None:
    study = web_archive.archive.study
    before = web_archive.stored()
    got = web_archive.client.retrieve_study(study.uid)  # dicomweb-client's default Accept
    assert sorted(d.SOPInstanceUID for d in got) == sorted(study.files)
    for ds in got:
        assert_decoded(ds, study.files[ds.SOPInstanceUID])
    answer = web_archive.get(f"/studies/{study.uid}", Accept='multipart/related; type="application/dicom"')
    assert answer.status_code == 200 and "Warning" not in answer.headers
    received = parts(answer)
    assert len(received) == len(study.files)
    for part_type, body in received:
        assert part_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        ds = pydicom.dcmread(io.BytesIO(body))
        original = study.files[ds.SOPInstanceUID]
        if syntax_of(original) == ExplicitVRLittleEndian:  # the control: the stored file, byte for byte
            assert body == web_archive.stored_file(ds.SOPInstanceUID)
        else:
            assert_decoded(ds, original)
    # any syntax: every stored file as it is, in its own syntax
    answer = web_archive.get(f"/studies/{study.uid}", Accept=DICOM_ANY)
    assert answer.status_code == 200
    as_stored = parts(answer)
    assert sorted(body for _, body in as_stored) == sorted(web_archive.stored_file(uid) for uid in study.files)
    assert sorted(t for t, _ in as_stored) == sorted(f"application/dicom; transfer-syntax={syntax_of(p)}"
                                                     for p in study.files.values())
    # one instance asked for in its stored syntax: stored bytes; in another compressed one: never re-encoded
    j2k_uid, j2k = next((uid, p) for uid, p in study.files.items() if syntax_of(p) == "1.2.840.10008.1.2.4.91")
    series = str(pydicom.dcmread(j2k, stop_before_pixels=True).SeriesInstanceUID)
    path = f"/studies/{study.uid}/series/{series}/instances/{j2k_uid}"
    [(_, body)] = parts(web_archive.get(path, Accept='multipart/related; type="application/dicom"; '
                                                     'transfer-syntax=1.2.840.10008.1.2.4.91'))
    assert body == web_archive.stored_file(j2k_uid)
    refused = web_archive.get(path, Accept='multipart/related; type="application/dicom"; '
                                           'transfer-syntax=1.2.840.10008.1.2.4.80')
    assert refused.status_code == 406 and "1.2.840.10008.1.2.4.91" in refused.json()["detail"]
    assert web_archive.stored() == before  # decoding never touches the stored files


def test_frames_of_compressed_instances_decoded_for_an_uncompressed_accept(web_archive: Web) -> None:
    study = web_archive.archive.study
    checked = []
    for sop_uid, original in study.files.items():
        ref = pydicom.dcmread(original)
        series = str(ref.SeriesInstanceUID)
        frames = web_archive.client.retrieve_instance_frames(study.uid, series, sop_uid, frame_numbers=[1],
                                                            media_types=UNCOMPRESSED_FRAMES)
        pixels = ref.pixel_array
        first = pixels[0] if int(ref.get("NumberOfFrames") or 1) > 1 else pixels
        assert frames == [first.tobytes()], original.name
        checked.append(syntax_of(original))
    assert "1.2.840.10008.1.2.4.91" in checked and "1.2.840.10008.1.2.5" in checked


def test_an_undecodable_instance_is_left_out_with_206_or_refused_alone(
        web_archive: Web, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engine")
    mixed: Study = web_archive.archive.mixed
    [undecodable] = [uid for uid, p in mixed.files.items() if syntax_of(p) == J2K_PART2]
    answer = web_archive.get(f"/studies/{mixed.uid}", Accept='multipart/related; type="application/dicom"')
    assert answer.status_code == 206
    warning = answer.headers["Warning"]
    assert warning.startswith("299 ") and f"1 of 3 instances left out: no decoder for {J2K_PART2}" in warning
    got = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(io.BytesIO(b)) for _, b in parts(answer))}
    assert sorted(got) == sorted(uid for uid in mixed.files if uid != undecodable)
    for uid, ds in got.items():
        assert_decoded(ds, mixed.files[uid])
    assert any(undecodable in r.getMessage() and "no decoder for JPEG 2000 Part 2" in r.getMessage()
               and J2K_PART2 in r.getMessage() for r in caplog.records)
    # the same study with any syntax: all three as stored
    every = web_archive.get(f"/studies/{mixed.uid}", Accept=DICOM_ANY)
    assert every.status_code == 200 and len(parts(every)) == 3
    # the undecodable instance alone: nothing can be sent, 406 naming the syntax
    series = str(pydicom.dcmread(mixed.files[undecodable], stop_before_pixels=True).SeriesInstanceUID)
    path = f"/studies/{mixed.uid}/series/{series}/instances/{undecodable}"
    alone = web_archive.get(path, Accept='multipart/related; type="application/dicom"')
    assert alone.status_code == 406 and re.search(f"no decoder for {re.escape(J2K_PART2)}", alone.json()["detail"])
    frames = web_archive.get(path + "/frames/1", Accept='multipart/related; type="application/octet-stream"')
    assert frames.status_code == 406 and J2K_PART2 in frames.json()["detail"]
    assert web_archive.get(path, Accept=DICOM_ANY).status_code == 200
