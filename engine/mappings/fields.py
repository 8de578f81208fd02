"""The domain fields a mapping may fill, with what each means (used by `radbridge check` and docs).

A mapped result is a flat dict keyed by these names. A key that is absent means "the message says
nothing about this" (no change); a key present with ``None`` means "clear it" (HL7 ``""``).
Names ending in ``.extra.<name>`` are free-form site fields (Z-segments and the like) stored as JSON.
"""

from __future__ import annotations

from typing import Any

# One message's (or one ORC group's) mapped result: {field name: value}. Not a TypedDict: the
# ``.extra.<name>`` keys are the site's own, and the domain reads fields by computed names
# (f"patient.{column}"), which a TypedDict only allows for literal keys.
MappedFields = dict[str, Any]

PATIENT_FIELDS: dict[str, str] = {
    "patient.id": "identifier value (required)",
    "patient.issuer": "assigning authority of patient.id ('' when none)",
    "patient.identifier_type": "identifier type code of patient.id (e.g. MR)",
    "patient.identifiers": "list of further identifiers, each {value, issuer, type} (use 'each:')",
    "patient.family_name": "family name",
    "patient.given_name": "given name",
    "patient.middle_name": "middle names or initials",
    "patient.prefix": "name prefix (e.g. DR)",
    "patient.suffix": "name suffix (e.g. JR)",
    "patient.birth_date": "birth date, ISO (use the 'date' transform)",
    "patient.sex": "administrative sex code (M, F, O, U, A, N)",
    "patient.address.street": "address: street (PID-11.1, Patient.address.line[0])",
    "patient.address.other": "address: other designation, e.g. apartment (PID-11.2, Patient.address.line[1])",
    "patient.address.city": "address: city",
    "patient.address.state": "address: state or province",
    "patient.address.postal_code": "address: ZIP or postal code",
    "patient.address.country": "address: country",
    "patient.address.type": "address: type, HL7 table 0190 (H home, B business, M mailing, C current, ...)",
}
# The parts of patient.address: a message that maps any of them replaces the whole stored address
# (parts it leaves out are not kept from the previous one); all of them empty ("") clears it.
ADDRESS_PARTS = ("street", "other", "city", "state", "postal_code", "country", "type")

ORDER_FIELDS: dict[str, str] = {
    "order.control": "order control code (ORC-1: NW, XO, SC, CA, DC, OC, OD, HD, RL)",
    "order.status": "order status (ORC-5: SC, IP, CM, CA, DC, HD, A)",
    "order.placer_number": "placer order number",
    "order.placer_issuer": "placer order number's namespace",
    "order.filler_number": "filler order number",
    "order.accession": "accession number (DICOM 0008,0050)",
    "order.procedure_code": "requested procedure code",
    "order.procedure_text": "requested procedure description",
    "order.procedure_scheme": "coding scheme of procedure_code",
    "order.modality": "modality (CT, MR, ...)",
    "order.scheduled_at": "scheduled start, ISO date/time (use the 'datetime' transform)",
    "order.station_aet": "scheduled station AE title",
    "order.priority": "priority",
    "order.requested_procedure_id": "requested procedure ID",
    "order.sps_id": "scheduled procedure step ID",
    "order.study_uid": "Study Instance UID assigned by the RIS",
    "order.reason": "reason for study",
    "order.ordering_provider": "ordering provider, as text",
}

MERGE_FIELDS: dict[str, str] = {
    "merge.prior_id": "the identifier being merged away (MRG-1) (required for merges)",
    "merge.prior_issuer": "its assigning authority",
    "merge.survivor_id": "FHIR Patient.link replaced-by: the identifier this patient is merged into (the "
                         "resource's own identifier is then the one merged away)",
    "merge.survivor_issuer": "its assigning authority",
}

MESSAGE_FIELDS: dict[str, str] = {
    "message.event_time": "when the event happened, ISO (EVN-2 else MSH-7): older updates do not overwrite newer",
}

ALL_FIELDS: dict[str, str] = {**PATIENT_FIELDS, **ORDER_FIELDS, **MERGE_FIELDS, **MESSAGE_FIELDS}
EXTRA_PREFIXES = ("patient.extra.", "order.extra.")
LIST_FIELDS = {"patient.identifiers": ("value", "issuer", "type")}


def is_known_field(name: str) -> bool:
    if name in ALL_FIELDS:
        return True
    return any(name.startswith(p) and len(name) > len(p) for p in EXTRA_PREFIXES)
