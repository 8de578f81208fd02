"""One shape for every way data enters the store: HL7 v2, FHIR and the DICOM index.

    prepared = stage.prepare(...)        outside the writer: parse, check, route, map (no store I/O)
    result = await ingest(writer, stage, prepared)
                                         in the writer thread: ``stage.apply(session, prepared)`` in
                                         one transaction with other jobs, then one durable COMMIT
    answer the peer from ``result``      only now: ACK, C-STORE status, HTTP response

``ingest`` returns only after the COMMIT of the transaction that applied ``prepared``, so a
connector that answers from its result can never acknowledge something a crash would lose.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

P = TypeVar("P", contravariant=True)
R = TypeVar("R", covariant=True)
T = TypeVar("T")


class InboundStage(Protocol[P, R]):
    """What HL7Inbound, FhirInbound and DicomIndex share: ``apply`` runs inside the writer's
    transaction (it may raise to roll back its own SAVEPOINT; the writer retries or reports)."""

    def apply(self, session: Session, prepared: P) -> R: ...


class Writer(Protocol):
    def run(self, work: Callable[[Session], T]) -> Awaitable[T]: ...

    def submit(self, work: Callable[[Session], T]) -> concurrent.futures.Future[T]: ...


async def ingest(writer: Writer, stage: InboundStage[Any, T], prepared: Any) -> T:
    """Apply ``prepared`` in the writer's next transaction; returns after its COMMIT."""
    return await writer.run(lambda session: stage.apply(session, prepared))


def ingest_blocking(writer: Writer, stage: InboundStage[Any, T], prepared: Any, *, timeout: float) -> T:
    """``ingest`` for threads that are not the event loop's (pynetdicom's association threads)."""
    return writer.submit(lambda session: stage.apply(session, prepared)).result(timeout=timeout)
