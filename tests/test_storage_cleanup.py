"""The storage lifecycle ([storage.cleanup], engine/domain/lifecycle.py): studies stored by dcmtk's
storescu through the engine's DICOM SCP, forward deliveries (mapping dicom-forward) written and
marked delivered by the test as the forwarder would; the age and watermark rules delete only what is
safely elsewhere, the files go after the index rows, C-FIND and QIDO no longer find a deleted study,
the dry run (engine and `radbridge storage cleanup --dry-run`) deletes nothing. SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engine.channels import FORWARD_MAPPING
from engine.config import CleanupSettings
from engine.domain.lifecycle import CleanupReason, kept_reasons
from engine.store.audit import Actor, AuditAction, Subject, record_action
from engine.store.db import Database
from engine.store.models import (
    AuditEvent,
    Delivery,
    DomainEvent,
    Finding,
    Instance,
    InstanceRevision,
    ReconcileJob,
    Series,
    Study,
)
from engine.store.states import DeliveryState, FindingAction, FindingStatus, ReconState, StudyState
from engine.store.types import utcnow
from tests.conftest import RunningEngine, start_dicom_engine
from tests.dicomutil import findscu, make_instance, require_dcmtk, storescu
from tests.test_cli import radbridge
from tests.test_storage_check import cli_env
from tests.waiting import wait_until

NOW = utcnow()
DAY = timedelta(days=1)


def age_policy(**kw: Any) -> CleanupSettings:
    return CleanupSettings(enabled=True, max_age_days=30, **kw)


# --- the rule, on rows written directly ------------------------------------------------------------

def add_study(s: Session, *, last: datetime, state: StudyState = StudyState.STABLE,
              recon: ReconState = ReconState.RECONCILED, instances: int = 2) -> Study:
    uid = generate_uid()
    study = Study(study_uid=uid, state=state, recon_state=recon, first_received_at=last, last_received_at=last,
                  num_series=1, num_instances=instances, size_bytes=1000 * instances)
    s.add(study)
    s.flush()
    series = Series(study_id=study.id, series_uid=generate_uid())
    s.add(series)
    s.flush()
    for n in range(instances):
        sop = generate_uid()
        s.add(Instance(series_id=series.id, study_id=study.id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       transfer_syntax="1.2.840.10008.1.2.1", storage_key=f"x/{uid}/{series.series_uid}/{sop}.dcm",
                       size_bytes=1000, sha256="0" * 64, received_at=last - timedelta(seconds=instances - n)))
    s.flush()
    return study


def forward(s: Session, study_id: int, *, destination: str = "PACS", state: DeliveryState = DeliveryState.DELIVERED,
            created: datetime, instance_id: int | None = None) -> Delivery:
    d = Delivery(channel="pacs-forward", destination=destination, mapping=FORWARD_MAPPING, event="study.reconciled",
                 study_id=study_id, instance_id=instance_id, order_key=f"study:{study_id}", state=state,
                 created_at=created, next_at=created,
                 delivered_at=created + timedelta(seconds=5) if state == DeliveryState.DELIVERED else None)
    s.add(d)
    s.flush()
    return d


def test_safely_elsewhere_rule(db: Database) -> None:
    old = NOW - 40 * DAY
    after = old + timedelta(hours=1)
    with db.write_session() as s, s.begin():
        safe = add_study(s, last=old)
        forward(s, safe.id, created=after)
        forward(s, safe.id, created=old - DAY, state=DeliveryState.DISCARDED)  # an older one given up: history
        unforwarded = add_study(s, last=old)
        dead = add_study(s, last=old)
        forward(s, dead.id, created=after, state=DeliveryState.DEAD)
        pending = add_study(s, last=old)
        forward(s, pending.id, created=after)
        forward(s, pending.id, created=after + DAY, state=DeliveryState.PENDING)  # a correction on its way
        newer = add_study(s, last=old)
        forward(s, newer.id, created=old - DAY)  # forwarded before its last instance came
        rewritten = add_study(s, last=old)
        forward(s, rewritten.id, created=after)
        inst = s.execute(select(Instance).where(Instance.study_id == rewritten.id)).scalars().first()
        assert inst is not None
        s.add(InstanceRevision(instance_id=inst.id, at=after + DAY, reason="COERCE", old_key="a", old_sha256="0" * 64,
                               old_size=1, new_key="b", new_sha256="1" * 64, new_size=1))
        per_instance = add_study(s, last=old)
        half = add_study(s, last=old)
        for study, covered in ((per_instance, 2), (half, 1)):
            ids = s.execute(select(Instance.id).where(Instance.study_id == study.id).order_by(Instance.id)).scalars()
            for iid in list(ids)[:covered]:
                forward(s, study.id, created=after, instance_id=iid)
        two_dest = add_study(s, last=old)
        forward(s, two_dest.id, created=after)
        forward(s, two_dest.id, destination="VNA", created=after, state=DeliveryState.DISCARDED)
        receiving = add_study(s, last=old, state=StudyState.RECEIVING)
        forward(s, receiving.id, created=after)
        pending_recon = add_study(s, last=old, recon=ReconState.PENDING)
        forward(s, pending_recon.id, created=after)
        queued = add_study(s, last=old)
        forward(s, queued.id, created=after)
        s.add(ReconcileJob(study_id=queued.id, reasons="order"))
        quarantined = add_study(s, last=old, recon=ReconState.QUARANTINED)
        forward(s, quarantined.id, created=after)
        finding = add_study(s, last=old)
        forward(s, finding.id, created=after)
        s.add(Finding(study_id=finding.id, kind="patient_name", severity="warning", action=FindingAction.FLAGGED,
                      status=FindingStatus.OPEN))
        read = add_study(s, last=old)
        forward(s, read.id, created=after)
        record_action(s.connection(), Actor("viewer"), AuditAction.READ, Subject("Study", study_uid=read.study_uid))
    studies = [safe, unforwarded, dead, pending, newer, rewritten, per_instance, half, two_dest, receiving,
               pending_recon, queued, quarantined, finding, read]
    with db.reader.connect() as conn:
        why = kept_reasons(conn, [x.id for x in studies], age_policy())
        vna = kept_reasons(conn, [safe.id, per_instance.id], age_policy(require_forwarded_to=["PACS", "VNA"]))
        waived = kept_reasons(conn, [unforwarded.id, dead.id, pending.id, newer.id, quarantined.id, receiving.id],
                              age_policy(delete_unforwarded=True))
    assert why[safe.id] == [] and why[per_instance.id] == []
    assert why[unforwarded.id] == ["not forwarded anywhere"]
    assert why[dead.id] == ["forward to PACS dead-lettered (1)"]
    assert why[pending.id] == ["forward to PACS pending (1)"]
    assert why[newer.id] == ["changed since its forward to PACS (a new instance or a rewrite)"]
    assert why[rewritten.id] == ["changed since its forward to PACS (a new instance or a rewrite)"]
    assert why[half.id] == ["1 of 2 instance(s) delivered to PACS since they last changed"]
    assert why[two_dest.id] == ["not delivered to VNA"]  # every destination it has a delivery for
    assert why[receiving.id] == ["receiving (not stable)"]
    assert why[pending_recon.id] == ["reconciliation pending"]
    assert why[queued.id] == ["queued for reconciliation"]
    assert why[quarantined.id] == ["quarantined: needs an analyst"]
    assert why[finding.id] == ["1 open finding(s) for an analyst"]
    assert why[read.id] == ["read in the last 10 minutes (may be being retrieved)"]
    assert vna == {safe.id: ["not forwarded to VNA"], per_instance.id: ["not forwarded to VNA"]}
    # delete_unforwarded waives the forwarding condition only: not a pending forward, not an analyst's study
    assert waived == {unforwarded.id: [], dead.id: [], newer.id: [], pending.id: ["forward to PACS pending (1)"],
                      quarantined.id: ["quarantined: needs an analyst"], receiving.id: ["receiving (not stable)"]}


# --- through the engine: files stored by storescu -----------------------------------------------

@pytest.fixture
def _dcmtk() -> None:
    require_dcmtk()


def store_studies(eng: RunningEngine, tmp_path: Path, names: list[str], per_study: int = 2) -> dict[str, int]:
    """``per_study`` instances for each name, sent by storescu in one association; index ids by name."""
    objs, uids = [], {}
    for name in names:
        study, series = generate_uid(), generate_uid()
        uids[name] = study
        objs += [make_instance(tmp_path / "in" / f"{name}{i}.dcm", accession=name, study_uid=study,
                               series_uid=series, number=i + 1) for i in range(per_study)]
    proc = storescu(eng.dicom_port, [o.path for o in objs])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with eng.db.read_session() as s:
        ids = {name: s.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one() for name, uid in uids.items()}

    def dequeued() -> bool:  # the reconciler took the studies' "received" triggers
        with eng.db.read_session() as s:
            return not s.execute(select(ReconcileJob.id).where(ReconcileJob.study_id.in_(ids.values()))).first()
    wait_until(dequeued, timeout=30, message="the reconciler to take the received studies")
    return ids


def settle(eng: RunningEngine, study_id: int, last: datetime, *deliveries: tuple[str, DeliveryState, datetime]) -> None:
    """The study as the pipeline leaves it (stable, reconciled) with its last instance at ``last``,
    and forward deliveries (destination, state, created) as the forwarder writes them."""
    with eng.db.write_session() as s, s.begin():
        s.execute(update(Study).where(Study.id == study_id).values(
            state=StudyState.STABLE, recon_state=ReconState.RECONCILED, last_received_at=last, stable_at=last))
        s.execute(update(Instance).where(Instance.study_id == study_id).values(received_at=last))
        for dest, state, created in deliveries:
            forward(s, study_id, destination=dest, state=state, created=created)


def files_of(eng: RunningEngine, study_id: int) -> list[Path]:
    root = Path(eng.settings.storage.dir) / "studies"
    with eng.db.read_session() as s:
        return [root / k for k in s.execute(select(Instance.storage_key).where(Instance.study_id == study_id)).scalars()]


def uid_of(eng: RunningEngine, study_id: int) -> str:
    with eng.db.read_session() as s:
        return str(s.execute(select(Study.study_uid).where(Study.id == study_id)).scalar_one())


def test_age_rule_deletes_only_the_forwarded_old_study(_dcmtk: None, workdir: Path, db_url: str, tmp_path: Path) -> None:
    eng = start_dicom_engine(workdir, db_url)
    try:
        ids = store_studies(eng, tmp_path, ["GONE", "UNFWD", "DEAD", "PEND", "NEWER", "YOUNG"])
        old, young = NOW - 40 * DAY, NOW - 2 * DAY
        ok = ("PACS", DeliveryState.DELIVERED, old + DAY)
        settle(eng, ids["GONE"], old, ok)
        settle(eng, ids["UNFWD"], old)
        settle(eng, ids["DEAD"], old, ("PACS", DeliveryState.DEAD, old + DAY))
        settle(eng, ids["PEND"], old, ("PACS", DeliveryState.PENDING, old + DAY))
        settle(eng, ids["NEWER"], old, ("PACS", DeliveryState.DELIVERED, old - DAY))  # a new instance since
        settle(eng, ids["YOUNG"], young, ("PACS", DeliveryState.DELIVERED, young + timedelta(hours=1)))
        files = {n: files_of(eng, i) for n, i in ids.items()}
        uids = {n: uid_of(eng, i) for n, i in ids.items()}
        assert all(p.exists() for ps in files.values() for p in ps)

        dry = eng.call(eng.engine.run_cleanup(dry_run=True, policy=age_policy()))
        assert (dry.would_delete, dry.deleted, dry.kept) == (1, 0, 4), [d.kept for d in dry.decisions]
        assert all(p.exists() for ps in files.values() for p in ps)  # the dry run deleted nothing
        with eng.db.read_session() as s:
            assert s.execute(select(func.count()).select_from(Study)).scalar() == 6

        report = eng.call(eng.engine.run_cleanup(policy=age_policy()))
        decided = {d.study_uid: (d.reason, d.deleted, d.kept) for d in report.decisions}
        assert decided == {
            uids["GONE"]: (CleanupReason.AGE, True, []),
            uids["UNFWD"]: (CleanupReason.AGE, False, ["not forwarded anywhere"]),
            uids["DEAD"]: (CleanupReason.AGE, False, ["forward to PACS dead-lettered (1)"]),
            uids["PEND"]: (CleanupReason.AGE, False, ["forward to PACS pending (1)"]),
            uids["NEWER"]: (CleanupReason.AGE, False, ["changed since its forward to PACS (a new instance or a rewrite)"]),
        }  # YOUNG is not old: not even looked at
        assert (report.deleted, report.files_deleted) == (1, 2)
        assert not any(p.exists() for p in files["GONE"])
        assert all(p.exists() for n, ps in files.items() if n != "GONE" for p in ps)
        with eng.db.read_session() as s:
            assert s.execute(select(Study.id).where(Study.study_uid == uids["GONE"])).first() is None
            for table in (Series, Instance):
                assert s.execute(select(func.count()).select_from(table)
                                 .where(table.study_id == ids["GONE"])).scalar() == 0
            kept = s.execute(select(Delivery).where(Delivery.created_at == old + DAY,
                                                    Delivery.state == DeliveryState.DELIVERED)).scalars().all()
            assert [(d.study_id, d.destination) for d in kept] == [(None, "PACS")]  # history kept, link cleared
            assert s.execute(select(func.count()).select_from(DomainEvent)
                             .where(DomainEvent.study_id == ids["GONE"])).scalar() == 0
            audit = s.execute(select(AuditEvent).where(AuditEvent.action == AuditAction.DELETE)).scalars().all()
        assert [(a.study_uid, a.resource_type, a.count, a.status) for a in audit] == [(uids["GONE"], "Study", 2, 200)]
        assert audit[0].detail is not None and audit[0].detail.startswith("storage cleanup (age): 2 instance(s), ")
        assert f"deliveries kept: {kept[0].id}" in audit[0].detail

        # C-FIND and QIDO no longer find it; the others still are
        _, found = findscu(eng.dicom_port, "STUDY", ["StudyInstanceUID", "AccessionNumber"], out_dir=tmp_path / "find")
        assert sorted(str(ds.AccessionNumber) for ds in found) == ["DEAD", "NEWER", "PEND", "UNFWD", "YOUNG"]
        status, body = eng.api(f"/dicomweb/studies?StudyInstanceUID={uids['GONE']}")
        assert status in (200, 204) and uids["GONE"] not in str(body)
        status, body = eng.api(f"/dicomweb/studies?StudyInstanceUID={uids['YOUNG']}")
        assert status == 200 and uids["YOUNG"] in str(body)

        status, shown = eng.api("/api/storage/cleanup")
        assert status == 200
        assert shown["last_run"]["studies_deleted"] == 1 and shown["last_run"]["bytes_freed"] > 0
        assert shown["since_start"]["studies_deleted"] == 1 and shown["enabled"] is False  # the engine's own setting

        # the explicit escape: unforwarded and dead-lettered go; a pending forward still reads the files
        waived = eng.call(eng.engine.run_cleanup(policy=age_policy(delete_unforwarded=True)))
        assert sorted(d.study_uid for d in waived.decisions if d.deleted) == sorted(
            [uids["UNFWD"], uids["DEAD"], uids["NEWER"]])
        assert [d.kept for d in waived.decisions if not d.deleted] == [["forward to PACS pending (1)"]]
        assert all(p.exists() for n in ("PEND", "YOUNG") for p in files[n])
        assert not any(p.exists() for n in ("UNFWD", "DEAD", "NEWER") for p in files[n])
    finally:
        eng.stop()


def test_watermark_deletes_oldest_first_down_to_the_low_mark(_dcmtk: None, workdir: Path, db_url: str,
                                                             tmp_path: Path) -> None:
    eng = start_dicom_engine(workdir, db_url)
    try:
        names = ["U", "A", "B", "C", "D"]  # oldest first; U was never forwarded
        ids = store_studies(eng, tmp_path, names)
        for n, name in enumerate(names):
            last = NOW - timedelta(days=10 - n)
            settle(eng, ids[name], last, *([] if name == "U" else [("PACS", DeliveryState.DELIVERED, last + DAY)]))
        with eng.db.read_session() as s:
            sizes = {i: int(n) for i, n in s.execute(select(Study.id, Study.size_bytes))}
        used = sum(sizes.values())
        gone = sizes[ids["A"]] + sizes[ids["B"]] + sizes[ids["C"]] // 2  # wanted: past A and B, into C
        mb = 1024 * 1024
        policy = CleanupSettings(enabled=True, max_storage_mb=(used - 1) / mb, low_watermark_mb=(used - gone) / mb)
        report = eng.call(eng.engine.run_cleanup(policy=policy))
        assert report.used_bytes == used and abs(report.wanted_bytes - gone) <= 1
        assert [(d.study_id, d.reason, d.deleted, d.kept) for d in report.decisions] == [
            (ids["U"], CleanupReason.WATERMARK, False, ["not forwarded anywhere"]),
            (ids["A"], CleanupReason.WATERMARK, True, []), (ids["B"], CleanupReason.WATERMARK, True, []),
            (ids["C"], CleanupReason.WATERMARK, True, [])]
        assert report.bytes_freed == sizes[ids["A"]] + sizes[ids["B"]] + sizes[ids["C"]]
        with eng.db.read_session() as s:
            assert sorted(s.execute(select(Study.id)).scalars()) == sorted([ids["U"], ids["D"]])
        # below the high mark now: a second pass deletes nothing
        again = eng.call(eng.engine.run_cleanup(policy=policy))
        assert (again.wanted_bytes, again.deleted, again.decisions) == (0, 0, [])
    finally:
        eng.stop()


def test_cli_dry_run_lists_and_deletes_nothing(_dcmtk: None, workdir: Path, db_url: str, tmp_path: Path) -> None:
    eng = start_dicom_engine(workdir, db_url)
    try:
        ids = store_studies(eng, tmp_path, ["OLD", "KEEP"])
        old = NOW - 40 * DAY
        settle(eng, ids["OLD"], old, ("PACS", DeliveryState.DELIVERED, old + DAY))
        settle(eng, ids["KEEP"], old)
        uids = {n: uid_of(eng, i) for n, i in ids.items()}
        files = [p for i in ids.values() for p in files_of(eng, i)]
    finally:
        eng.stop()
    env = {**cli_env(workdir, db_url), "RADBRIDGE_STORAGE_CLEANUP_MAX_AGE_DAYS": "30"}
    refused = radbridge("storage", "cleanup", env=env, cwd=workdir)
    assert refused.returncode == 2 and "enabled is false" in refused.stderr
    dry = radbridge("storage", "cleanup", "--dry-run", env=env, cwd=workdir)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    lines = dry.stdout.splitlines()
    assert any(line.startswith(f"would delete {uids['OLD']}  (age, last instance ") for line in lines)
    assert any(line.startswith(f"keep    {uids['KEEP']}  (age, ") and line.endswith("): not forwarded anywhere")
               for line in lines)
    assert lines[-1] == "radbridge storage cleanup (dry run, nothing deleted): 1 study(ies) would be deleted, 1 kept"
    assert all(p.exists() for p in files)
    real = radbridge("storage", "cleanup", env={**env, "RADBRIDGE_STORAGE_CLEANUP_ENABLED": "true"}, cwd=workdir)
    assert real.returncode == 0, real.stdout + real.stderr
    assert real.stdout.splitlines()[-1].startswith("radbridge storage cleanup: 1 study(ies) deleted, ")
    assert [p.exists() for p in files] == [False, False, True, True]
    audit = radbridge("audit", "--action", "delete", env=env, cwd=workdir)
    assert uids["OLD"] in audit.stdout and "cli:" in audit.stdout


def test_cleanup_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    from engine.config import load_settings
    from engine.yamlfile import ConfigFileError
    from tests.conftest import REPO

    shipped = load_settings(REPO / "config" / "radbridge.toml", env={})
    assert shipped.storage.cleanup == CleanupSettings()  # the file documents the defaults: off, no rule
    s = load_settings(REPO / "config" / "radbridge.toml", env={
        "RADBRIDGE_STORAGE_CLEANUP_ENABLED": "true", "RADBRIDGE_STORAGE_CLEANUP_MAX_AGE_DAYS": "90",
        "RADBRIDGE_STORAGE_CLEANUP_REQUIRE_FORWARDED_TO": "PACS, VNA"})
    assert (s.storage.cleanup.enabled, s.storage.cleanup.max_age_days, s.storage.cleanup.require_forwarded_to) == (
        True, 90.0, ["PACS", "VNA"])
    f = tmp_path / "c.toml"
    f.write_text("[storage.cleanup]\nmax_storage_mb = 100\nlow_watermark_mb = 200\nbatch_size = 0\n")
    with pytest.raises(ConfigFileError) as info:
        load_settings(f, env={})
    text = str(info.value)
    assert f"{f}:3: storage.cleanup.low_watermark_mb: must not be above max_storage_mb" in text
    assert "storage.cleanup.batch_size: must be greater than 0" in text
