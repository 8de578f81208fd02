"""Counters and histograms in the Prometheus text format, without a dependency."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LabelKey = tuple[tuple[str, str], ...]


def _fmt_labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
                     for k, v in items)
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self._values.items()):
            lines.append(f"{self.name}{_fmt_labels(key)} {v:g}")
        return lines


class Histogram:
    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self._data: dict[LabelKey, list[float]] = {}  # bucket counts..., count, sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        idx = bisect.bisect_left(self.buckets, value)
        with self._lock:
            d = self._data.get(key)
            if d is None:
                d = self._data[key] = [0.0] * (len(self.buckets) + 2)
            for i in range(idx, len(self.buckets)):
                d[i] += 1
            d[-2] += 1
            d[-1] += value

    def count(self, **labels: str) -> float:
        d = self._data.get(tuple(sorted(labels.items())))
        return d[-2] if d else 0.0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, d in sorted(self._data.items()):
            for b, c in zip(self.buckets, d, strict=False):
                lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', f'{b:g}'),))} {c:g}")
            lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {d[-2]:g}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {d[-2]:g}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {d[-1]:.6f}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.received = Counter("radbridge_messages_received_total", "Messages received, per channel")
        self.acked = Counter("radbridge_messages_acked_total", "Acknowledgements sent, per channel and code")
        self.failed = Counter("radbridge_messages_failed_total",
                              "Messages not applied (AE/AR/CE/CR), per channel and reason")
        self.duplicates = Counter("radbridge_messages_duplicate_total",
                                  "Resent messages re-acknowledged without applying, per channel")
        self.connections = Counter("radbridge_connections_total", "Connections accepted, per channel")
        self.frame_errors = Counter("radbridge_frame_errors_total",
                                    "MLLP framing problems (garbage, truncated, oversized), per channel and kind")
        self.latency = Histogram("radbridge_ack_latency_seconds",
                                 "Time from a complete frame to its ACK being written, per channel")
        self.pruned = Counter("radbridge_retention_pruned_total", "Rows pruned by retention, per kind")
        self.dicom_stored = Counter("radbridge_dicom_instances_total",
                                    "C-STORE requests answered, per channel and outcome (stored, duplicate, failed ...)")
        self.dicom_requests = Counter("radbridge_dicom_requests_total",
                                      "DIMSE requests served, per channel and service (echo, find, mwl, move, get)")
        self.dicom_associations = Counter("radbridge_dicom_associations_total",
                                          "Associations, per channel and result (accepted, rejected, aborted)")
        self.store_latency = Histogram("radbridge_dicom_store_seconds",
                                       "Time from a complete C-STORE request to its response, per channel")
        self.studies_stable = Counter("radbridge_studies_stable_total", "Studies that became stable")
        self.reconciliations = Counter("radbridge_reconciliations_total",
                                       "Reconciliation runs, per resulting state (reconciled, flagged, unmatched ...)")
        self.coerced_instances = Counter("radbridge_coerced_instances_total",
                                         "Stored instances rewritten to agree with their order and patient")
        self.deliveries = Counter("radbridge_deliveries_total",
                                  "Delivery attempts to the EHR, per destination and outcome (delivered, retry, dead)")
        self.delivery_latency = Histogram("radbridge_delivery_seconds",
                                          "Time of one delivery attempt (send and answer), per destination")
        self.fhir_requests = Counter("radbridge_fhir_requests_total",
                                     "FHIR writes (create, update, Bundle), per kind and outcome (ok, error)")
        self.fhir_latency = Histogram("radbridge_fhir_write_seconds",
                                      "Time from a FHIR write's body read to its commit, per kind")
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self._gauges[name] = (help, fn)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.received, self.acked, self.failed, self.duplicates, self.connections, self.frame_errors,
                  self.latency, self.pruned, self.dicom_stored, self.dicom_requests, self.dicom_associations,
                  self.store_latency, self.studies_stable, self.reconciliations, self.coerced_instances,
                  self.deliveries, self.delivery_latency, self.fhir_requests, self.fhir_latency):
            lines.extend(m.render())
        for name, (help, fn) in sorted(self._gauges.items()):
            try:
                v = fn()
            except Exception:  # a gauge must never break /metrics
                continue
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {v:g}"]
        return "\n".join(lines) + "\n"
