"""Transcoding on retrieve (issue 17, item 2): C-GET and C-MOVE peers that do not accept an instance's
stored transfer syntax get it decoded to an uncompressed syntax they accepted, with dcmtk's getscu and
movescu (to storescp) as the peers, and pixel data compared with pydicom's own decode of the original."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, generate_uid
from pynetdicom import AE

from engine.dicom.transcode import NoDecoder, NotAccepted, decoded_for
from tests.conftest import RunningEngine, start_dicom_engine
from tests.dicomutil import (
    DCMTK_ENV,
    PROPOSE,
    bundled,
    data_store_file,
    free_port,
    make_instance,
    pynetdicom_get,
    require_dcmtk,
    run,
    storescu,
)
from tests.waiting import wait_for_listener, wait_until

J2K_PART2 = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2 Multi-component (Lossless Only): pydicom has no decoder
# one object per compressed syntax the engine decodes: (source file, its transfer syntax)
SOURCES = [
    (bundled("JPEG2000.dcm"), "1.2.840.10008.1.2.4.91"),  # JPEG 2000
    (bundled("MR_small_jp2klossless.dcm"), "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    (bundled("MR_small_RLE.dcm"), "1.2.840.10008.1.2.5"),  # RLE lossless
    (bundled("SC_rgb_dcmtk_+eb+cy+np.dcm"), "1.2.840.10008.1.2.4.50"),  # JPEG baseline, YBR_FULL_422 (lossy)
    (bundled("JPEGLSNearLossless_16.dcm"), "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless (lossy)
    (bundled("MR_small_jpeg_ls_lossless.dcm"), "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    (data_store_file("JPEG-LL.dcm"), "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    (bundled("CT_small.dcm"), "1.2.840.10008.1.2.1"),  # uncompressed, as a control
]
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.81"}


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


@dataclass
class Study:
    uid: str
    files: dict[str, Path]  # SOP Instance UID -> the file sent (and stored as is)


class Archive:
    def __init__(self, eng: RunningEngine, dest_port: int, tmp: Path) -> None:
        self.eng, self.dest_port, self.tmp = eng, dest_port, tmp
        self.study = self._store(tmp / "decodable", SOURCES)
        # a real JPEG 2000 codestream labelled Part 2 (a Part 2 decoder reads Part 1 codestreams): a syntax
        # the engine accepts and stores but cannot decode, beside two it can
        self.mixed = self._store(tmp / "mixed", [(bundled("MR_small_jp2klossless.dcm"), J2K_PART2),
                                                 (bundled("MR_small_RLE.dcm"), "1.2.840.10008.1.2.5"),
                                                 (bundled("CT_small.dcm"), "1.2.840.10008.1.2.1")])

    def _store(self, folder: Path, sources: list[tuple[Path, str]]) -> Study:
        study_uid = generate_uid()
        files: dict[str, Path] = {}
        for n, (source, syntax) in enumerate(sources, 1):
            def relabel(ds: pydicom.Dataset, syntax: str = syntax) -> None:
                ds.file_meta.TransferSyntaxUID = UID(syntax)  # the pixel data is kept as is
            obj = make_instance(folder / f"{n}.dcm", source=source, patient_id="TR1", name="TRANS^CODE",
                                accession="TR-A", study_uid=study_uid, number=n, edit=relabel)
            assert pydicom.dcmread(obj.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
            files[obj.sop_uid] = obj.path
        for path in files.values():  # each proposed in its own syntax, so each is stored as it is
            syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            if syntax in PROPOSE:
                proc = storescu(self.eng.dicom_port, [path], extra=[PROPOSE[syntax]])
                assert proc.returncode == 0, proc.stdout + proc.stderr
            else:  # storescu has no option proposing it: pynetdicom as the SCU
                assert pynetdicom_store(self.eng.dicom_port, path) == 0
        return Study(study_uid, files)


def pynetdicom_store(port: int, path: Path) -> int:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.fixture
def archive(workdir: Path, db_url: str, tmp_path: Path) -> Iterator[Archive]:
    dest_port = free_port()
    eng = start_dicom_engine(workdir, db_url, destinations=[f"DEST=127.0.0.1:{dest_port}"])
    try:
        yield Archive(eng, dest_port, tmp_path / "objects")
    finally:
        eng.stop()


def _received(folder: Path) -> dict[str, pydicom.Dataset]:
    out: dict[str, pydicom.Dataset] = {}
    for p in folder.iterdir():
        ds = pydicom.dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _assert_decoded_equal(received: pydicom.Dataset, original: Path) -> None:
    """Uncompressed, and pixels equal to pydicom's own decode of the original's stored bytes."""
    ref = pydicom.dcmread(original)
    syntax = received.file_meta.TransferSyntaxUID
    assert syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian), (original.name, syntax)
    assert np.array_equal(received.pixel_array, ref.pixel_array), original.name
    if str(ref.file_meta.TransferSyntaxUID) in LOSSY:
        assert received.LossyImageCompression == "01"  # a lossy-stored image keeps saying so


def getscu(port: int, study_uid: str, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return run(["getscu", "-d", "-S", *options, "-aet", "TESTSCU", "-aec", "RADBRIDGE", "-od", str(out),
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)])


class Storescp:
    def __init__(self, port: int, out: Path, *options: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.proc = subprocess.Popen(["storescp", *options, "-aet", "DEST", "-od", str(out), str(port)],
                                     env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_listener(port, self.proc, what="storescp (the C-MOVE destination)")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def movescu(port: int, study_uid: str) -> subprocess.CompletedProcess[str]:
    return run(["movescu", "-d", "-S", "-aet", "TESTSCU", "-aec", "RADBRIDGE", "-aem", "DEST",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)])


def move_study(archive: Archive, out: Path, *storescp_options: str) -> dict[str, pydicom.Dataset]:
    """movescu of the decodable study to a storescp started with ``storescp_options``: what it wrote."""
    scp = Storescp(archive.dest_port, out, *storescp_options)
    try:
        proc = movescu(archive.eng.dicom_port, archive.study.uid)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_until(lambda: len(list(scp.out.iterdir())) >= len(archive.study.files), timeout=20, interval=0.1,
                   message="storescp to have written every moved instance")
    finally:
        scp.stop()
    return _received(scp.out)


def _final_response(output: str) -> str:
    """The last C-GET/C-MOVE response dcmtk dumped (-d)."""
    blocks = re.split(r"=+ INCOMING DIMSE MESSAGE =+", output)
    return blocks[-1]


def test_getscu_with_uncompressed_contexts_gets_every_instance_decoded(archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "got"
    proc = getscu(archive.eng.dicom_port, archive.study.uid, out)  # dcmtk's default: uncompressed only
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = _received(out)
    assert sorted(got) == sorted(archive.study.files)
    for sop_uid, original in archive.study.files.items():
        _assert_decoded_equal(got[sop_uid], original)
    assert "Failed SOP Instance UID" not in proc.stdout + proc.stderr


def test_the_stored_files_are_untouched(archive: Archive, tmp_path: Path) -> None:
    storage = Path(archive.eng.settings.storage.dir) / "studies"
    before = {p: p.read_bytes() for p in storage.rglob("*") if p.is_file()}
    assert len(before) == len(archive.study.files) + len(archive.mixed.files)
    proc = getscu(archive.eng.dicom_port, archive.study.uid, tmp_path / "got")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in storage.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("accepts", [(), ("+xi",)], ids=["uncompressed", "implicit-only"])
def test_movescu_to_an_uncompressed_only_storescp_gets_every_instance_decoded(archive: Archive, tmp_path: Path,
                                                                              accepts: tuple[str, ...]) -> None:
    # storescp's default: the uncompressed syntaxes; +xi: implicit VR little endian alone
    got = move_study(archive, tmp_path / "moved", *accepts)
    assert sorted(got) == sorted(archive.study.files)
    for sop_uid, original in archive.study.files.items():
        _assert_decoded_equal(got[sop_uid], original)
        if accepts:
            assert got[sop_uid].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_a_peer_accepting_the_stored_syntax_gets_the_stored_bytes(archive: Archive, tmp_path: Path) -> None:
    got = move_study(archive, tmp_path / "moved", "+xa")  # storescp accepting every syntax it knows
    assert sorted(got) == sorted(archive.study.files)
    for sop_uid, original in archive.study.files.items():
        stored = pydicom.dcmread(original)
        assert got[sop_uid].file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
        assert got[sop_uid].PixelData == stored.PixelData  # not transcoded
    # C-GET: getscu proposes all its syntaxes in one context per SOP class, so the engine picks an
    # uncompressed one; pynetdicom as the C-GET SCU proposes RLE in a context of its own for each SOP class
    # (and explicit VR little endian in another): the RLE object comes as stored, the others decoded
    got, final, _ = get_with_pynetdicom(archive.eng.dicom_port, archive.study, "1.2.840.10008.1.2.5")
    assert final.Status == 0 and sorted(got) == sorted(archive.study.files)
    for sop_uid, original in archive.study.files.items():
        stored = pydicom.dcmread(original)
        if stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5":
            assert got[sop_uid].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
            assert got[sop_uid].PixelData == stored.PixelData
        else:
            _assert_decoded_equal(got[sop_uid], original)


def get_with_pynetdicom(port: int, study: Study, syntax: str) -> tuple[dict[str, pydicom.Dataset], pydicom.Dataset,
                                                                     pydicom.Dataset | None]:
    """C-GET with ``syntax`` and explicit VR little endian in two contexts per SOP class: what arrived,
    the final status and identifier."""
    sop_classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in study.files.values()})
    contexts = [(c, [s]) for c in sop_classes for s in (syntax, ExplicitVRLittleEndian)]
    got: dict[str, pydicom.Dataset] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got[str(ds.SOPInstanceUID)] = ds
        return 0

    status, identifier = pynetdicom_get(port, study.uid, contexts, on_store)
    return got, status, identifier


def test_a_syntax_without_decoder_fails_its_suboperation_and_the_rest_arrives(
        archive: Archive, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engine")
    [undecodable] = [uid for uid, p in archive.mixed.files.items()
                     if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == J2K_PART2]
    with pytest.raises(NoDecoder, match=re.escape(J2K_PART2)):  # what the engine meets
        decoded_for(archive.mixed.files[undecodable], [ExplicitVRLittleEndian])
    out = tmp_path / "got"
    proc = getscu(archive.eng.dicom_port, archive.mixed.uid, out)
    output = proc.stdout + proc.stderr
    got = _received(out)
    assert sorted(got) == sorted(uid for uid in archive.mixed.files if uid != undecodable)
    for sop_uid in got:
        _assert_decoded_equal(got[sop_uid], archive.mixed.files[sop_uid])
    final = _final_response(output)
    assert "0xb000" in final.lower(), final  # warning: one or more sub-operations failed
    assert re.search(r"Failed Suboperations\s*:\s*1\b", final), final
    assert f"1 not sent: no decoder for {J2K_PART2}" in final, final
    # the final response's identifier lists the instance (getscu does not show it)
    got, status, identifier = get_with_pynetdicom(archive.eng.dicom_port, archive.mixed, ExplicitVRLittleEndian)
    assert sorted(got) == sorted(uid for uid in archive.mixed.files if uid != undecodable)
    assert status.Status == 0xB000 and status.NumberOfFailedSuboperations == 1
    assert status.ErrorComment == f"1 not sent: no decoder for {J2K_PART2}"
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == undecodable
    # C-MOVE: the same
    scp = Storescp(archive.dest_port, tmp_path / "moved")
    try:
        proc = movescu(archive.eng.dicom_port, archive.mixed.uid)
        final = _final_response(proc.stdout + proc.stderr)
        wait_until(lambda: len(list(scp.out.iterdir())) >= len(archive.mixed.files) - 1, timeout=20,
                   interval=0.1, message="storescp to have written the decodable instances")
    finally:
        scp.stop()
    assert sorted(_received(scp.out)) == sorted(got)
    assert "0xb000" in final.lower() and f"1 not sent: no decoder for {J2K_PART2}" in final, final
    assert re.search(r"Failed Suboperations\s*:\s*1\b", final), final
    assert undecodable in final  # Failed SOP Instance UID List
    lines = [r.getMessage() for r in caplog.records if undecodable in r.getMessage()]
    # getscu aborts after this final response (it does not read its identifier before releasing): the
    # engine's connection-closed handler must take that in its stride
    handler_errors = [r.getMessage() for r in caplog.records if "event handler" in r.getMessage()]
    assert handler_errors == [], handler_errors
    # the log names the syntax by its name and UID, once per retrieve (getscu, pynetdicom, movescu)
    assert len(lines) == 3, lines
    assert all(f"no decoder for JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only) ({J2K_PART2})"
               in line for line in lines), lines


def test_decoded_for_is_what_a_retrieve_sends(tmp_path: Path) -> None:
    """The module's API as WADO-RS may use it: a path or an open file in, a dataset to send or write out."""
    source = tmp_path / "j2k.dcm"
    make_instance(source, source=bundled("MR_small_jp2klossless.dcm"))
    before = source.read_bytes()
    original = pydicom.dcmread(source)
    stored = str(original.file_meta.TransferSyntaxUID)
    item = decoded_for(source, [stored, ExplicitVRLittleEndian])
    assert not item.transcoded and item.syntax == stored and item.dataset.PixelData == original.PixelData
    item = decoded_for(source, [JPEGLSLossless, ExplicitVRLittleEndian])
    assert item.transcoded and item.syntax == ExplicitVRLittleEndian and item.stored_syntax == stored
    assert item.dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert item.dataset.SOPInstanceUID == original.SOPInstanceUID  # the same instance, decoded
    out = tmp_path / "decoded.dcm"
    item.dataset.save_as(out, enforce_file_format=True)
    written = pydicom.dcmread(out)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(written.pixel_array, original.pixel_array)
    with source.open("rb") as f:  # implicit VR alone: decoded to explicit, the writer makes it implicit
        item = decoded_for(f, [ImplicitVRLittleEndian])
    assert item.syntax == ImplicitVRLittleEndian and item.dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with pytest.raises(NotAccepted, match=re.escape(stored)):  # only another compressed syntax: never encoded
        decoded_for(source, [JPEGLSLossless])
    assert source.read_bytes() == before
    # a dataset already read, with no pixel data (a report filed under a compressed syntax): nothing to
    # decode, it is explicit VR little endian as it is
    no_pixels = pydicom.dcmread(source)
    del no_pixels.PixelData
    item = decoded_for(no_pixels, [ExplicitVRLittleEndian])
    assert item.transcoded and item.dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_a_stored_file_gone_fails_its_suboperation_and_the_rest_arrives(archive: Archive, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A file the index lists but storage cannot read (deleted behind the engine's back) is one failed
    sub-operation; the instances after it are still sent (a failure status used to end the retrieve)."""
    caplog.set_level(logging.WARNING, logger="engine")
    storage = Path(archive.eng.settings.storage.dir) / "studies"
    uids = list(archive.mixed.files)
    gone = uids[1]  # the RLE object, sent between the undecodable one and the CT
    [path] = [p for p in storage.rglob("*") if p.is_file() and gone in str(p)]
    path.unlink()
    got, status, identifier = get_with_pynetdicom(archive.eng.dicom_port, archive.mixed, ExplicitVRLittleEndian)
    arrived = [uid for uid in uids if uid != gone and pydicom.dcmread(archive.mixed.files[uid], stop_before_pixels=True)
               .file_meta.TransferSyntaxUID != J2K_PART2]
    assert sorted(got) == sorted(arrived)
    assert status.Status == 0xB000 and status.NumberOfFailedSuboperations == 2, status
    # the reasons in the order met, cut to the 64 characters of an Error Comment
    assert status.ErrorComment.startswith(f"2 not sent: no decoder for {J2K_PART2}; stored file")
    assert any(f"stored file of {gone} unreadable" in r.getMessage() for r in caplog.records)
    assert identifier is not None and sorted(identifier.FailedSOPInstanceUIDList) == sorted(set(uids) - set(arrived))
