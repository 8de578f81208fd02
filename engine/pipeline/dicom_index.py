"""The DICOM index as an inbound stage: a received instance, already durable in storage, becomes
its index rows (study, series, instance) and its domain events in one writer transaction.

The SCP prepares (reads the header, writes and fsyncs the file) in its association thread; only
then is the index applied, and only after that COMMIT does the SCP answer C-STORE success."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from engine.dicom.headers import InstanceHeader
from engine.domain.events import EventBus
from engine.domain.studies import StoreResult, record_instance
from engine.storage.base import StoredObject


@dataclass(frozen=True)
class ReceivedInstance:
    header: InstanceHeader
    stored: StoredObject  # the file, durable in storage
    calling_aet: str | None
    remote: str | None


class DicomIndex:
    """One DICOM channel's index stage (its duplicate policy, its events bus)."""

    def __init__(self, channel: str, duplicates: str, bus: EventBus) -> None:
        self.channel = channel
        self.duplicates = duplicates
        self.bus = bus

    def prepare(self, header: InstanceHeader, stored: StoredObject, *, calling_aet: str | None,
                remote: str | None) -> ReceivedInstance:
        return ReceivedInstance(header, stored, calling_aet, remote)

    def apply(self, session: Session, received: ReceivedInstance) -> StoreResult:
        conn = session.connection()
        result = record_instance(conn, received.header, received.stored, policy=self.duplicates,
                                 channel=self.channel, calling_aet=received.calling_aet, remote=received.remote)
        self.bus.publish_all(conn, result.events)
        return result
