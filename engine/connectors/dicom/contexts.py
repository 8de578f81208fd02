"""Presentation contexts the SCP accepts."""

from __future__ import annotations

from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

FIND_MODELS = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
MOVE_MODELS = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
GET_MODELS = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def add_supported(ae: AE) -> None:
    """Every storage SOP class pynetdicom knows, in every transfer syntax it knows (stored as
    received, never transcoded); Verification, Q/R FIND/MOVE/GET and Modality Worklist FIND.

    Storage contexts also accept the SCP role the requestor asks for in C-GET: there we are the
    storage SCU on the requestor's association.

    Storage Commitment Push Model: a destination the engine asked for storage commitment opens an
    association to send its N-EVENT-REPORT, taking the SCP role of the SOP class (SCP/SCU role selection,
    PS3.4 J.3.3); the engine accepts that role (and is then its SCU). A requestor proposing no role
    selection gets the default roles; its reports are taken all the same."""
    ae.add_supported_context(Verification, UNCOMPRESSED)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(StorageCommitmentPushModel, UNCOMPRESSED, scu_role=True, scp_role=True)
    for model in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS, ModalityWorklistInformationFind):
        ae.add_supported_context(model, UNCOMPRESSED)


class SharedContexts(list[PresentationContext]):
    """The SCP's supported presentation contexts, handed to each association as they are.

    pynetdicom gives each association it accepts a ``deepcopy`` of the server's ``contexts`` (a public
    attribute): with every storage SOP class in every transfer syntax (``add_supported``: ~180
    contexts, ~7,700 UIDs) that is ~0.2 s of CPU, holding the GIL, per association: a PACS router
    opening one association per study or several at once waits for it, and so does every association
    already transferring. The acceptor's contexts are only read while the association is negotiated
    (``negotiate_as_acceptor`` builds new contexts for its answer), and the engine never changes them
    after the start, so a new list of the same context objects is as good as a deep copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return SharedContexts(self)


def move_contexts(pairs: set[tuple[str, str]]) -> list[Any]:
    """Contexts to propose to a C-MOVE destination: one per stored (SOP class, compressed transfer
    syntax), so the destination accepts or refuses that syntax alone, and one uncompressed context
    per SOP class."""
    from pynetdicom.presentation import build_context
    out = []
    for sop_class in sorted({c for c, _ in pairs}):
        out.append(build_context(sop_class, list(UNCOMPRESSED)))
    for sop_class, ts in sorted(pairs):
        if ts not in UNCOMPRESSED:
            out.append(build_context(sop_class, [ts]))
    return out[:128]
