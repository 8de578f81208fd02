"""The console's studies (issue 16 items 4 and 3) in a real browser: orders sent over real MLLP,
images with dcmtk's storescu, then the exceptions filter, a study page with its series, findings and
evidence, "match an unmatched study by hand" through the form (the reconciler matches it; the order
page lists it), a thumbnail per series for uncompressed and compressed syntaxes (each a PNG of the
expected size whose pixels follow pydicom's own decode of the object sent), a clear 404 for an
instance without pixels, and a read-only token that sees no action and is refused (403) when it
posts anyway. Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.dicom.thumbnail import thumbnail_size
from engine.store.models import AuditEvent
from engine.store.tokens import Role
from tests.browser import Console
from tests.conftest import TOKEN, RunningEngine, start_dicom_engine
from tests.dicomutil import bundled, data_store_file, make_instance, propose, require_dcmtk, storescu
from tests.hl7util import adt, orm
from tests.test_reconciliation import hl7, settle, store
from tests.test_roles import create_tokens
from tests.waiting import wait_until

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def eng(workdir: Path, db_url: str) -> Iterator[RunningEngine]:
    """An engine whose studies become stable only when the test says so (settle)."""
    require_dcmtk()
    e = start_dicom_engine(workdir, db_url)
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture
def tab(eng: RunningEngine, browser: Any) -> Iterator[Console]:
    """A browser tab on ``eng``'s console, logged in with the test token (every role)."""
    t = Console(browser, f"http://127.0.0.1:{eng.engine.http_port}")
    t.login(TOKEN)
    try:
        yield t
    finally:
        t.close()


def recon_state(page: Page) -> str:
    page.reload()
    return page.locator("#recon-state .badge").inner_text()


def unmatched_study(eng: RunningEngine, tmp: Path) -> Any:
    """A patient with an order (accession ACC-CS6), and a stable study whose headers name neither."""
    hl7(eng, adt("A04", "CS6", "White", "Eve", dob="19750315"), orm("NW", "PLCS6", "ACC-CS6", "CS6", modality="CT"))
    obj = store(eng, tmp, 2, accession="WRONG-CS6", patient_id="TMP-CS6", name="UNKNOWN^PATIENT")
    settle(eng)
    return obj


@SQLITE_ONLY
def test_match_an_unmatched_study_by_hand(eng: RunningEngine, tab: Console, tmp_path: Path) -> None:
    obj = unmatched_study(eng, tmp_path)
    other = store(eng, tmp_path, accession="ACC-CS6", patient_id="CS6", name="WHITE^EVE", birth_date="19750315")
    page = tab.open("/studies")
    expect(page.locator(f'#studies tr[data-study="{other.study_uid}"]')).to_be_visible()
    page.get_by_label("Reconciliation").select_option("exceptions")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"reconciliation=exceptions"))
    row = page.locator(f'#studies tr[data-study="{obj.study_uid}"]')
    expect(row).to_contain_text("WRONG-CS6")
    expect(row.locator(".badge").last).to_have_text("unmatched")
    expect(page.locator(f'#studies tr[data-study="{other.study_uid}"]')).to_have_count(0)  # receiving, pending
    tab.shot("studies-exceptions")

    row.get_by_role("link").click()
    expect(page).to_have_url(f"{tab.base}/studies/{obj.study_uid}")
    expect(page.locator("#recon-state .badge")).to_have_text("unmatched")
    expect(page.locator("#series tbody tr")).to_have_count(1)
    expect(page.locator("#series tbody tr td.num").last).to_have_text("2")  # instances of the series
    order_unknown = page.locator("#findings tbody tr", has_text="order_unknown")
    expect(order_unknown.locator("td.evidence").first).to_have_text("WRONG-CS6")  # what the headers said
    tab.shot("study-unmatched")

    page.get_by_label("Order accession number").fill("NO-SUCH-ORDER")
    page.get_by_role("button", name="Match to order").click()
    expect(page.get_by_role("status")).to_have_text(re.compile(r"Not done: no order with accession number"))
    page.get_by_label("Order accession number").fill("ACC-CS6")
    page.get_by_label("Note", exact=True).first.fill("tech picked no worklist item")
    page.get_by_role("button", name="Match to order").click()
    expect(page.get_by_role("status")).to_contain_text("Matched to the order with accession ACC-CS6")
    wait_until(lambda: recon_state(page) == "reconciled", timeout=30, interval=0.3,
               message="the study to be reconciled after the manual match")
    expect(page.locator("#linked-order")).to_contain_text("accession ACC-CS6")
    expect(page.locator("#linked-patient")).to_contain_text("CS6^GENHOSP")
    tab.shot("study-matched")

    page.locator("#linked-order").get_by_role("link").click()
    expect(page.locator(f'#studies tr[data-study="{obj.study_uid}"]')).to_be_visible()
    tab.shot("order-with-study")
    with eng.db.read_session() as s:
        trail = s.execute(select(AuditEvent.action, AuditEvent.status, AuditEvent.agent)
                          .where(AuditEvent.action == "match").order_by(AuditEvent.id)).all()
    assert [(a, st) for a, st, _ in trail] == [("match", 404), ("match", 202)]  # the refused one is on it too
    assert tab.errors == []


@SQLITE_ONLY
def test_accept_a_finding_and_reconcile_again(workdir: Path, db_url: str, browser: Any, tmp_path: Path) -> None:
    eng = start_dicom_engine(workdir, db_url, reconciliation="flag")
    tab = Console(browser, f"http://127.0.0.1:{eng.engine.http_port}")
    try:
        hl7(eng, adt("A04", "CS7", "Smith", "John", dob="19800202", sex="M"), orm("NW", "PLCS7", "ACC-CS7", "CS7"))
        obj = store(eng, tmp_path, accession="ACC-CS7", patient_id="CS7", name="SMIHT^JOHN", birth_date="19800202",
                    sex="M", issuer="GENHOSP")
        settle(eng)
        page = tab.login(TOKEN, f"/studies/{obj.study_uid}")
        expect(page.locator("#recon-state .badge")).to_have_text("flagged")
        mismatch = page.locator("#findings tbody tr", has_text="PatientName")
        expect(mismatch.locator("td.evidence")).to_have_text(["SMIHT^JOHN", "Smith^John"])  # headers vs expected
        expect(mismatch).to_contain_text("(policy flag)")
        tab.shot("study-flagged")
        mismatch.get_by_role("button", name=re.compile("Accept finding")).click()
        expect(page.get_by_role("status")).to_have_text(re.compile(r"Finding \d+ accepted\."))
        expect(page.locator("#findings tbody tr", has_text="PatientName").locator(".badge").last).to_have_text(
            "accepted")
        wait_until(lambda: recon_state(page) == "reconciled", timeout=30, interval=0.3,
                   message="the study to be reconciled once its only finding is accepted")
        expect(page.get_by_role("button", name=re.compile("Accept finding"))).to_have_count(0)
        page.get_by_role("button", name="Reconcile again").click()
        expect(page.get_by_role("status")).to_have_text("The study is queued for reconciliation.")
        wait_until(lambda: recon_state(page) == "reconciled" and "queued" not in page.locator("#recon-state")
                   .inner_text(), timeout=30, interval=0.3, message="the study reconciled again")
        expect(page.locator("#events tbody tr", has_text="reconcile_requested")).not_to_have_count(0)
        tab.shot("study-accepted")
        assert tab.errors == []
    finally:
        tab.close()
        eng.stop()


def _sent(eng: RunningEngine, tmp: Path, study_uid: str, name: str, source: Path, number: int) -> tuple[str, Path]:
    obj = make_instance(tmp / name, source=source, study_uid=study_uid, patient_id="CS8", accession="ACC-CS8",
                        number=1, edit=lambda ds: setattr(ds, "SeriesNumber", number))
    proc = storescu(eng.dicom_port, [obj.path], extra=propose(obj.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return obj.series_uid, obj.path


def _reference(path: Path) -> np.ndarray:
    """pydicom's own decode of the object sent (its middle frame), as one grey plane."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    return pixels.mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float64)


SOURCES = [  # (series number, file, where it comes from, what it is)
    (1, "CT_small.dcm", "pydicom", "explicit VR little endian"),
    (2, "SC_rgb_jpeg_dcmtk.dcm", "pydicom", "JPEG baseline, YBR colour"),
    (3, "JPEG2000.dcm", "pydicom", "JPEG 2000, multi-frame of one"),
    (4, "MR_small_RLE.dcm", "pydicom", "RLE lossless"),
    (5, "emri_small_jpeg_ls_lossless.dcm", "pydicom-data", "JPEG-LS lossless, 10 frames"),
    (6, "JPEG-LL.dcm", "pydicom-data", "JPEG lossless SV1"),
    (7, "RG3_UNCR.dcm", "pydicom-data", "MONOCHROME1, 1760 x 1760"),
]


@SQLITE_ONLY
def test_a_thumbnail_per_series_for_each_syntax(eng: RunningEngine, tab: Console, tmp_path: Path) -> None:
    study_uid = generate_uid()
    sent = {number: _sent(eng, tmp_path, study_uid, f"s{number}.dcm",
                          bundled(name) if where == "pydicom" else data_store_file(name), number)
            for number, name, where, _ in SOURCES}
    page = tab.open(f"/studies/{study_uid}")
    expect(page.locator("#series tbody tr")).to_have_count(len(SOURCES))
    for number, name, _, what in SOURCES:
        series_uid, path = sent[number]
        img = page.locator(f'#series tr[data-series="{series_uid}"] img.thumb')
        expect(img).to_have_attribute("alt", re.compile(rf"Series {number} "))
        answer = page.request.get(f"{tab.base}/studies/{study_uid}/series/{series_uid}/thumbnail.png")
        assert answer.status == 200 and answer.headers["content-type"] == "image/png", (name, answer.text())
        png = Image.open(io.BytesIO(answer.body()))
        assert png.format == "PNG"
        reference = _reference(path)
        assert png.size == thumbnail_size(reference.shape[1], reference.shape[0]), (name, what)
        grey = np.asarray(png.convert("L"), dtype=np.float64)
        assert grey.std() > 0, f"{name}: a constant image"
        scaled = np.asarray(Image.fromarray(reference.astype(np.float32)).resize(png.size), dtype=np.float64)
        relation = float(np.corrcoef(grey.ravel(), scaled.ravel())[0, 1])
        inverted = pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
        assert (relation < -0.8) if inverted else (relation > 0.8), (name, what, relation)
    # and the browser shows each of them (every <img> loaded: a decoded picture of the same size)
    page.reload()
    for img in page.locator("img.thumb").all():
        img.scroll_into_view_if_needed()
        wait_until(lambda i=img: i.evaluate("e => e.complete && e.naturalWidth > 0"), timeout=15,  # type: ignore[misc]
                   message="a thumbnail to load in the browser")
    tab.shot("study-thumbnails")
    assert tab.errors == []


@SQLITE_ONLY
def test_an_instance_without_pixels_gets_a_404_with_the_reason(eng: RunningEngine, tab: Console,
                                                               tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "nopixels.dcm", accession="ACC-CS9", edit=lambda ds: delattr(ds, "PixelData"))
    proc = storescu(eng.dicom_port, [obj.path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = tab.page.request.get(f"{tab.base}/studies/{obj.study_uid}/series/{obj.series_uid}/thumbnail.png")
    assert answer.status == 404 and "no pixel data" in answer.text()
    answer = tab.page.request.get(f"{tab.base}/studies/{obj.study_uid}/series/1.2.3.4/thumbnail.png")
    assert answer.status == 404 and "no such series" in answer.text()
    page = tab.open(f"/studies/{obj.study_uid}")  # the page itself is fine; the image says what it is
    expect(page.locator("img.thumb")).to_have_attribute("alt", re.compile("middle image"))


@SQLITE_ONLY
def test_read_only_token_sees_no_actions_and_is_refused(eng: RunningEngine, browser: Any, tmp_path: Path) -> None:
    obj = unmatched_study(eng, tmp_path)
    secrets = create_tokens(eng.settings, {"viewer": frozenset({Role.READ})})
    viewer = Console(browser, f"http://127.0.0.1:{eng.engine.http_port}")
    try:
        page = viewer.login(secrets["viewer"], f"/studies/{obj.study_uid}")
        expect(page.locator("#recon-state .badge")).to_have_text("unmatched")
        expect(page.locator("#findings tbody tr")).not_to_have_count(0)
        for label in ("Match to order", "Match to patient", "Reconcile again", re.compile("Accept finding")):
            expect(page.get_by_role("button", name=label)).to_have_count(0)
        expect(page.locator("main form")).to_have_count(0)
        viewer.shot("study-read-only")
        csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
        assert csrf
        for action, form in (("match", {"csrf": csrf, "accession": "ACC-CS6"}), ("reconcile", {"csrf": csrf}),
                             ("unmatch", {"csrf": csrf})):
            answer = page.request.post(f"{viewer.base}/studies/{obj.study_uid}/{action}", form=form)
            assert answer.status == 403 and "operate" in answer.text(), (action, answer.status)
        page.reload()
        expect(page.locator("#recon-state .badge")).to_have_text("unmatched")  # nothing changed
    finally:
        viewer.close()
    with eng.db.read_session() as s:
        acted = s.execute(select(AuditEvent.action).where(AuditEvent.agent == "viewer",
                                                          AuditEvent.action.in_(["match", "reconcile", "unmatch"]))
                          ).scalars().all()
    assert acted == []  # refused at the door: no action ran
