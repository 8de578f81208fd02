"""DICOM test helpers: real objects (pydicom's and pydicom-data's test files, rewritten with new
UIDs and demographics) and dcmtk's command-line tools as the peers on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from tests.waiting import stop_process, wait_for_listener


def dcmtk_dir(path: str | None = None) -> Path | None:
    """The directory of dcmtk's tools: the first on PATH holding a storescu that is not in this Python
    environment. An activated virtualenv puts its bin/ first, and pynetdicom installs commands of the
    same names there (storescu, findscu, storescp ...) that take other options and print other lines."""
    env_root = Path(sys.prefix).resolve()
    for entry in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        if not entry:
            continue
        d = Path(entry).resolve()
        if d == env_root or env_root in d.parents:
            continue
        if (d / "storescu").is_file() and os.access(d / "storescu", os.X_OK):
            return d
    return None


class DcmtkMissing(RuntimeError):
    """dcmtk is not installed (or not on PATH outside the virtualenv)."""


def dcmtk_tool(name: str) -> str:
    """The absolute path of dcmtk's ``name`` (storescu, storescp, findscu ...), never pynetdicom's."""
    d = dcmtk_dir()
    if d is None or not (d / name).is_file():
        raise DcmtkMissing(f"dcmtk's {name} was not found on PATH outside {sys.prefix} (install it: apt-get "
                           f"install dcmtk; a {name} in {sys.prefix}/bin is pynetdicom's, which is not it)")
    return str(d / name)


_DCMTK = dcmtk_dir()
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1",  # dcmtk waits ~40 ms per PDU without it
             # dcmtk's directory first, so a bare "storescu" in a subprocess with this env is dcmtk's
             "PATH": os.pathsep.join([*([str(_DCMTK)] if _DCMTK else []), os.environ.get("PATH", "")])}


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
    if dcmtk_dir() is None:
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
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
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


class StoreSCP:
    """dcmtk's storescp (AE STORESCP) on a loopback port writing what it receives to ``out``; ``unique``:
    every C-STORE to a file of its own (+uf), so a resend shows as a second file."""

    def __init__(self, out: Path, port: int | None = None, *, unique: bool = True) -> None:
        self.out = out
        self.port = port or free_port()
        self.unique = unique
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([dcmtk_tool("storescp"), "-aet", "STORESCP", *(["+uf"] if self.unique else []),
                                      "-od", str(self.out), str(self.port)], env=DCMTK_ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_listener(self.port, self.proc, what="storescp")
        return self

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def received(self) -> list[pydicom.Dataset]:
        """Every instance received, one per C-STORE (files still being written are skipped)."""
        out: list[Dataset] = []
        for p in sorted(self.out.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            try:
                out.append(pydicom.dcmread(p, stop_before_pixels=True))
            except Exception:  # noqa: S112 - a file storescp is still writing
                continue
        return out


class RawStoreSCU:
    """A C-STORE SCU at the PDU level (pynetdicom's PDU and DIMSE classes over a plain socket), for
    what a well-behaved SCU never does: send part of an instance, then abort (A-ABORT), drop the
    TCP connection, or go on and finish. The instance is a CT header followed by ``pixel_bytes`` of
    pixel data, generated as it is sent (nothing large is held in memory)."""

    PDU_BYTES = 64 * 1024

    def __init__(self, port: int, *, aet: str = "RADBRIDGE", calling: str = "RAWSCU") -> None:
        from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
        from pynetdicom.pdu_primitives import (
            A_ASSOCIATE,
            ImplementationClassUIDNotification,
            MaximumLengthNotification,
        )
        from pynetdicom.presentation import build_context
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
        from pynetdicom.transport import AddressInformation

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        rq = A_ASSOCIATE()
        rq.application_context_name = UID("1.2.840.10008.3.1.1.1")
        rq.calling_ae_title, rq.called_ae_title = calling, aet
        rq.calling_presentation_address = AddressInformation("127.0.0.1", 0)
        rq.called_presentation_address = AddressInformation("127.0.0.1", port)
        cx = build_context(CTImageStorage, "1.2.840.10008.1.2.1")  # explicit VR little endian
        cx.context_id = 1
        rq.presentation_context_definition_list = [cx]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.PDU_BYTES
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.9")
        rq.user_information = [max_length, impl]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        self.sock.sendall(pdu.encode())
        kind, body = self._read_pdu()
        assert kind == 0x02, f"association not accepted (PDU type {kind:#x})"
        ac = A_ASSOCIATE_AC()
        ac.decode(body)
        self.sop_class = CTImageStorage
        self.pixel_left = 0

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("connection closed by the SCP")
            out += chunk
        return bytes(out)

    def _read_pdu(self) -> tuple[int, bytes]:
        head = self._read_exact(6)
        return head[0], head + self._read_exact(int.from_bytes(head[2:6], "big"))

    def _p_data(self, payload: bytes, *, command: bool, last: bool) -> None:
        header = (1 if command else 0) | (2 if last else 0)
        pdv = (len(payload) + 2).to_bytes(4, "big") + bytes([1, header]) + payload
        self.sock.sendall(b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv)

    def begin(self, sop_uid: str, pixel_bytes: int) -> None:
        """The C-STORE-RQ command and the dataset's header, up to the pixel data's value."""
        from io import BytesIO

        from pynetdicom.dimse_messages import C_STORE_RQ
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.dsutils import encode

        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = self.sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = BytesIO(b"\x00")
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        for p_data in msg.encode_msg(1, self.PDU_BYTES):
            for _cx, pdv in p_data.presentation_data_value_list:
                if pdv[0] & 1:  # command fragments only; the dataset is sent below
                    self._p_data(pdv[1:], command=True, last=bool(pdv[0] & 2))
        ds = pydicom.dcmread(bundled("CT_small.dcm"))
        del ds.PixelData
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.Rows = ds.Columns = 1024
        ds.NumberOfFrames = max(1, pixel_bytes // (1024 * 1024))
        head = encode(ds, False, True)
        assert head is not None
        pixel_header = b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")
        self._p_data(head + pixel_header, command=False, last=False)
        self.pixel_left = pixel_bytes

    def send(self, n_bytes: int) -> None:
        """More of the pixel data (never its last fragment: finish() sends that)."""
        n_bytes = min(n_bytes, self.pixel_left - 1)
        chunk = b"\x00" * (self.PDU_BYTES - 12)
        while n_bytes > 0:
            part = chunk[:n_bytes]
            self._p_data(part, command=False, last=False)
            n_bytes -= len(part)
            self.pixel_left -= len(part)

    def finish(self) -> Dataset:
        """Send the rest, then the C-STORE-RSP's command set (Status, ErrorComment)."""
        from io import BytesIO

        from pynetdicom.dsutils import decode

        self.send(self.pixel_left - 1)
        self._p_data(b"\x00", command=False, last=True)
        self.pixel_left = 0
        command = b""
        while True:
            kind, pdu = self._read_pdu()
            assert kind == 0x04, f"expected P-DATA-TF, got PDU type {kind:#x}"
            at = 6
            last = False
            while at < len(pdu):
                length = int.from_bytes(pdu[at:at + 4], "big")
                control = pdu[at + 5]
                command += pdu[at + 6:at + 4 + length]
                last = bool(control & 2)
                at += 4 + length
            if last:
                return decode(BytesIO(command), True, True)

    def abort(self) -> None:
        """A-ABORT (source: service user), then close."""
        self.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        self.sock.close()

    def drop(self) -> None:
        """Close the TCP connection without a word (a killed process, a pulled cable)."""
        self.sock.close()

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        with contextlib.suppress(OSError, ConnectionError):
            self._read_pdu()
        self.sock.close()


def pynetdicom_get(port: int, study_uid: str, contexts: list[tuple[str, list[str]]], on_store: Any, *,
                   aet: str = "RADBRIDGE", calling: str = "PYGET") -> tuple[Dataset, Dataset | None]:
    """C-GET of a study with pynetdicom as the SCU, the storage SCP role offered in one presentation context
    per (SOP class, transfer syntaxes) of ``contexts`` (getscu puts every syntax in one context per SOP class,
    and the acceptor picks one); ``on_store(event)`` takes each C-STORE and returns its status. Returns the
    final C-GET response's status and identifier (Failed SOP Instance UID List)."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
        if not any(r.sop_class_uid == sop_class for r in roles):
            roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate("127.0.0.1", port, ae_title=aet, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, "the C-GET association was not accepted"
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        responses = [(status, identifier) for status, identifier in
                     assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet) if status]
    finally:
        assoc.release()
    return responses[-1]


ORTHANC = Path("/usr/sbin/Orthanc")


@contextlib.contextmanager
def orthanc_process(tmp_path: Path, config: dict[str, Any]) -> Iterator[tuple[int, int]]:
    """Debian's Orthanc on loopback (AE title ORTHANC, any called AE title, no authentication, its
    storage under ``tmp_path``) with ``config`` added to its configuration, until the block ends: yields
    its (DICOM port, HTTP port) once both accept connections; its output is in tmp_path/orthanc.log."""
    if not ORTHANC.exists():
        pytest.fail("Orthanc is not installed (scripts/test installs it; or apt-get install orthanc)")
    dicom_port, http_port = free_port(), free_port()
    full = {"Name": "radbridge-test", "StorageDirectory": str(tmp_path / "orthanc-storage"),
            "IndexDirectory": str(tmp_path / "orthanc-index"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
            "DicomCheckCalledAet": False, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, **config}
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(full))
    with open(tmp_path / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_for_listener(http_port, proc, what="Orthanc")
            wait_for_listener(dicom_port, proc, what="Orthanc")
            yield dicom_port, http_port
        finally:
            stop_process(proc, 30)
