"""The outbox of a dicom-forward channel: which events owe a destination the study (or instance), as
rows of the deliveries table, written in the transaction of the event (docs/forwarding.md).

    ForwardOutbox(channel).subscribe(bus)   handlers for the events its enabled routes name (when:)
    on_event(conn, event)                   the route filters are applied to the study (instance);
                                            one pending row per destination that takes it

A row is: channel = the forward channel, destination = the destination's name (unique across all
channels: claims are by name), mapping = FORWARD_MAPPING (no message is built: the stored instances
are sent), event = the route's when, study_id (and instance_id for instance.received), order_key
study:ID, so one destination gets a study's deliveries in the order they were written (outbox.claim).
They are sent by the connector's DestinationWorker (engine/outbound/worker.py) with its DICOM sender
(engine/connectors/dicom/forward.py); retry, discard, the API and the console treat them as any other.

instance.received comes with every C-STORE: its handler reads nothing (the event carries what the
filters look at) unless a route filters on the reconciliation state, and writes one row per
destination that takes the instance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import Connection, select

from engine.channels import FORWARD_MAPPING, Channel, ForwardRoute
from engine.domain.events import Event, EventBus, EventKind, InstanceReceived, ReconcileOutcome, StudyStable
from engine.domain.records import add
from engine.domain.studies import INSTANCES, STUDIES
from engine.outbound.outbox import DELIVERIES
from engine.store.states import DeliveryState
from engine.store.types import utcnow


@dataclass
class _Study:
    """What the filters look at, and the links a delivery row keeps."""

    modalities: set[str]
    calling_aets: set[str] | None  # None: not looked up (no route filters on it)
    accession: str | None
    reconciliation: str | None
    patient_id: int | None = None
    order_id: int | None = None


class ForwardOutbox:
    """One dicom-forward channel's enabled routes, for writing its deliveries in the transaction of the
    event that causes them."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel.name
        self.routes: list[ForwardRoute] = [r for r in channel.forward_routes if r.enabled]
        self.by_event: dict[str, list[ForwardRoute]] = {}
        for r in self.routes:
            for ev in r.when:
                self.by_event.setdefault(ev, []).append(r)
        self._queued = 0
        self._lock = threading.Lock()

    def subscribe(self, bus: EventBus) -> None:
        for kind in self.by_event:
            bus.subscribe(EventKind(kind), self.on_event)

    def take_queued(self) -> int:
        """Deliveries queued since the last call (to wake the workers)."""
        with self._lock:
            n, self._queued = self._queued, 0
        return n

    def on_event(self, conn: Connection, event: Event) -> None:
        routes = self.by_event.get(str(event.kind))
        if not routes:
            return
        if isinstance(event, InstanceReceived):
            ids = self._queue(conn, routes, str(event.kind), event.study_id, event.instance_id, self._instance(conn, routes, event))
        elif isinstance(event, StudyStable | ReconcileOutcome):
            found = self._study(conn, routes, event)
            ids = self._queue(conn, routes, str(event.kind), event.study_id, None, found) if found is not None else []
        else:
            return
        if ids:
            with self._lock:
                self._queued += len(ids)

    # --- what the filters see ---------------------------------------------------------------------------
    @staticmethod
    def _instance(conn: Connection, routes: list[ForwardRoute], ev: InstanceReceived) -> _Study:
        state = None
        if any(r.filter.reconciliation for r in routes):  # the only filter the event cannot answer
            state = conn.execute(select(STUDIES.c.recon_state).where(STUDIES.c.id == ev.study_id)).scalar()
        return _Study({ev.modality} if ev.modality else set(), {ev.calling_aet} if ev.calling_aet else set(),
                      ev.accession, state)

    @staticmethod
    def _study(conn: Connection, routes: list[ForwardRoute], ev: StudyStable | ReconcileOutcome) -> _Study | None:
        row = conn.execute(select(STUDIES.c.modalities, STUDIES.c.accession, STUDIES.c.recon_state,
                                  STUDIES.c.patient_id, STUDIES.c.order_id)
                           .where(STUDIES.c.id == ev.study_id)).first()
        if row is None:
            return None
        aets = None
        if any(r.filter.calling_aet for r in routes):
            aets = {a for (a,) in conn.execute(select(INSTANCES.c.calling_aet).distinct()
                                               .where(INSTANCES.c.study_id == ev.study_id)) if a}
        state = ev.state if isinstance(ev, ReconcileOutcome) else row.recon_state
        patient_id = ev.patient_id if isinstance(ev, ReconcileOutcome) else row.patient_id
        order_id = ev.order_id if isinstance(ev, ReconcileOutcome) else row.order_id
        return _Study(set(filter(None, (row.modalities or "").split("\\"))), aets, row.accession or ev.accession,
                      state, patient_id, order_id)

    # --- rows ---------------------------------------------------------------------------------------------
    def _queue(self, conn: Connection, routes: list[ForwardRoute], event: str, study_id: int,
               instance_id: int | None, found: _Study) -> list[int]:
        """A pending row per destination that one of the routes takes this to (one, however many routes)."""
        targets: list[str] = []
        for r in routes:
            if r.to not in targets and r.filter.takes(modalities=found.modalities, calling_aets=found.calling_aets,
                                                      accession=found.accession, reconciliation=found.reconciliation):
                targets.append(r.to)
        now = utcnow()
        return [add(conn, DELIVERIES, created_at=now, channel=self.channel, destination=to, mapping=FORWARD_MAPPING,
                    event=event, study_id=study_id, instance_id=instance_id, patient_id=found.patient_id,
                    order_id=found.order_id, order_key=f"study:{study_id}", state=DeliveryState.PENDING, attempts=0,
                    next_at=now)
                for to in targets]
