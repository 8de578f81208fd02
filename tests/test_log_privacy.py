"""Issue 15 item 4: patient names, identifiers, accession numbers and birth dates stay out of log
lines at INFO and above unless log_patient_details is on. A real run: ADT and ORM over MLLP, images
over DICOM (storescu), reconciliation, and results to an EHR that is down, so deliveries fail and are
dead-lettered (the log lines that used to carry the FHIR search, Patient?identifier=...)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from engine.redaction import scrub_logs
from engine.standin_ehr import StandInEHR
from engine.store.db import open_database
from engine.store.models import AuditEvent
from tests.conftest import RunningEngine, make_settings
from tests.dicomutil import require_dcmtk
from tests.test_outbound import EHR_TOKEN, deliveries, fast_retries, order_and_images, wake
from tests.test_reconciliation import settle
from tests.waiting import wait_until

PATIENT = {"identifier": "MRN77310", "family name": "Zebedee", "family name in DICOM": "ZEBEDEE",
           "birth date": "19800202", "accession": "ACC77310"}


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


def info_and_above(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records if r.levelno >= logging.INFO)


@pytest.mark.parametrize("details", [False, True], ids=["details-off", "details-on"])
def test_patient_details_stay_out_of_info_logs_unless_switched_on(workdir: Path, tmp_path: Path, details: bool,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with StandInEHR(token=EHR_TOKEN) as ehr:
        ehr.set_fhir_down(True)
        ehr.set_mllp_down(True)
        fast_retries(workdir, max_attempts=2)
        s = make_settings(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
        s.dicom.stable_seconds = 3600
        s.ehr.mllp, s.ehr.fhir_base, s.ehr.fhir_token = ehr.mllp_address, ehr.fhir_base, EHR_TOKEN
        s.log_patient_details = details
        eng = RunningEngine(s).start()
        try:
            order_and_images(eng, tmp_path, PATIENT["identifier"], PATIENT["accession"],
                             family=PATIENT["family name"], n=1)
            settle(eng)
            wake(eng)
            wait_until(lambda: len(deliveries(eng)) == 2 and all(d.state == "dead" for d in deliveries(eng)),
                       timeout=60, message="both deliveries dead-lettered")
            with eng.db.read_session() as session:  # switching the detail on is on the audit trail
                switched = session.execute(select(AuditEvent.detail).where(AuditEvent.action == "config-reload")
                                           ).scalars().all()
            assert len(switched) == (1 if details else 0)
            assert not details or "log_patient_details = true" in (switched[0] or "")
        finally:
            eng.stop()
    logged = info_and_above(caplog)
    assert "dead-lettered" in logged and "failing" in logged  # the lines that could carry them were written
    if details:
        assert "log_patient_details is on" in logged
        assert PATIENT["identifier"] in logged  # the FHIR search that failed, as it was
    else:
        for what, value in PATIENT.items():
            assert value not in logged, f"the patient's {what} is in the log:\n{logged}"
        assert "log_patient_details" not in logged


def test_sql_parameters_stay_out_of_database_errors(db_url: str) -> None:
    """An error from the database names the statement, not the values bound to it (they are patient
    data on the ingest path); log_patient_details = true shows them (open_database(hide_parameters=False))."""
    for hide, shown in ((True, False), (False, True)):
        db = open_database(db_url, hide_parameters=hide)
        try:
            with db.writer.connect() as conn, pytest.raises(DBAPIError) as info:
                conn.execute(text("SELECT * FROM no_such_table WHERE patient = :pid"), {"pid": "MRN77310"})
            assert ("MRN77310" in str(info.value)) is shown, str(info.value)
        finally:
            db.dispose()


def test_row_values_quoted_by_database_errors_are_hidden_in_log_output(db_url: str) -> None:
    """PostgreSQL's DETAIL line quotes the row ("Key (value)=(MRN77310) already exists"); the filter
    `radbridge run` puts on its log handlers drops it unless log_patient_details is on."""
    db = open_database(db_url)
    try:
        with db.writer.connect() as conn:
            conn.execute(text("CREATE TABLE ids (value VARCHAR(20) UNIQUE)"))
            insert, row = text("INSERT INTO ids VALUES (:value)"), {"value": PATIENT["identifier"]}
            conn.execute(insert, row)
            conn.commit()
            with pytest.raises(DBAPIError) as info:
                conn.execute(insert, row)  # the traceback shows this line: no value in it
        error = info.value
    finally:
        db.dispose()
    for hide_rows in (True, False):
        logger = logging.Logger(f"rows-{hide_rows}")  # a logger of its own, no handler of another test on it
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logger.addHandler(handler)
        try:
            scrub_logs([], logger, hide_rows=hide_rows)
            try:
                raise error
            except DBAPIError:
                logger.exception("ingest job failed")
        finally:
            logger.removeHandler(handler)
        printed = stream.getvalue()
        assert "ingest job failed" in printed
        if db.is_postgres:
            assert ("MRN77310" in printed) is not hide_rows, printed
        else:
            assert "MRN77310" not in printed  # SQLite names the columns only
