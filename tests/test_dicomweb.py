"""DICOMweb (issue 17 item 1): QIDO-RS and WADO-RS at /dicomweb/ against a running engine, with
dicomweb-client (the DICOMweb client of many Python imaging projects) over real HTTP, studies stored
with dcmtk's storescu; expected values come from pydicom's reading of the files sent and stored."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.encaps import get_frame
from sqlalchemy import select

from engine.config import Settings, load_settings
from engine.standin_ehr import StandInEHR
from engine.store.models import AuditEvent, Instance
from engine.store.tokens import Role
from engine.yamlfile import ConfigFileError
from tests.conftest import TOKEN, RunningEngine, make_settings
from tests.dicomutil import (
    ORTHANC,
    Obj,
    bundled,
    free_port,
    make_instance,
    orthanc_process,
    propose,
    require_dcmtk,
    storescu,
)
from tests.test_outbound import EHR_TOKEN, WAIT, fast_retries, order_and_images, seg, studies_at_ehr, wake
from tests.test_reconciliation import settle
from tests.test_roles import create_tokens

ANY_SYNTAX = (("application/dicom", "*"),)


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


class Archive:
    """Three studies stored over C-STORE: two CT instances (one series), an MR, and a multi-frame MR
    with a JPEG 2000 NM in a second series."""

    def __init__(self, eng: RunningEngine, tmp: Path) -> None:
        self.eng = eng
        self.ct = make_instance(tmp / "a1.dcm", patient_id="QW1", name="SMITH^ANNA", accession="WA1",
                                edit=lambda ds: setattr(ds, "StudyDate", "20240110"))
        self.ct2 = make_instance(tmp / "a2.dcm", patient_id="QW1", name="SMITH^ANNA", accession="WA1",
                                 study_uid=self.ct.study_uid, series_uid=self.ct.series_uid, number=2,
                                 edit=lambda ds: setattr(ds, "StudyDate", "20240110"))
        self.mr = make_instance(tmp / "b1.dcm", source=bundled("MR_small.dcm"), patient_id="QW2", name="Jones^Bob",
                                accession="WB1", edit=lambda ds: setattr(ds, "StudyDate", "20240301"))
        self.multi = make_instance(tmp / "c1.dcm", source=bundled("emri_small.dcm"), patient_id="QW3",
                                   name="Brown^Carl", accession="WC1",
                                   edit=lambda ds: setattr(ds, "StudyDate", "20240415"))
        self.j2k = make_instance(tmp / "c2.dcm", source=bundled("JPEG2000.dcm"), patient_id="QW3", name="Brown^Carl",
                                 accession="WC1", study_uid=self.multi.study_uid,
                                 edit=lambda ds: setattr(ds, "StudyDate", "20240415"))
        for objs in ([self.ct, self.ct2, self.mr, self.multi], [self.j2k]):
            proc = storescu(eng.dicom_port, [o.path for o in objs], extra=propose(objs[0].path))
            assert proc.returncode == 0, proc.stdout + proc.stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.eng.engine.http_port}/dicomweb"

    def client(self, token: str | None = TOKEN) -> DICOMwebClient:
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return DICOMwebClient(url=self.url, session=session)

    def get(self, path: str, token: str | None = TOKEN, **headers: str) -> requests.Response:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(self.url + path, headers=headers, timeout=30)

    def stored(self, obj: Obj) -> bytes:
        """The stored file's bytes (what the engine keeps, read from its storage)."""
        storage = self.eng.engine.storage
        assert storage is not None
        with self.eng.db.read_session() as s:
            key = s.execute(select(Instance.storage_key).where(Instance.sop_instance_uid == obj.sop_uid)).scalar_one()
        with storage.open(key) as f:
            return f.read()

    def dataset(self, obj: Obj) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.stored(obj)))


@pytest.fixture
def archive(settings: Settings, tmp_path: Path) -> Iterator[Archive]:
    settings.dicom.stable_seconds = 3600
    eng = RunningEngine(settings).start()
    try:
        yield Archive(eng, tmp_path / "objects")
    finally:
        eng.stop()


def value(result: dict[str, Any], tag: str) -> Any:
    found = result.get(tag, {}).get("Value")
    return found[0] if found else None


def uids(results: list[dict[str, Any]], tag: str = "0020000D") -> list[str]:
    return sorted(value(r, tag) for r in results)


def test_qido_study_search_with_the_standard_matching(archive: Archive) -> None:
    client = archive.client()
    [found] = client.search_for_studies(search_filters={"PatientID": "QW1"})
    ds = archive.dataset(archive.ct)
    assert value(found, "0020000D") == ds.StudyInstanceUID and value(found, "00080050") == ds.AccessionNumber
    assert found["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": str(ds.PatientName)}]}
    assert value(found, "00080020") == ds.StudyDate and value(found, "00100030") == ds.PatientBirthDate
    assert found["00080061"] == {"vr": "CS", "Value": [ds.Modality]}
    assert value(found, "00201206") == 1 and value(found, "00201208") == 2
    assert value(found, "00081190") == f"{archive.url}/studies/{ds.StudyInstanceUID}"
    assert {"00080020", "00080030", "00080050", "00080061", "00080090", "00100010", "00100020", "00100030",
            "00100040", "0020000D", "00200010", "00201206", "00201208", "00081190"} <= set(found)
    # a range, a case-insensitive name wildcard, a modality, a tag instead of a keyword, a UID list
    assert uids(client.search_for_studies(search_filters={"StudyDate": "20240101-20240331"})) == sorted(
        [archive.ct.study_uid, archive.mr.study_uid])
    assert uids(client.search_for_studies(search_filters={"PatientName": "smi*"})) == [archive.ct.study_uid]
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == sorted(
        [archive.mr.study_uid, archive.multi.study_uid])
    assert uids(client.search_for_studies(search_filters={"00100020": "QW2"})) == [archive.mr.study_uid]
    listed = f"{archive.ct.study_uid},{archive.multi.study_uid}"
    assert uids(client.search_for_studies(search_filters={"StudyInstanceUID": listed})) == sorted(
        [archive.ct.study_uid, archive.multi.study_uid])
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    # includefield adds what the defaults leave out; paging with limit and offset
    [with_desc] = client.search_for_studies(search_filters={"PatientID": "QW2"}, fields=["StudyDescription"])
    assert "00081030" in with_desc and "00081030" not in client.search_for_studies(
        search_filters={"PatientID": "QW2"})[0]
    pages = [client.search_for_studies(limit=2, offset=o) for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 1, 0]
    assert uids(pages[0] + pages[1]) == sorted([archive.ct.study_uid, archive.mr.study_uid, archive.multi.study_uid])


def test_qido_series_and_instances(archive: Archive) -> None:
    client = archive.client()
    series = client.search_for_series(archive.multi.study_uid)
    assert uids(series, "0020000E") == sorted([archive.multi.series_uid, archive.j2k.series_uid])
    assert "0020000D" not in series[0] and value(series[0], "00080060") in ("MR", "NM")
    [nm] = client.search_for_series(search_filters={"Modality": "NM"})  # all series: study attributes too
    assert value(nm, "0020000E") == archive.j2k.series_uid and value(nm, "0020000D") == archive.multi.study_uid
    instances = client.search_for_instances(archive.ct.study_uid, archive.ct.series_uid)
    assert uids(instances, "00080018") == sorted([archive.ct.sop_uid, archive.ct2.sop_uid])
    [second] = client.search_for_instances(archive.ct.study_uid, search_filters={"InstanceNumber": "2"})
    assert value(second, "00080018") == archive.ct2.sop_uid and value(second, "00200013") == 2
    ds = archive.dataset(archive.ct2)
    assert value(second, "00080016") == ds.SOPClassUID and value(second, "00083002") == ds.file_meta.TransferSyntaxUID
    [multi] = client.search_for_instances(search_filters={"PatientID": "QW3", "Modality": "MR"})
    assert value(multi, "00280008") == 10


def test_qido_refuses_what_it_cannot_match_with_a_reason(archive: Archive) -> None:
    for query, words in (("?StationAETitle=X", "cannot be matched"), ("?limit=abc", "limit is a whole number"),
                         ("?fuzzymatching=true", "fuzzymatching is not supported"),
                         ("?NoSuchAttribute=1", "neither a DICOM keyword"),
                         ("?00400275.00401001=1", "inside sequences")):
        answer = archive.get("/studies" + query)
        assert answer.status_code == 400 and words in answer.json()["detail"], (query, answer.text)


def test_wado_retrieve_gives_the_stored_files_byte_for_byte(archive: Archive) -> None:
    client = archive.client()
    got = client.retrieve_study(archive.ct.study_uid, media_types=ANY_SYNTAX)
    assert sorted(d.SOPInstanceUID for d in got) == sorted([archive.ct.sop_uid, archive.ct2.sop_uid])
    answer = archive.get(f"/studies/{archive.multi.study_uid}",
                         Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert answer.status_code == 200
    parts = multipart(answer)
    assert sorted(parts) == sorted([archive.stored(archive.multi), archive.stored(archive.j2k)])
    # every part as stored: the whole answer's length is known before it starts
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    assert "Transfer-Encoding" not in answer.headers
    one = client.retrieve_instance(archive.j2k.study_uid, archive.j2k.series_uid, archive.j2k.sop_uid,
                                   media_types=(("application/dicom", "1.2.840.10008.1.2.4.91"),))
    assert one.SOPInstanceUID == archive.j2k.sop_uid
    # Explicit VR Little Endian (the default) is not how the JPEG 2000 object is stored: it is decoded
    # (tests/test_dicomweb_transcode.py); another compressed syntax is refused with 406, saying why
    decoded = archive.get(f"/studies/{archive.multi.study_uid}", Accept='multipart/related; type="application/dicom"')
    assert decoded.status_code == 200 and archive.stored(archive.j2k) not in multipart(decoded)
    assert decoded.headers["Transfer-Encoding"] == "chunked"  # a decoded part's size is known only once decoded
    refused = archive.get(f"/studies/{archive.multi.study_uid}", Accept='multipart/related; type="application/dicom"; '
                                                                        'transfer-syntax=1.2.840.10008.1.2.4.80')
    assert refused.status_code == 406 and "1.2.840.10008.1.2.4.91" in refused.json()["detail"]
    series = client.retrieve_series(archive.mr.study_uid, archive.mr.series_uid)  # stored explicit VR LE
    assert [d.SOPInstanceUID for d in series] == [archive.mr.sop_uid]


def large_study(archive: Archive, tmp_path: Path, count: int, accession: str) -> list[Obj]:
    """``count`` instances of one series stored by storescu, every other one of 2.4 MB (over the 1 MiB
    read at a time)."""
    def large(ds: pydicom.Dataset) -> None:  # 1200 x 1000 16-bit pixels: 2.4 MB
        ds.Rows, ds.Columns = 1200, 1000
        ds.PixelData = np.arange(1200 * 1000, dtype=np.uint16).tobytes()
    first = make_instance(tmp_path / f"{accession}-0.dcm", patient_id="QW9", accession=accession, edit=large)
    objs = [first] + [make_instance(tmp_path / f"{accession}-{i}.dcm", patient_id="QW9", accession=accession,
                                    number=i + 1, study_uid=first.study_uid, series_uid=first.series_uid,
                                    edit=large if i % 2 == 0 else None) for i in range(1, count)]
    proc = storescu(archive.eng.dicom_port, [o.path for o in objs])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return objs


def storage_path(archive: Archive, obj: Obj) -> Path:
    storage = archive.eng.engine.storage
    assert storage is not None
    with archive.eng.db.read_session() as s:
        key = s.execute(select(Instance.storage_key).where(Instance.sop_instance_uid == obj.sop_uid)).scalar_one()
    path = storage.local_path(key)
    assert path is not None
    return path


def test_wado_retrieve_sends_files_over_the_read_size_whole_and_leaves_out_a_lost_one(archive: Archive,
                                                                                      tmp_path: Path) -> None:
    """The study is streamed file by file, the next file read while one is sent: files larger than the
    1 MiB read at a time arrive whole and in order. A file gone from storage is found before the answer
    starts: its part is left out and the answer says so (206, Warning), the parts around it intact."""
    objs = large_study(archive, tmp_path, 5, "WL1")
    stored = {o.sop_uid: archive.stored(o) for o in objs}
    assert sum(len(b) > 2 * (1 << 20) for b in stored.values()) == 3
    storage_path(archive, objs[1]).unlink()
    answer = archive.get(f"/studies/{objs[0].study_uid}",
                         Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert answer.status_code == 206
    assert answer.headers["Warning"] == '299 - "1 of 5 instances left out: its file cannot be read from storage"'
    assert multipart(answer) == [stored[o.sop_uid] for o in objs if o is not objs[1]]
    assert int(answer.headers["Content-Length"]) == len(answer.content)


def test_wado_retrieve_aborts_rather_than_send_a_file_that_changed_size_meanwhile(archive: Archive,
                                                                                   tmp_path: Path) -> None:
    """The answer's Content-Length is made of the files' sizes before the first byte goes out. A file
    replaced by one of another size before its turn (files are opened a group at a time, a group
    ahead of the one being sent) cannot keep that promise: the connection is aborted, so the client
    sees a failed transfer, never a malformed or short one; the engine serves on."""
    objs = large_study(archive, tmp_path, 40, "WL2")  # 48 MB: the first group is more than the socket buffers
    url = f"{archive.url}/studies/{objs[0].study_uid}"
    with requests.get(url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; '
                      'type="application/dicom"; transfer-syntax=*'}, stream=True, timeout=30) as answer:
        assert answer.status_code == 200
        first = answer.raw.read(1024)
        assert first.startswith(b"--")
        path = storage_path(archive, objs[-1])  # replaced whole, as files are, by one 100 bytes longer
        grown = path.with_name("grown.tmp")
        grown.write_bytes(path.read_bytes() + b"\0" * 100)
        grown.replace(path)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # urllib3: IncompleteRead
            for _ in answer.iter_content(1 << 20):
                pass
    after = archive.get(f"/studies/{objs[0].study_uid}",  # the engine serves on, with the new size
                        Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert after.status_code == 200 and len(multipart(after)) == 40


def test_wado_retrieve_over_https_sends_the_stored_files(settings: Settings, tmp_path: Path) -> None:
    """Over TLS the kernel cannot send the files (sendfile): asyncio copies them through the TLS layer
    instead, and the answer is the same, byte for byte, with its Content-Length."""
    from engine.tls import TLSSettings
    from tests.certs import make_pki
    pki = make_pki(tmp_path / "pki")
    settings.http.tls = TLSSettings(cert=str(pki.server.cert), key=str(pki.server.key), ca=str(pki.ca))
    eng = RunningEngine(settings).start()
    try:
        archive = Archive(eng, tmp_path / "objects")
        objs = large_study(archive, tmp_path, 3, "WL3")
        answer = requests.get(f"https://localhost:{eng.engine.http_port}/dicomweb/studies/{objs[0].study_uid}",
                              headers={"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; '
                                       'type="application/dicom"; transfer-syntax=*'}, verify=str(pki.ca), timeout=30)
        assert answer.status_code == 200
        assert int(answer.headers["Content-Length"]) == len(answer.content)
        assert multipart(answer) == [archive.stored(o) for o in objs]
    finally:
        eng.stop()


def multipart(answer: requests.Response) -> list[bytes]:
    ctype = answer.headers["Content-Type"]
    assert ctype.startswith("multipart/related")
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = answer.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        _head, _, content = chunk.partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        out.append(content[:-2])
    return out


def test_wado_metadata_has_every_attribute_and_bulk_data_by_uri(archive: Archive) -> None:
    client = archive.client()
    meta = client.retrieve_instance_metadata(archive.ct.study_uid, archive.ct.series_uid, archive.ct.sop_uid)
    ds = archive.dataset(archive.ct)
    expected = ds.to_json_dict(bulk_data_threshold=1 << 30)
    instance_url = (f"{archive.url}/studies/{archive.ct.study_uid}/series/{archive.ct.series_uid}/instances/"
                    f"{archive.ct.sop_uid}")
    bulk = {tag for tag, elem in expected.items() if len(base64.b64decode(elem.get("InlineBinary", ""))) > 1024}
    assert "7FE00010" in bulk and "00431029" in bulk  # the pixel data and a private OB of 2 kB
    assert set(meta) == set(expected)
    assert {k: v for k, v in meta.items() if k not in bulk} == {k: v for k, v in expected.items() if k not in bulk}
    for tag in bulk:  # binary values over 1 kB by URI, each giving the value's bytes
        assert meta[tag] == {"vr": expected[tag]["vr"], "BulkDataURI": f"{instance_url}/bulkdata/{tag}"}
        assert client.retrieve_bulkdata(meta[tag]["BulkDataURI"]) == [ds[int(tag, 16)].value]
    study = client.retrieve_study_metadata(archive.multi.study_uid)
    assert sorted(m["00080018"]["Value"][0] for m in study) == sorted([archive.multi.sop_uid, archive.j2k.sop_uid])
    series = client.retrieve_series_metadata(archive.ct.study_uid, archive.ct.series_uid)
    assert len(series) == 2


def test_wado_metadata_is_read_again_when_the_stored_file_changes(archive: Archive) -> None:
    """Metadata read once is kept (per storage key: a key names one content). A file replaced behind
    the engine's back, even by one of the same size, is read again: the answer never goes stale."""
    client = archive.client()
    ct = archive.ct

    def name() -> str:
        meta = client.retrieve_instance_metadata(ct.study_uid, ct.series_uid, ct.sop_uid)
        return str(meta["00100010"]["Value"][0]["Alphabetic"])
    first = name()
    assert name() == first == str(archive.dataset(ct).PatientName)  # the second from what was kept
    path = storage_path(archive, ct)
    ds = pydicom.dcmread(path)
    ds.PatientName = "X" * len(str(ds.PatientName))  # the same length: the file keeps its size
    replaced = path.with_name("replaced.tmp")
    ds.save_as(replaced, enforce_file_format=True)
    assert replaced.stat().st_size == path.stat().st_size
    replaced.replace(path)
    assert name() == str(ds.PatientName)


def test_metadata_cache_keeps_what_fits_and_drops_the_least_recently_used() -> None:
    from engine.web.dicomweb import InstanceMetadata, MetadataCache

    def meta(n: int) -> InstanceMetadata:
        return InstanceMetadata("1.2", ("{" + " " * n, "}"), (("7FE00010", "OW"),), (n, 1))
    cache = MetadataCache(max_bytes=3 * meta(1000).size)
    for key in "abc":
        cache.put(key, meta(1000))
    assert cache.get("a", (1000, 1)) is not None  # a is now the most recently used
    cache.put("d", meta(1000))
    assert cache.get("b", (1000, 1)) is None and len(cache) == 3  # b, the least recently used, is dropped
    assert cache.get("a", (1000, 2)) is None  # the file changed since: not used
    cache.put("huge", meta(10_000))
    assert cache.get("huge", (10_000, 1)) is None and len(cache) == 3  # larger than the whole cache: not kept
    assert meta(3).json_text("http://e/b") == '{   {"vr": "OW", "BulkDataURI": "http://e/b/7FE00010"}}'


def test_wado_frames_native_and_encapsulated(archive: Archive) -> None:
    client = archive.client()
    ds = archive.dataset(archive.multi)
    size = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    frames = client.retrieve_instance_frames(archive.multi.study_uid, archive.multi.series_uid, archive.multi.sop_uid,
                                             frame_numbers=[1, 3])
    assert frames == [ds.PixelData[:size], ds.PixelData[2 * size:3 * size]]
    j2k = archive.dataset(archive.j2k)
    [frame] = client.retrieve_instance_frames(archive.j2k.study_uid, archive.j2k.series_uid, archive.j2k.sop_uid,
                                              frame_numbers=[1],
                                              media_types=(("application/octet-stream", "*"),))
    assert frame == get_frame(j2k.PixelData, 0, number_of_frames=1)
    missing = archive.get(f"/studies/{archive.multi.study_uid}/series/{archive.multi.series_uid}/instances/"
                          f"{archive.multi.sop_uid}/frames/11")
    assert missing.status_code == 404 and "has 10" in missing.json()["detail"]


def test_wado_rendered_jpeg_and_png_at_the_images_size(archive: Archive) -> None:
    client = archive.client()
    ct = archive.dataset(archive.ct)
    jpeg = client.retrieve_instance_rendered(archive.ct.study_uid, archive.ct.series_uid, archive.ct.sop_uid,
                                             media_types=("image/jpeg",))
    png = client.retrieve_instance_rendered(archive.ct.study_uid, archive.ct.series_uid, archive.ct.sop_uid,
                                            media_types=("image/png",), params={"window": "40,400,linear"})
    for data, fmt in ((jpeg, "JPEG"), (png, "PNG")):
        image = Image.open(io.BytesIO(data))
        assert image.format == fmt and image.size == (ct.Columns, ct.Rows)
    narrow = client.retrieve_instance_rendered(archive.ct.study_uid, archive.ct.series_uid, archive.ct.sop_uid,
                                               media_types=("image/png",), params={"window": "0,2"})
    # a window 2 wide leaves black and white only; the one 400 wide shades of grey
    assert greys(narrow) <= 3 < greys(png)
    frame = client.retrieve_instance_frames_rendered(archive.multi.study_uid, archive.multi.series_uid,
                                                     archive.multi.sop_uid, frame_numbers=[4],
                                                     media_types=("image/png",), params={"viewport": "32,32"})
    assert Image.open(io.BytesIO(frame)).size == (32, 32)
    j2k = archive.dataset(archive.j2k)
    nm = client.retrieve_instance_rendered(archive.j2k.study_uid, archive.j2k.series_uid, archive.j2k.sop_uid)
    assert Image.open(io.BytesIO(nm)).size == (j2k.Columns, j2k.Rows)
    bad = archive.get(f"/studies/{archive.ct.study_uid}/series/{archive.ct.series_uid}/instances/"
                      f"{archive.ct.sop_uid}/rendered?window=abc")
    assert bad.status_code == 400 and "center,width" in bad.json()["detail"]


def greys(image: bytes) -> int:
    return len(np.unique(np.asarray(Image.open(io.BytesIO(image)))))


def test_tokens_roles_and_one_audit_row_per_request(settings: Settings, tmp_path: Path) -> None:
    secrets = create_tokens(settings, {"viewer": frozenset({Role.READ}), "scraper": frozenset({Role.METRICS})})
    settings.dicom.stable_seconds = 3600
    eng = RunningEngine(settings).start()
    try:
        arc = Archive(eng, tmp_path / "objects")
        path = f"/studies/{arc.ct.study_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        assert arc.get(path, token=None, Accept=accept).status_code == 401
        refused = arc.get(path, token=secrets["scraper"], Accept=accept)
        assert refused.status_code == 403 and refused.json()["missing_role"] == "read"
        before = audit_rows(eng, arc.ct.study_uid)
        answer = arc.get(path, token=secrets["viewer"], Accept=accept)
        assert answer.status_code == 200 and len(multipart(answer)) == 2
        rows = audit_rows(eng, arc.ct.study_uid)[len(before):]
        assert [(r.agent, r.action, r.count) for r in rows] == [("viewer", "read", 2)]
        assert arc.client(secrets["viewer"]).search_for_studies(search_filters={"PatientID": "QW1"})
    finally:
        eng.stop()


def audit_rows(eng: RunningEngine, study_uid: str) -> list[AuditEvent]:
    with eng.db.read_session() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.study_uid == study_uid)
                              .order_by(AuditEvent.id)).scalars())


def test_published_dicomweb_base_defaults_to_the_engines_own(workdir: Path, db_url: str) -> None:
    s = make_settings(workdir, db_url)
    assert s.dicomweb_base() == ""  # an ephemeral port has no address to publish
    s.http.port = 8042
    assert s.dicomweb_base() == "http://127.0.0.1:8042/dicomweb"
    s.http.public_base_url = "https://images.hospital.example/"
    assert s.dicomweb_base() == "https://images.hospital.example/dicomweb"
    s.ehr.dicomweb_base = "https://pacs.example/wado-rs"
    assert s.dicomweb_base() == "https://pacs.example/wado-rs"
    with pytest.raises(ConfigFileError) as exc:
        load_settings(env={"RADBRIDGE_HTTP_PUBLIC_BASE_URL": "images.example:8080"})
    assert "RADBRIDGE_HTTP_PUBLIC_BASE_URL: 'images.example:8080' is not an http(s):// URL" in str(exc.value)
    with pytest.raises(ConfigFileError) as exc:
        load_settings(env={"RADBRIDGE_HTTP_PUBLIC_BASE_URL": "https://rb:pw-9@images.example"})
    assert "holds a password" in str(exc.value) and "pw-9" not in str(exc.value)



def test_imagingstudy_and_oru_link_to_the_engines_own_wado_rs(workdir: Path, db_url: str, tmp_path: Path) -> None:
    """No [ehr] dicomweb_base: what the EHR gets points at this engine's /dicomweb, and the link works."""
    with StandInEHR(token=EHR_TOKEN) as ehr:
        fast_retries(workdir)
        s = make_settings(workdir, db_url)
        s.dicom.stable_seconds = 3600
        s.ehr.mllp, s.ehr.fhir_base, s.ehr.fhir_token = ehr.mllp_address, ehr.fhir_base, EHR_TOKEN
        s.http.port = free_port()
        eng = RunningEngine(s).start()
        try:
            obj = order_and_images(eng, tmp_path, "MRN7", "ACC7", n=1)
            settle(eng)
            wake(eng)
            assert ehr.wait_for(lambda: len(ehr.oru_messages()) == 1
                                and len(studies_at_ehr(ehr, obj.study_uid)) == 1, WAIT)
            base = f"http://127.0.0.1:{s.http.port}/dicomweb"
            [res] = studies_at_ehr(ehr, obj.study_uid)
            [endpoint] = res["contained"]
            assert endpoint["address"] == base and res["endpoint"] == [{"reference": "#dicomweb"}]
            [oru] = ehr.oru_messages()
            assert seg(oru, "OBX", 2)[5].startswith(f"{base}/studies/{obj.study_uid}^")
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {TOKEN}"
            got = DICOMwebClient(url=endpoint["address"], session=session).retrieve_study(obj.study_uid,
                                                                                         media_types=ANY_SYNTAX)
            assert [d.SOPInstanceUID for d in got] == [obj.sop_uid]
        finally:
            eng.stop()


ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Debian's Orthanc with its DICOMweb plugin on loopback (as bench/dicom_ingest.py runs it): (DICOM port,
    HTTP port)."""
    if not (ORTHANC.exists() and ORTHANC_DICOMWEB.exists()):
        pytest.fail("Orthanc and its DICOMweb plugin are not installed (scripts/test installs them; or "
                    "apt-get install orthanc orthanc-dicomweb)")
    with orthanc_process(tmp_path, {"Plugins": [str(ORTHANC_DICOMWEB)],
                                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}) as ports:
        yield ports


# differences docs/dicomweb.md lists and justifies: Orthanc gives the file's Specific Character Set and
# Timezone Offset From UTC, which the index does not hold; the engine gives Instance Availability (a
# default attribute of PS3.18 Table 6.7.1-2)
JUSTIFIED = {"study 00080005", "study 00080201", "study 00080056"}


def comparable(element: dict[str, Any] | None) -> Any:
    """An attribute with what legitimately differs taken out: the host, port and root of a URL (each
    server names itself), and whether a binary value is inline or by URI (Orthanc gives every binary
    value by URI, the engine those over 1 kB)."""
    if element is None:
        return None
    if "BulkDataURI" in element or "InlineBinary" in element:
        return {"vr": element.get("vr"), "binary": True}
    if element.get("vr") == "UR":
        return {"vr": "UR", "Value": [v.split("/studies/", 1)[1] for v in element.get("Value", [])]}
    return element


def test_qido_and_metadata_agree_with_orthancs_dicomweb(archive: Archive, orthanc: tuple[int, int]) -> None:
    dicom_port, http_port = orthanc
    files = [archive.ct.path, archive.ct2.path, archive.mr.path]
    proc = storescu(dicom_port, files, aet="ORTHANC")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web")
    ours = archive.client()
    differences: dict[str, tuple[Any, Any]] = {}
    compared = 0
    for uid in (archive.ct.study_uid, archive.mr.study_uid):
        [a] = ours.search_for_studies(search_filters={"StudyInstanceUID": uid})
        [b] = theirs.search_for_studies(search_filters={"StudyInstanceUID": uid})
        pairs = [("study", a, b)]
        pairs += [("metadata", one, other) for one, other in zip(
            sorted(ours.retrieve_study_metadata(uid), key=sop), sorted(theirs.retrieve_study_metadata(uid), key=sop),
            strict=True)]
        for what, one, other in pairs:
            for tag in set(one) | set(other):
                compared += 1
                if comparable(one.get(tag)) != comparable(other.get(tag)):
                    differences[f"{what} {tag}"] = (one.get(tag), other.get(tag))
    assert compared > 300  # every attribute of three instances' metadata, not a handful
    assert set(differences) == JUSTIFIED, {k: v for k, v in differences.items() if k not in JUSTIFIED}


def sop(meta: dict[str, Any]) -> str:
    return str(meta["00080018"]["Value"][0])
