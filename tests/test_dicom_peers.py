"""Issue 15 item 4: calling AE titles tied to host addresses (options.calling_ae_hosts of a DICOM
channel). dcmtk's echoscu/storescu connect from 127.0.0.1; pynetdicom binds its end to 127.0.0.2 to
come from another (loopback) address."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from engine.store.models import Instance
from tests.conftest import REPO, RunningEngine, start_dicom_engine
from tests.dicomutil import make_instance, require_dcmtk, run, storescu
from tests.test_cli import radbridge

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


def echo(eng: RunningEngine, calling: str) -> str:
    out = run(["echoscu", "-v", "-aet", calling, "-aec", "RADBRIDGE", "127.0.0.1", str(eng.dicom_port)])
    return "accepted" if out.returncode == 0 else out.stdout + out.stderr


def echo_from(eng: RunningEngine, calling: str, source: str) -> tuple[bool, tuple[int | None, ...] | None]:
    """An association from ``source`` (a loopback address) with pynetdicom: accepted, or the reject's
    (result, source, reason)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", eng.dicom_port, ae_title="RADBRIDGE", bind_address=(source, 0))
    if assoc.is_established:
        assoc.release()
        return True, None
    rsp = assoc.acceptor.primitive
    return False, ((rsp.result, rsp.result_source, rsp.diagnostic) if assoc.is_rejected and rsp is not None else None)


def test_calling_ae_titles_are_tied_to_their_addresses(workdir: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engine")
    eng = start_dicom_engine(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}",
                             calling_ae_hosts={"CT1": ["127.0.0.1"], "CT2": ["127.0.0.2/32"], "MR1": ["10.0.0.5"]})
    try:
        assert echo(eng, "CT1") == "accepted"
        # a title that is not listed, and a listed title from an address not allowed for it
        for calling in ("INTRUDER", "MR1", "CT2"):
            assert "Calling AE Title Not Recognized" in echo(eng, calling)
        assert echo_from(eng, "CT2", "127.0.0.2") == (True, None)
        assert echo_from(eng, "CT1", "127.0.0.2") == (False, (1, 1, 3))  # rejected permanent, ACSE, calling AE
        # C-STORE from a refused peer stores nothing; from its own address it is stored
        obj = make_instance(tmp_path / "x.dcm")
        assert storescu(eng.dicom_port, [obj.path], calling="MR1").returncode != 0
        assert storescu(eng.dicom_port, [obj.path], calling="CT1").returncode == 0
        with eng.db.read_session() as s:
            [inst] = s.execute(select(Instance).where(Instance.sop_instance_uid == obj.sop_uid)).scalars()
            assert inst.calling_aet == "CT1"
        status, channels = eng.api("/api/channels")
        dicom = next(c for c in channels["channels"] if c["name"] == "dicom")
        assert dicom["associations"]["refused"] == 5
        assert dicom["options"]["calling_ae_hosts"] == {"CT1": ["127.0.0.1"], "CT2": ["127.0.0.2/32"],
                                                        "MR1": ["10.0.0.5"]}
    finally:
        eng.stop()
    refusals = [r.getMessage() for r in caplog.records if "calling AE title not recognized" in r.getMessage()]
    assert len(refusals) == 5, refusals
    assert any("MR1" in m and "127.0.0.1" in m and "not allowed for MR1" in m for m in refusals), refusals
    assert any("INTRUDER" in m and "not listed" in m for m in refusals), refusals


def test_with_both_options_a_title_must_be_in_both(workdir: Path) -> None:
    eng = start_dicom_engine(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}",
                             allowed_calling_aets=["CT1", "MR1"], calling_ae_hosts={"CT1": ["127.0.0.0/8"]})
    try:
        assert echo(eng, "CT1") == "accepted"
        assert "Calling AE Title Not Recognized" in echo(eng, "MR1")
    finally:
        eng.stop()


def test_check_names_bad_peer_entries_with_file_and_line(workdir: Path) -> None:
    path = workdir / "channels" / "dicom.yaml"
    shipped = next(t for t in path.read_text().splitlines() if t.startswith("  calling_ae_hosts:"))
    path.write_text(path.read_text().replace(
        shipped, "  calling_ae_hosts:\n    CT1: [127.0.0.1, not-an-address]\n"
        "    THIS_TITLE_IS_TOO_LONG: [10.0.0.1]\n    MR1: 10.0.0.7"))
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(REPO / "mappings")}
    out = radbridge("check", env=env)
    assert out.returncode == 1
    lines = path.read_text().splitlines()
    at = next(i for i, t in enumerate(lines, 1) if "calling_ae_hosts" in t)
    assert f"{path}:{at + 1}: options.calling_ae_hosts.CT1: 'not-an-address' is not an IP address or network" \
        in out.stderr, out.stderr
    assert f"{path}:{at + 2}: options.calling_ae_hosts: 'THIS_TITLE_IS_TOO_LONG' is not an AE title" in out.stderr
    assert f"{path}:{at + 3}: options.calling_ae_hosts.MR1: a list of addresses" in out.stderr
