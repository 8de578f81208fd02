"""The domain rules called directly, without a message around them: patients.merge_patients,
orders.apply_order and reconciliation.matching.match_study, each inside a transaction of a real
database (SQLite and PostgreSQL) built by the project's migrations.

What is asserted is the state of the store (patients, identifiers and aliases, orders and their
status history, studies) and Outcome.patient_id / order_ids, or the Match returned; not the text of
Outcome.changes or of notes. The same rules run end to end over MLLP in test_mllp_inbound.py and
test_reconciliation.py; here each case is isolated and names the rule it checks
(docs/domain-rules.md, docs/reconciliation.md).
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from sqlalchemy import func, select

from engine.domain.errors import DomainError
from engine.domain.orders import apply_order
from engine.domain.patients import Outcome, find_patient, merge_patients, upsert_patient
from engine.domain.records import add
from engine.domain.studies import STUDIES
from engine.hl7 import errors as E
from engine.reconciliation.matching import Match, StudyHeaders, match_study
from engine.reconciliation.rules import ReconciliationRules, default_rules
from engine.store.db import Database
from engine.store.models import Order, OrderStatusChange, Patient, PatientChange, PatientIdentifier, Study

ISSUER = "GENHOSP"



# --- applying: each call is one transaction, as the pipeline's writer runs it ----------------------------


def pid(mrn: str, issuer: str = ISSUER, **fields: Any) -> dict[str, Any]:
    """Mapped fields naming a patient: patient.id / patient.issuer and patient.<field> values."""
    return {"patient.id": mrn, "patient.issuer": issuer, **{f"patient.{k}": v for k, v in fields.items()}}


def admit(db: Database, mrn: str, issuer: str = ISSUER, **fields: Any) -> int:
    """An A01/A04 for the patient (patient.upsert); its id."""
    out = Outcome()
    with db.writer.begin() as conn:
        upsert_patient(conn, pid(mrn, issuer, **fields), out)
    assert out.patient_id is not None
    return out.patient_id


def merge(db: Database, survivor: str, prior: str, *, event_time: str | None = None, **fields: Any) -> Outcome:
    """An A40: ``prior`` (MRG-1) merged into ``survivor`` (PID-3), both under ISSUER."""
    data = {**pid(survivor, **fields), "merge.prior_id": prior, "merge.prior_issuer": ISSUER}
    if event_time:
        data["message.event_time"] = event_time
    out = Outcome()
    with db.writer.begin() as conn:
        merge_patients(conn, data, out)
    return out


def order_msg(control: str, placer: str, mrn: str, *, accession: str | None = None, event_time: str | None = None,
              patient: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The mapped fields of one ORC group: control, placer number, accession (ACC<placer> unless
    given; "" leaves it out) and order.<field> values, for the patient ``mrn``."""
    data: dict[str, Any] = {**pid(mrn, **(patient or {})), "order.control": control, "order.placer_number": placer}
    acc = f"ACC{placer}" if accession is None else accession
    if acc:
        data["order.accession"] = acc
    if event_time:
        data["message.event_time"] = event_time
    data.update({f"order.{k}": v for k, v in fields.items()})
    return data


def order(db: Database, control: str, placer: str, mrn: str, *, orders_update_patient: bool = False,
          **kw: Any) -> Outcome:
    out = Outcome()
    with db.writer.begin() as conn:
        apply_order(conn, order_msg(control, placer, mrn, **kw), out, message_id=None,
                    orders_update_patient=orders_update_patient)
    return out


def add_study(db: Database, uid: str, *, accession: str | None = None, patient_id_header: str | None = None,
              issuer_header: str | None = None, patient_id: int | None = None) -> dict[str, Any]:
    """A study row as the DICOM index records it (the headers' values); the row as match_study reads it."""
    with db.writer.begin() as conn:
        sid = add(conn, STUDIES, study_uid=uid, accession=accession, dicom_patient_id=patient_id_header,
                  dicom_issuer=issuer_header, patient_id=patient_id, channel="dicom")
    with db.reader.connect() as conn:
        row = conn.execute(select(STUDIES).where(STUDIES.c.id == sid)).mappings().one()
    return dict(row)


def match(db: Database, study: dict[str, Any], rules: ReconciliationRules | None = None) -> Match:
    with db.reader.connect() as conn:  # the reconciler matches on a reader connection
        return match_study(conn, cast(StudyHeaders, study), rules or default_rules())


# --- reading the store back --------------------------------------------------------------------------


def patients(db: Database) -> int:
    with db.read_session() as s:
        return int(s.execute(select(func.count()).select_from(Patient)).scalar_one())


def patient(db: Database, patient_id: int) -> Patient:
    with db.read_session() as s:
        return s.execute(select(Patient).where(Patient.id == patient_id)).scalar_one()


def identifiers(db: Database) -> dict[str, tuple[int, str]]:
    """{identifier value: (the patient holding it, its kind)} for ISSUER."""
    with db.read_session() as s:
        rows = s.execute(select(PatientIdentifier).where(PatientIdentifier.issuer == ISSUER)).scalars()
        return {i.value: (i.patient_id, i.kind) for i in rows}


def owner(db: Database, mrn: str, issuer: str = ISSUER) -> int | None:
    """Who an identifier resolves to now (find_patient: merges followed)."""
    with db.reader.connect() as conn:
        found = find_patient(conn, mrn, issuer)
    return found.id if found is not None else None


def history_kinds(db: Database, patient_id: int) -> list[str]:
    with db.read_session() as s:
        return list(s.execute(select(PatientChange.kind).where(PatientChange.patient_id == patient_id)
                              .order_by(PatientChange.id)).scalars())


def order_row(db: Database, placer: str) -> Order:
    with db.read_session() as s:
        return s.execute(select(Order).where(Order.placer_number == placer)).scalar_one()


def orders_of(db: Database, patient_id: int) -> list[str]:
    with db.read_session() as s:
        placers = s.execute(select(Order.placer_number).where(Order.patient_id == patient_id)).scalars()
        return sorted(str(p) for p in placers)


def status_history(db: Database, placer: str) -> list[tuple[str | None, str | None, str, bool]]:
    """(control, from, to, applied) of each status the order was asked to take."""
    with db.read_session() as s:
        rows = s.execute(select(OrderStatusChange).join(Order, OrderStatusChange.order_id == Order.id)
                         .where(Order.placer_number == placer).order_by(OrderStatusChange.id)).scalars()
        return [(h.control, h.from_status, h.to_status, h.applied) for h in rows]


def study_patient(db: Database, uid: str) -> int | None:
    with db.read_session() as s:
        return s.execute(select(Study.patient_id).where(Study.study_uid == uid)).scalar_one()


def kinds(m: Match) -> list[str]:
    return [f.kind for f in m.findings]


# === merge_patients ==================================================================================


def test_merge_moves_orders_and_studies_to_the_survivor_and_keeps_the_old_id_as_an_alias(db: Database) -> None:
    survivor = admit(db, "SURV", family_name="Keep")
    prior = admit(db, "GONE", family_name="Dup")
    order(db, "NW", "PS1", "SURV")
    order(db, "NW", "PG1", "GONE")
    order(db, "NW", "PG2", "GONE")
    add_study(db, "1.2.3.10", patient_id=prior)
    moved = [order_row(db, "PG1").id, order_row(db, "PG2").id]

    out = merge(db, "SURV", "GONE")

    assert out.patient_id == survivor
    assert identifiers(db) == {"SURV": (survivor, "primary"), "GONE": (survivor, "alias")}
    assert orders_of(db, survivor) == ["PG1", "PG2", "PS1"] and orders_of(db, prior) == []
    assert study_patient(db, "1.2.3.10") == survivor
    retired, kept = patient(db, prior), patient(db, survivor)
    assert (retired.merged_into_id, retired.active) == (survivor, False)
    assert (kept.merged_into_id, kept.active) == (None, True)
    assert history_kinds(db, survivor) == ["created", "merged"]
    assert history_kinds(db, prior) == ["created", "merged_away"]
    with db.read_session() as s:
        merged = s.execute(select(PatientChange).where(PatientChange.kind == "merged")).scalar_one()
        assert (merged.changes or {})["prior_patient"] == prior
        assert sorted((merged.changes or {})["orders_moved"]) == sorted(moved)
    assert patients(db) == 2  # the prior record is retired, not deleted


def test_after_a_merge_the_old_id_resolves_to_the_survivor(db: Database) -> None:
    survivor = admit(db, "SURV", family_name="Keep", given_name="Sam")
    admit(db, "GONE", family_name="Dup")
    merge(db, "SURV", "GONE")

    assert owner(db, "GONE") == survivor
    # an order under the old number is the survivor's
    out = order(db, "NW", "PLATE", "GONE")
    assert out.patient_id == survivor and order_row(db, "PLATE").patient_id == survivor
    # an A08 under the old number updates the survivor, and no patient is created for it
    out = Outcome()
    with db.writer.begin() as conn:
        upsert_patient(conn, pid("GONE", given_name="Samuel"), out)
    assert out.patient_id == survivor and patient(db, survivor).given_name == "Samuel"
    assert patients(db) == 2


def test_merge_of_an_unknown_prior_keeps_it_as_an_alias_of_the_survivor(db: Database) -> None:
    survivor = admit(db, "SURV")
    out = merge(db, "SURV", "NEVERSEEN")
    assert out.patient_id == survivor and patients(db) == 1
    assert identifiers(db) == {"SURV": (survivor, "primary"), "NEVERSEEN": (survivor, "alias")}
    assert owner(db, "NEVERSEEN") == survivor
    assert history_kinds(db, survivor) == ["created", "merged"]


def test_merge_of_two_unknown_patients_creates_the_survivor_with_the_alias(db: Database) -> None:
    out = merge(db, "NEW", "OLD", family_name="Fresh")
    assert out.patient_id is not None and patients(db) == 1
    assert identifiers(db) == {"NEW": (out.patient_id, "primary"), "OLD": (out.patient_id, "alias")}
    assert patient(db, out.patient_id).family_name == "Fresh"
    assert history_kinds(db, out.patient_id) == ["created", "merged"]


def test_merge_to_an_unknown_survivor_is_an_identifier_change(db: Database) -> None:
    renamed = admit(db, "OLDID", family_name="Renamed")
    out = merge(db, "NEWID", "OLDID")
    assert out.patient_id == renamed and patients(db) == 1  # no new patient
    assert identifiers(db) == {"OLDID": (renamed, "alias"), "NEWID": (renamed, "primary")}
    assert owner(db, "NEWID") == owner(db, "OLDID") == renamed
    assert history_kinds(db, renamed) == ["created", "identifier"]


def test_merge_into_itself_is_refused_and_changes_nothing(db: Database) -> None:
    admit(db, "SAME")
    before = identifiers(db)
    with pytest.raises(DomainError) as refused:
        merge(db, "SAME", "SAME")
    assert (refused.value.code, refused.value.field) == (E.DUPLICATE_KEY, "merge.prior_id")
    assert identifiers(db) == before and patients(db) == 1


def test_merge_without_a_prior_identifier_is_refused(db: Database) -> None:
    admit(db, "SURV")
    out = Outcome()
    with pytest.raises(DomainError) as refused, db.writer.begin() as conn:
        merge_patients(conn, pid("SURV"), out)
    assert (refused.value.code, refused.value.field) == (E.REQUIRED_FIELD_MISSING, "merge.prior_id")


def test_a_merge_already_applied_changes_nothing(db: Database) -> None:
    survivor = admit(db, "SURV")
    admit(db, "GONE")
    merge(db, "SURV", "GONE")
    before = identifiers(db)
    out = merge(db, "SURV", "GONE")  # resent
    assert out.patient_id == survivor and identifiers(db) == before
    assert history_kinds(db, survivor) == ["created", "merged"]  # no second merge entry


def test_a_chain_of_merges_ends_at_the_last_survivor(db: Database) -> None:
    a, b, c = admit(db, "A1"), admit(db, "B1"), admit(db, "C1")
    order(db, "NW", "PA", "A1")
    order(db, "NW", "PB", "B1")
    add_study(db, "1.2.3.20", patient_id=a)
    merge(db, "B1", "A1")
    out = merge(db, "C1", "B1")

    assert out.patient_id == c
    assert owner(db, "A1") == owner(db, "B1") == owner(db, "C1") == c
    assert identifiers(db) == {"A1": (c, "alias"), "B1": (c, "alias"), "C1": (c, "primary")}
    assert orders_of(db, c) == ["PA", "PB"] and study_patient(db, "1.2.3.20") == c
    assert (patient(db, a).merged_into_id, patient(db, b).merged_into_id) == (b, c)
    assert not patient(db, a).active and not patient(db, b).active and patient(db, c).active
    # the first prior, merged again into the end of its chain: already there
    assert merge(db, "C1", "A1").patient_id == c
    assert history_kinds(db, c) == ["created", "merged"]


def test_a_stale_merge_still_merges_but_keeps_the_newer_demographics(db: Database) -> None:
    data = {**pid("SURV", family_name="Newer"), "message.event_time": "2024-03-20T10:00:00"}
    with db.writer.begin() as conn:
        upsert_patient(conn, data, Outcome())
    prior = admit(db, "GONE")
    out = merge(db, "SURV", "GONE", event_time="2024-03-01T10:00:00", family_name="Older")
    assert out.patient_id is not None and patient(db, out.patient_id).family_name == "Newer"
    assert patient(db, prior).merged_into_id == out.patient_id
    assert identifiers(db)["GONE"] == (out.patient_id, "alias")


def test_an_unknown_prior_also_listed_among_the_identifiers_becomes_an_alias(db: Database) -> None:
    """Regression: PID-3 repeating the unknown MRG-1 made the A40 fail on the unique identifier index
    (the identifier was added from PID-3, then inserted again as the alias) and end as AE 207."""
    survivor = admit(db, "SURV")
    data = {**pid("SURV", identifiers=[{"value": "SURV", "issuer": ISSUER, "type": "MR"},
                                       {"value": "OLD", "issuer": ISSUER, "type": "MR"}]),
            "merge.prior_id": "OLD", "merge.prior_issuer": ISSUER}
    out = Outcome()
    with db.writer.begin() as conn:
        merge_patients(conn, data, out)
    assert out.patient_id == survivor
    assert identifiers(db)["OLD"] == (survivor, "alias")


# === apply_order =====================================================================================


def test_nw_creates_the_order_for_its_patient(db: Database) -> None:
    patient_id = admit(db, "P1")
    out = order(db, "NW", "PL1", "P1", modality="CT", procedure_code="74177", event_time="2024-03-15T08:30:00")
    o = order_row(db, "PL1")
    assert out.order_ids == [o.id] and out.patient_id == patient_id
    assert (o.patient_id, o.status, o.accession, o.modality, o.procedure_code) == (patient_id, "SC", "ACCPL1", "CT",
                                                                                   "74177")
    assert (o.last_control, o.source_time, o.version) == ("NW", "2024-03-15T08:30:00", 1)
    assert status_history(db, "PL1") == [("NW", None, "SC", True)]


def test_nw_takes_the_status_orc5_asks_for(db: Database) -> None:
    order(db, "NW", "PL1", "P1", status="IP")
    assert order_row(db, "PL1").status == "IP"
    assert status_history(db, "PL1") == [("NW", None, "IP", True)]


def test_an_order_creates_its_unknown_patient_without_claiming_its_event_time(db: Database) -> None:
    out = order(db, "NW", "PL1", "NEWP", event_time="2024-03-20T00:00:00",
                patient={"family_name": "FromOrder", "birth_date": "1970-01-01"})
    assert out.patient_id is not None and patients(db) == 1
    p = patient(db, out.patient_id)
    assert (p.family_name, p.birth_date) == ("FromOrder", "1970-01-01")
    assert p.source_time is None  # an ADT with an earlier EVN-2 is still applied later
    assert identifiers(db) == {"NEWP": (out.patient_id, "primary")}
    assert order_row(db, "PL1").patient_id == out.patient_id


def test_an_order_does_not_update_a_known_patient_unless_the_channel_says_so(db: Database) -> None:
    patient_id = admit(db, "P1", family_name="Adt")
    order(db, "NW", "PL1", "P1", patient={"family_name": "Order"})
    assert patient(db, patient_id).family_name == "Adt"
    order(db, "XO", "PL1", "P1", patient={"family_name": "Order"}, orders_update_patient=True)
    assert patient(db, patient_id).family_name == "Order"
    assert patients(db) == 1


@pytest.mark.parametrize("control", ["XO", "SC"])
def test_xo_and_sc_update_the_order(db: Database, control: str) -> None:
    order(db, "NW", "PL1", "P1", modality="CR", procedure_code="71020", event_time="2024-03-15T08:00:00")
    created = order_row(db, "PL1")
    out = order(db, control, "PL1", "P1", status="IP", procedure_code="71021", event_time="2024-03-15T09:00:00")
    o = order_row(db, "PL1")
    assert out.order_ids == [created.id] and o.id == created.id
    assert (o.status, o.procedure_code, o.modality, o.last_control) == ("IP", "71021", "CR", control)
    assert o.version == created.version + 1 and o.source_time == "2024-03-15T09:00:00"
    assert status_history(db, "PL1") == [("NW", None, "SC", True), (control, "SC", "IP", True)]


def test_a_change_without_a_status_keeps_the_status_and_adds_no_history(db: Database) -> None:
    order(db, "NW", "PL1", "P1", modality="CR")
    order(db, "XO", "PL1", "P1", modality="DX")
    o = order_row(db, "PL1")
    assert (o.status, o.modality) == ("SC", "DX")
    assert status_history(db, "PL1") == [("NW", None, "SC", True)]


def test_an_update_finds_the_order_by_accession_when_the_placer_number_differs(db: Database) -> None:
    (order_id,) = order(db, "NW", "PL1", "P1", accession="ACC9").order_ids
    out = order(db, "XO", "OTHERPL", "P1", accession="ACC9", status="IP")
    assert out.order_ids == [order_id]
    with db.read_session() as s:
        (o,) = s.execute(select(Order)).scalars().all()  # no second order
    assert (o.id, o.status, o.placer_number) == (order_id, "IP", "OTHERPL")  # found, then updated


def test_an_order_is_found_by_placer_before_filler_before_accession_newest_first(db: Database) -> None:
    """find_order's precedence (docs/domain-rules.md), whatever the order rows' ages: the placer
    number wins over a newer order with the same accession; among orders sharing the winning
    identifier, the newest."""
    from engine.domain.orders import find_order
    from engine.domain.records import ORDERS
    patient_id = admit(db, "P1")
    with db.writer.begin() as conn:  # rows as they may be in the store, whatever the feed did
        def row(**values: str) -> int:
            return add(conn, ORDERS, patient_id=patient_id, status="SC", **values)
        by_placer = row(placer_number="PL1", accession="ACCA")
        by_filler = row(placer_number="PL2", filler_number="F1", accession="ACCB")
        by_accession = row(placer_number="PL3", accession="ACCC")
        newer_same_accession = row(placer_number="PL4", accession="ACCC")
    cases = [
        ({"order.placer_number": "PL1", "order.filler_number": "F1", "order.accession": "ACCC"}, by_placer),
        ({"order.placer_number": "NOPE", "order.filler_number": "F1", "order.accession": "ACCC"}, by_filler),
        ({"order.placer_number": "NOPE", "order.filler_number": "NOPE", "order.accession": "ACCC"},
         newer_same_accession),
        ({"order.filler_number": "F1", "order.accession": "ACCA"}, by_filler),
        ({"order.accession": "ACCA"}, by_placer),
        ({"order.placer_number": "NOPE", "order.accession": ""}, None),
        ({}, None),
    ]
    with db.reader.connect() as conn:
        found = [(f.id if (f := find_order(conn, data)) is not None else None) for data, _ in cases]
        plain = find_order(conn, {"order.placer_number": "PL3"})
    assert found == [want for _, want in cases]
    assert plain is not None and plain.id == by_accession and "rank_" not in plain.values  # a plain orders row


@pytest.mark.parametrize(("control", "status"), [("CA", "CA"), ("OC", "CA"), ("DC", "DC"), ("OD", "DC")])
def test_cancel_and_discontinue_end_the_order_without_rewriting_it(db: Database, control: str, status: str) -> None:
    order(db, "NW", "PL1", "P1", modality="CT")
    out = order(db, control, "PL1", "P1", modality="MR", status="IP")  # its OBR and ORC-5 do not count
    o = order_row(db, "PL1")
    assert out.order_ids == [o.id]
    assert (o.status, o.modality) == (status, "CT")
    assert status_history(db, "PL1") == [("NW", None, "SC", True), (control, "SC", status, True)]


def test_a_cancelled_order_is_not_revived(db: Database) -> None:
    order(db, "NW", "PL1", "P1")
    order(db, "CA", "PL1", "P1")
    out = order(db, "NW", "PL1", "P1")
    assert out.order_ids == [order_row(db, "PL1").id] and order_row(db, "PL1").status == "CA"
    assert status_history(db, "PL1")[-1] == ("NW", "CA", "SC", False)


def test_a_completed_order_is_not_moved_back(db: Database) -> None:
    order(db, "NW", "PL1", "P1")
    order(db, "SC", "PL1", "P1", status="CM")
    order(db, "XO", "PL1", "P1", status="SC")
    assert order_row(db, "PL1").status == "CM"
    assert status_history(db, "PL1")[-1] == ("XO", "CM", "SC", False)


def test_a_stale_update_is_recorded_but_changes_nothing(db: Database) -> None:
    order(db, "NW", "PL1", "P1", modality="CT", event_time="2024-03-15T10:00:00")
    before = order_row(db, "PL1")
    out = order(db, "XO", "PL1", "P1", status="IP", modality="MR", event_time="2024-03-15T09:00:00")
    o = order_row(db, "PL1")
    assert out.order_ids == [o.id]
    assert (o.status, o.modality, o.version, o.source_time) == ("SC", "CT", before.version, "2024-03-15T10:00:00")
    assert status_history(db, "PL1") == [("NW", None, "SC", True), ("XO", "SC", "IP", False)]


@pytest.mark.parametrize(("control", "status"), [("XO", "SC"), ("SC", "SC"), ("HD", "HD")])
def test_a_change_for_an_unknown_order_creates_it(db: Database, control: str, status: str) -> None:
    out = order(db, control, "PL1", "P1")
    o = order_row(db, "PL1")
    assert out.order_ids == [o.id] and o.status == status
    assert status_history(db, "PL1") == [(control, None, status, True)]


def test_a_cancel_for_an_unknown_order_is_kept_so_the_late_nw_does_not_schedule(db: Database) -> None:
    order(db, "CA", "PL1", "P1", event_time="2024-03-15T09:00:00")
    assert order_row(db, "PL1").status == "CA"
    order(db, "NW", "PL1", "P1", event_time="2024-03-15T08:00:00")
    assert order_row(db, "PL1").status == "CA"
    with db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Order)).scalar_one() == 1


def test_a_change_with_another_patients_pid_moves_the_order_but_a_cancel_does_not(db: Database) -> None:
    first = admit(db, "P1")
    order(db, "NW", "PL1", "P1")
    order(db, "NW", "PL2", "P1")
    out = order(db, "XO", "PL1", "P2")
    assert out.patient_id is not None and out.patient_id != first
    assert order_row(db, "PL1").patient_id == out.patient_id
    order(db, "CA", "PL2", "P2")
    assert (order_row(db, "PL2").patient_id, order_row(db, "PL2").status) == (first, "CA")


@pytest.mark.parametrize(("change", "code", "field"), [
    ({"order.control": ""}, E.REQUIRED_FIELD_MISSING, "order.control"),
    ({"order.control": "SN"}, E.TABLE_VALUE_NOT_FOUND, "order.control"),
    ({"order.status": "XX"}, E.TABLE_VALUE_NOT_FOUND, "order.status"),
    ({"order.placer_number": None}, E.REQUIRED_FIELD_MISSING, "order.placer_number"),
])
def test_an_order_that_cannot_be_applied_is_refused_and_writes_nothing(db: Database, change: dict[str, Any],
                                                                       code: int, field: str) -> None:
    data = {**order_msg("NW", "PL1", "P1", accession=""), **change}
    with pytest.raises(DomainError) as refused, db.writer.begin() as conn:
        apply_order(conn, data, Outcome(), message_id=None)
    assert (refused.value.code, refused.value.field) == (code, field)
    assert patients(db) == 0
    with db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Order)).scalar_one() == 0


# === match_study =====================================================================================


def test_a_study_matches_its_order_by_accession(db: Database) -> None:
    patient_id = admit(db, "P1")
    order_id = order(db, "NW", "PL1", "P1", accession="ACC1").order_ids[0]
    m = match(db, add_study(db, "1.2.3.1", accession="ACC1", patient_id_header="P1", issuer_header=ISSUER))
    assert (m.matched_by, m.order_id, m.patient_id, m.exception) == ("accession", order_id, patient_id, False)
    assert m.authority.identifier == ("P1", ISSUER) and kinds(m) == []


def test_the_accession_decides_even_when_the_header_names_no_patient(db: Database) -> None:
    patient_id = admit(db, "P1")
    order_id = order(db, "NW", "PL1", "P1", accession="ACC1").order_ids[0]
    m = match(db, add_study(db, "1.2.3.1", accession="ACC1"))
    assert (m.matched_by, m.order_id, m.patient_id) == ("accession", order_id, patient_id)
    assert m.authority.identifier == ("P1", ISSUER)  # what the headers will be corrected to


def test_a_study_without_an_accession_matches_by_patient_id_and_issuer(db: Database) -> None:
    patient_id = admit(db, "P2")
    admit(db, "P2", issuer="OTHERHOSP")  # the same value under another issuer is another patient
    m = match(db, add_study(db, "1.2.3.2", patient_id_header="P2", issuer_header=ISSUER))
    assert (m.matched_by, m.order_id, m.patient_id, m.exception) == ("patient_id", None, patient_id, False)
    assert kinds(m) == ["accession_missing"]


def test_an_unknown_accession_falls_back_to_the_patient(db: Database) -> None:
    patient_id = admit(db, "P2")
    m = match(db, add_study(db, "1.2.3.2", accession="NOPE", patient_id_header="P2", issuer_header=ISSUER))
    assert (m.matched_by, m.order_id, m.patient_id) == ("patient_id", None, patient_id)
    assert kinds(m) == ["order_unknown"]


def test_a_merged_away_patient_id_matches_the_survivor_under_its_live_identifier(db: Database) -> None:
    survivor = admit(db, "SURV")
    admit(db, "GONE")
    merge(db, "SURV", "GONE")
    m = match(db, add_study(db, "1.2.3.3", patient_id_header="GONE", issuer_header=ISSUER))
    assert (m.matched_by, m.patient_id) == ("patient_id", survivor)
    assert m.authority.identifier == ("SURV", ISSUER)  # not the alias


@pytest.mark.parametrize(("accession", "header", "why"), [
    ("NOPE", "NOBODY", ["order_unknown", "patient_unknown"]),
    (None, "NOBODY", ["accession_missing", "patient_unknown"]),
    (None, None, ["accession_missing", "patient_id_missing"]),
])
def test_a_study_nothing_names_is_unmatched_and_says_why(db: Database, accession: str | None, header: str | None,
                                                         why: list[str]) -> None:
    admit(db, "P1")
    order(db, "NW", "PL1", "P1", accession="ACC1")
    m = match(db, add_study(db, "1.2.3.4", accession=accession, patient_id_header=header,
                            issuer_header=ISSUER if header else None))
    assert (m.matched_by, m.order_id, m.patient_id) == (None, None, None)
    assert kinds(m) == why


def test_a_cancelled_order_still_matches_with_a_finding(db: Database) -> None:
    patient_id = admit(db, "P1")
    order_id = order(db, "NW", "PL1", "P1", accession="ACC1").order_ids[0]
    order(db, "CA", "PL1", "P1", accession="ACC1")
    m = match(db, add_study(db, "1.2.3.5", accession="ACC1", patient_id_header="P1", issuer_header=ISSUER))
    assert (m.matched_by, m.order_id, m.patient_id) == ("accession", order_id, patient_id)
    (finding,) = m.findings
    assert finding.kind == "order_cancelled" and finding.detail["status"] == "CA"
    assert finding.detail["order"] == order_id


@pytest.mark.parametrize("conflict", ["follow_order", "exception"])
def test_an_accession_of_another_patients_order_follows_the_order(db: Database, conflict: str) -> None:
    """The order (by accession) decides the patient; the header's other patient is a
    patient_conflict finding, and with match.patient_conflict: exception the study is held."""
    owner_id = admit(db, "OWNER")
    header_id = admit(db, "OTHER")
    order_id = order(db, "NW", "PL1", "OWNER", accession="ACC1").order_ids[0]
    rules = default_rules()
    rules.match.patient_conflict = conflict
    m = match(db, add_study(db, "1.2.3.7", accession="ACC1", patient_id_header="OTHER", issuer_header=ISSUER),
              rules)
    assert (m.matched_by, m.order_id, m.patient_id) == ("accession", order_id, owner_id)
    assert m.authority.identifier == ("OWNER", ISSUER)
    (finding,) = m.findings
    assert finding.kind == "patient_conflict"
    assert (finding.detail["header_patient"], finding.detail["order_patient"]) == (header_id, owner_id)
    assert m.exception is (conflict == "exception")


def test_matching_writes_nothing(db: Database) -> None:
    admit(db, "P1")
    order(db, "NW", "PL1", "P1", accession="ACC1")
    study = add_study(db, "1.2.3.8", accession="ACC1", patient_id_header="P1", issuer_header=ISSUER)
    match(db, study)
    assert study_patient(db, "1.2.3.8") is None  # the reconciler records the match, not match_study
    with db.read_session() as s:
        row = s.execute(select(Study).where(Study.study_uid == "1.2.3.8")).scalar_one()
        assert (row.order_id, row.matched_by, row.recon_state) == (None, None, "pending")
