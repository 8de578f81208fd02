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
def running(workdir: Path, db_url: str) -> Iterator[RunningEngine]:
    """This module's engine (the `console` fixture's too): studies become stable when a test settles them."""
    require_dcmtk()
    e = start_dicom_engine(workdir, db_url)
    yield e  # stopped even when the test fails (pytest runs the rest as teardown)
    e.stop()


def recon_state(page: Page) -> str:
    page.reload()
    return page.locator("#recon-state .badge").inner_text()


def unmatched_study(running: RunningEngine, tmp: Path) -> Any:
    """A patient with an order (accession ACC-CS6), and a stable study whose headers name neither."""
    hl7(running, adt("A04", "CS6", "White", "Eve", dob="19750315"), orm("NW", "PLCS6", "ACC-CS6", "CS6", modality="CT"))
    obj = store(running, tmp, 2, accession="WRONG-CS6", patient_id="TMP-CS6", name="UNKNOWN^PATIENT")
    settle(running)
    return obj


@SQLITE_ONLY
def test_match_an_unmatched_study_by_hand(running: RunningEngine, console: Console, tmp_path: Path) -> None:
    obj = unmatched_study(running, tmp_path)
    other = store(running, tmp_path, accession="ACC-CS6", patient_id="CS6", name="WHITE^EVE", birth_date="19750315")
    page = console.open("/studies")
    expect(page.locator(f'#studies tr[data-study="{other.study_uid}"]')).to_be_visible()
    page.get_by_label("Reconciliation").select_option("exceptions")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"reconciliation=exceptions"))
    row = page.locator(f'#studies tr[data-study="{obj.study_uid}"]')
    expect(row).to_contain_text("WRONG-CS6")
    expect(row.locator(".badge").last).to_have_text("unmatched")
    expect(page.locator(f'#studies tr[data-study="{other.study_uid}"]')).to_have_count(0)  # receiving, pending
    console.shot("studies-exceptions")

    row.get_by_role("link").click()
    expect(page).to_have_url(f"{console.base}/studies/{obj.study_uid}")
    expect(page.locator("#recon-state .badge")).to_have_text("unmatched")
    expect(page.locator("#series tbody tr")).to_have_count(1)
    expect(page.locator("#series tbody tr td.num").last).to_have_text("2")  # instances of the series
    order_unknown = page.locator("#findings tbody tr", has_text="order_unknown")
    expect(order_unknown.locator("td.evidence").first).to_have_text("WRONG-CS6")  # what the headers said
    console.shot("study-unmatched")

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
    console.shot("study-matched")

    page.locator("#linked-order").get_by_role("link").click()
    expect(page.locator(f'#studies tr[data-study="{obj.study_uid}"]')).to_be_visible()
    console.shot("order-with-study")
    with running.db.read_session() as s:
        trail = s.execute(select(AuditEvent.action, AuditEvent.status, AuditEvent.agent)
                          .where(AuditEvent.action == "match").order_by(AuditEvent.id)).all()
    assert [(a, st) for a, st, _ in trail] == [("match", 404), ("match", 202)]  # the refused one is on it too
    assert console.errors == []


@SQLITE_ONLY
def test_accept_a_finding_and_reconcile_again(workdir: Path, db_url: str, browser: Any, tmp_path: Path) -> None:
    running = start_dicom_engine(workdir, db_url, reconciliation="flag")
    console = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")
    try:
        hl7(running, adt("A04", "CS7", "Smith", "John", dob="19800202", sex="M"), orm("NW", "PLCS7", "ACC-CS7", "CS7"))
        obj = store(running, tmp_path, accession="ACC-CS7", patient_id="CS7", name="SMIHT^JOHN", birth_date="19800202",
                    sex="M", issuer="GENHOSP")
        settle(running)
        page = console.login(TOKEN, f"/studies/{obj.study_uid}")
        expect(page.locator("#recon-state .badge")).to_have_text("flagged")
        mismatch = page.locator("#findings tbody tr", has_text="PatientName")
        expect(mismatch.locator("td.evidence")).to_have_text(["SMIHT^JOHN", "Smith^John"])  # headers vs expected
        expect(mismatch).to_contain_text("(policy flag)")
        console.shot("study-flagged")
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
        console.shot("study-accepted")
        assert console.errors == []
    finally:
        console.close()
        running.stop()


def _sent(running: RunningEngine, tmp: Path, study_uid: str, name: str, source: Path, number: int) -> tuple[str, Path]:
    obj = make_instance(tmp / name, source=source, study_uid=study_uid, patient_id="CS8", accession="ACC-CS8",
                        number=1, edit=lambda ds: setattr(ds, "SeriesNumber", number))
    proc = storescu(running.dicom_port, [obj.path], extra=propose(obj.path))
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
def test_a_thumbnail_per_series_for_each_syntax(running: RunningEngine, console: Console, tmp_path: Path) -> None:
    study_uid = generate_uid()
    sent = {number: _sent(running, tmp_path, study_uid, f"s{number}.dcm",
                          bundled(name) if where == "pydicom" else data_store_file(name), number)
            for number, name, where, _ in SOURCES}
    page = console.open(f"/studies/{study_uid}")
    expect(page.locator("#series tbody tr")).to_have_count(len(SOURCES))
    for number, name, _, what in SOURCES:
        series_uid, path = sent[number]
        img = page.locator(f'#series tr[data-series="{series_uid}"] img.thumb')
        expect(img).to_have_attribute("alt", re.compile(rf"Series {number} "))
        answer = page.request.get(f"{console.base}/studies/{study_uid}/series/{series_uid}/thumbnail.png")
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
    console.shot("study-thumbnails")
    assert console.errors == []


@SQLITE_ONLY
def test_an_instance_without_pixels_gets_a_404_with_the_reason(running: RunningEngine, console: Console,
                                                               tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "nopixels.dcm", accession="ACC-CS9", edit=lambda ds: delattr(ds, "PixelData"))
    proc = storescu(running.dicom_port, [obj.path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = console.page.request.get(f"{console.base}/studies/{obj.study_uid}/series/{obj.series_uid}/thumbnail.png")
    assert answer.status == 404 and "no pixel data" in answer.text()
    answer = console.page.request.get(f"{console.base}/studies/{obj.study_uid}/series/1.2.3.4/thumbnail.png")
    assert answer.status == 404 and "no such series" in answer.text()
    page = console.open(f"/studies/{obj.study_uid}")  # the page itself is fine; the image says what it is
    expect(page.locator("img.thumb")).to_have_attribute("alt", re.compile("middle image"))


@SQLITE_ONLY
def test_read_only_token_sees_no_actions_and_is_refused(running: RunningEngine, browser: Any, tmp_path: Path) -> None:
    obj = unmatched_study(running, tmp_path)
    secrets = create_tokens(running.settings, {"viewer": frozenset({Role.READ})})
    viewer = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")
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
        forms: list[tuple[str, dict[str, str | float | bool]]] = [
            ("match", {"csrf": csrf, "accession": "ACC-CS6"}), ("reconcile", {"csrf": csrf}), ("unmatch", {"csrf": csrf}),
            (f"findings/{page.locator('#findings tbody tr').first.get_attribute('data-finding')}/accept", {"csrf": csrf})]
        for action, form in forms:
            answer = page.request.post(f"{viewer.base}/studies/{obj.study_uid}/{action}", form=form)
            assert answer.status == 403 and "operate" in answer.text(), (action, answer.status)
        page.reload()
        expect(page.locator("#recon-state .badge")).to_have_text("unmatched")  # nothing changed
    finally:
        viewer.close()
    with running.db.read_session() as s:
        acted = s.execute(select(AuditEvent.action).where(AuditEvent.agent == "viewer",
                                                          AuditEvent.action.in_(["match", "reconcile", "unmatch", "accept"]))
                          ).scalars().all()
    assert acted == []  # refused at the door: no action ran


def _listed(running: RunningEngine, query: str) -> tuple[list[str], str | None]:
    """The study UIDs of a /studies page (HTML, asked with the bearer token) and its "Older" link."""
    status, html = running.api(f"/studies?{query}")
    assert status == 200, html
    older = re.search(r'<a href="\?([^"]+)" rel="next">', html)
    return re.findall(r'<tr data-study="([0-9.]+)">', html), (older.group(1).replace("&amp;", "&") if older else None)


def test_study_filters_and_paging_on_both_databases(running: RunningEngine, tmp_path: Path) -> None:
    """The list's filters are SQL on indexed columns (modality in a backslash-separated column,
    dates as DICOM DA) and its pages follow ids: checked on SQLite and PostgreSQL alike."""
    objs = []
    for i in range(53):  # more than a page (50)
        modality = ("CT", "MR", "PT")[i % 3]
        objs.append(make_instance(tmp_path / f"p{i}.dcm", accession=f"ACC-PG{i}", modality=modality,
                                  edit=lambda ds, d=f"202401{(i % 28) + 1:02d}": setattr(ds, "StudyDate", d)))
    proc = storescu(running.dicom_port, [o.path for o in objs])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, older = _listed(running, "")
    assert first == [o.study_uid for o in reversed(objs)][:50] and older is not None
    second, last = _listed(running, older)
    assert second == [o.study_uid for o in reversed(objs)][50:] and last is None
    mr, _ = _listed(running, "modality=mr")
    assert sorted(mr) == sorted(o.study_uid for i, o in enumerate(objs) if i % 3 == 1)
    dated, _ = _listed(running, "date_from=2024-01-03&date_to=2024-01-04&modality=CT")
    assert sorted(dated) == sorted(o.study_uid for i, o in enumerate(objs)
                                   if i % 3 == 0 and 3 <= (i % 28) + 1 <= 4)
    assert dated  # the range is not empty
    one, _ = _listed(running, "accession=ACC-PG7")
    assert one == [objs[7].study_uid]
    none, _ = _listed(running, "reconciliation=exceptions")
    assert none == []  # receiving, not reconciled yet
    status, html = running.api("/studies?modality=C%25&date_from=yesterday")
    assert status == 200 and "is not a date" in html and "a modality is letters and digits" in html
