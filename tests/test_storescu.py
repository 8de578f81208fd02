"""The lean C-STORE SCU (engine/connectors/dicom/storescu.py) on the wire, against real peers on loopback:
dcmtk's storescp, and a pynetdicom SCP whose maximum PDU is smaller than the file (so every instance goes
in fragments), one that refuses, and one behind TLS. The dataset the peer reassembles must be the stored
file's dataset byte for byte."""

from __future__ import annotations

import shutil
import ssl
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from engine.channels import ForwardDestination
from engine.connectors.dicom.forward import DicomForwarder, ForwardItem
from engine.connectors.dicom.storescu import (
    AssociationFailed,
    StoreAssociation,
    StoreResponse,
    dataset_offset,
)
from engine.storage.local import LocalStorage
from engine.store.db import Database
from engine.tls import client_context
from tests.certs import PKI, make_pki
from tests.dicomutil import Obj, StoreSCP, free_port, make_instance, require_dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
TIMEOUT = 10.0


def dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        dataset_offset(f)
        return f.read()


def syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def send(port: int, objs: list[Obj], *, called: str, tls: ssl.SSLContext | None = None,
         sop_class: str = CT) -> tuple[StoreAssociation, list[StoreResponse]]:
    syntax = syntax_of(objs[0].path)
    assoc = StoreAssociation.open("127.0.0.1", port, calling="LEANSCU", called=called,
                                  contexts=[(sop_class, [syntax, ImplicitVRLittleEndian])], timeout=TIMEOUT, tls=tls)
    out = []
    with assoc:
        cid = assoc.accepted.context_for(sop_class, syntax)
        assert cid is not None
        for n, o in enumerate(objs, 1):
            with open(o.path, "rb") as f:
                dataset_offset(f)
                out.append(assoc.store(cid, sop_class, o.sop_uid, n, f))
    assert not assoc.open_  # released
    return assoc, out


class PySCP:
    """A pynetdicom storage SCP for CT taking at most ``max_pdu`` bytes per PDU; it keeps the raw dataset
    bytes of each C-STORE and answers ``status`` (with ``comment``)."""

    def __init__(self, *, max_pdu: int = 16384, status: int = 0, comment: str = "",
                 tls: ssl.SSLContext | None = None, syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,
                                                                                 ImplicitVRLittleEndian)) -> None:
        from pynetdicom import AE, evt
        ae = AE(ae_title="PYSCP")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CT, list(syntaxes))
        self.status, self.comment = status, comment
        self.received: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.port = free_port()
        server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=tls,
                                 evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        assert server is not None
        self.server = server

    def on_store(self, event: Any) -> Dataset:
        try:  # the engine's SCP makes pynetdicom write what it receives to a file (process-wide)
            path = event.dataset_path
        except AttributeError:
            path = None
        data = dataset_bytes(path) if path is not None else event.encoded_dataset(include_meta=False)
        with self.lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] = data
        rsp = Dataset()
        rsp.Status = self.status
        if self.comment:
            rsp.ErrorComment = self.comment
        return rsp

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def objs(tmp_path: Path) -> list[Obj]:
    return [make_instance(tmp_path / f"{n}.dcm", number=n) for n in range(1, 4)]


@pytest.fixture
def small_pdu_scp() -> Iterator[PySCP]:
    peer = PySCP(max_pdu=4096)
    try:
        yield peer
    finally:
        peer.stop()


def test_storescp_stores_what_the_lean_scu_sends(tmp_path: Path, objs: list[Obj]) -> None:
    require_dcmtk()
    scp = StoreSCP(tmp_path / "storescp").start()
    try:
        _assoc, rsps = send(scp.port, objs, called="STORESCP")
        assert rsps == [StoreResponse(0)] * 3
        got = {p.name: pydicom.dcmread(p) for p in (tmp_path / "storescp").iterdir()}
        assert sorted(str(ds.SOPInstanceUID) for ds in got.values()) == sorted(o.sop_uid for o in objs)
        for ds in got.values():
            [o] = [o for o in objs if o.sop_uid == ds.SOPInstanceUID]
            original = pydicom.dcmread(o.path)
            assert ds.PixelData == original.PixelData and ds.PatientName == original.PatientName
    finally:
        scp.stop()


def test_fragments_to_the_peers_smaller_max_pdu(small_pdu_scp: PySCP, objs: list[Obj]) -> None:
    assert len(dataset_bytes(objs[0].path)) > 4 * 4096  # so it goes in several fragments
    assoc, rsps = send(small_pdu_scp.port, objs, called="PYSCP")
    assert assoc.accepted.max_pdu == 4096 and assoc.fragment == 4096 - 6
    assert rsps == [StoreResponse(0)] * 3
    assert small_pdu_scp.received == {o.sop_uid: dataset_bytes(o.path) for o in objs}  # byte for byte


def test_a_refused_instance_reports_the_status_and_error_comment(objs: list[Obj]) -> None:
    peer = PySCP(status=0xA900, comment="does not match SOP class")
    try:
        _assoc, rsps = send(peer.port, objs[:2], called="PYSCP")
    finally:
        peer.stop()
    assert rsps == [StoreResponse(0xA900, "does not match SOP class")] * 2


def test_no_context_accepted_and_nothing_listening(small_pdu_scp: PySCP, objs: list[Obj]) -> None:
    assoc = StoreAssociation.open("127.0.0.1", small_pdu_scp.port, calling="LEANSCU", called="PYSCP",
                                  contexts=[(MR, [ExplicitVRLittleEndian])], timeout=TIMEOUT)
    assert assoc.accepted.contexts == {} and assoc.accepted.syntaxes(MR) == []
    assoc.abort()
    with pytest.raises(AssociationFailed) as exc:
        StoreAssociation.open("127.0.0.1", free_port(), calling="LEANSCU", called="PYSCP",
                              contexts=[(CT, [ExplicitVRLittleEndian])], timeout=TIMEOUT)
    assert exc.value.kind == "refused"


def test_over_tls(tmp_path: Path, objs: list[Obj]) -> None:
    pki: PKI = make_pki(tmp_path / "pki")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    peer = PySCP(tls=server)
    try:
        _assoc, rsps = send(peer.port, objs, called="PYSCP", tls=client_context(str(pki.ca)))
        assert rsps == [StoreResponse(0)] * 3
        assert peer.received == {o.sop_uid: dataset_bytes(o.path) for o in objs}
        with pytest.raises(AssociationFailed):  # a server we do not trust: no association
            send(peer.port, objs, called="PYSCP", tls=client_context(str(pki.rogue_ca)))
    finally:
        peer.stop()


def test_an_instance_in_a_syntax_the_peer_refused_goes_decoded_in_one_it_took(tmp_path: Path, objs: list[Obj]) -> None:
    """The forwarder's fallback: the stored file is explicit VR, the peer takes implicit VR only; the dataset
    is read with pydicom and encoded in implicit VR (the same dataset arrives)."""
    storage = LocalStorage(tmp_path / "store", fsync=False)
    o = objs[0]
    storage_dir = tmp_path / "store"
    shutil.copy(o.path, storage_dir / "one.dcm")
    assert syntax_of(o.path) == ExplicitVRLittleEndian
    peer = PySCP(syntaxes=(ImplicitVRLittleEndian,))
    try:
        dest = ForwardDestination(name="pacs", aet="PYSCP", host="127.0.0.1", port=peer.port, timeout_seconds=TIMEOUT)
        fwd = DicomForwarder(dest, cast(Database, None), storage, calling_aet="LEANSCU")
        item = ForwardItem(1, CT, o.sop_uid, ExplicitVRLittleEndian, "one.dcm")
        with StoreAssociation.open("127.0.0.1", peer.port, calling="LEANSCU", called="PYSCP",
                                   contexts=[(CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
                                   timeout=TIMEOUT) as assoc:
            assert assoc.accepted.syntaxes(CT) == [ImplicitVRLittleEndian]
            assert fwd.store_item(assoc, item, 1) == StoreResponse(0)
    finally:
        peer.stop()
    sent = peer.received[o.sop_uid]
    assert sent != dataset_bytes(o.path)  # re-encoded
    got = read_dataset(BytesIO(sent), is_implicit_VR=True, is_little_endian=True)
    original = pydicom.dcmread(o.path)
    assert got.PixelData == original.PixelData and got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PatientName == original.PatientName
