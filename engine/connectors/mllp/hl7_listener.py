"""An HL7 channel on an MLLP port: frames in, ACKs out after the writer's commit."""

from __future__ import annotations

import logging
import time
from ssl import SSLContext

from engine.channels import Channel
from engine.connectors.minute_figures import MinuteFigures
from engine.connectors.mllp.framing import Frame, FrameProblem, FramingReport
from engine.connectors.mllp.server import MLLPServer
from engine.errors import report_failure
from engine.hl7 import errors as E
from engine.hl7.errors import HL7Error, HL7ParseError
from engine.hl7.message import parse_text
from engine.metrics import Metrics
from engine.pipeline.hl7_inbound import HL7Inbound, Prepared
from engine.pipeline.stage import ingest
from engine.pipeline.writer import IngestWriter, StorageUnavailable
from engine.store.states import MessageStatus

log = logging.getLogger(__name__)


class HL7Listener:
    def __init__(self, channel: Channel, inbound: HL7Inbound, writer: IngestWriter, metrics: Metrics, *,
                 host: str, port: int, max_connections: int = 200,
                 max_buffered_bytes: int = 256 * 1024 * 1024, tls: SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        self.channel = channel
        self.inbound = inbound
        self.writer = writer
        self.metrics = metrics
        self.minutes = MinuteFigures(channel.name, writer)
        opts = channel.options
        self.server = MLLPServer(channel.name, host, port, self._on_frame, on_problem=self._on_problem,
                                 on_report=self._on_report, max_size=opts.max_message_bytes,
                                 idle_timeout=opts.idle_timeout_seconds, max_connections=max_connections,
                                 max_buffered_bytes=max_buffered_bytes, tls=tls, reuse_port=reuse_port)

    async def start(self) -> None:
        await self.server.start()
        self.minutes.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self.minutes.stop()

    def _oversized(self, fr: Frame, remote: str) -> Prepared:
        p = Prepared(raw=fr.data, remote=remote, received_at=time.time(), size=fr.size)
        first_line = fr.data.split(b"\r", 1)[0].decode("latin-1", "replace")
        try:
            p.message = parse_text(first_line, "latin-1")
        except HL7ParseError:
            p.message = None
        p.reject = HL7Error(E.INTERNAL_ERROR, f"message of {fr.size} bytes exceeds this channel's limit of "
                                              f"{self.channel.options.max_message_bytes} bytes (max_message_bytes); "
                                              "only its first bytes were kept")
        return p

    async def _on_frame(self, fr: Frame, remote: str) -> list[bytes]:
        t0 = time.perf_counter()
        name = self.channel.name
        self.metrics.received.inc(channel=name)
        p = self._oversized(fr, remote) if fr.oversized else self.inbound.prepare(fr.data, remote)
        charset = p.message.charset if p.message is not None else "latin-1"
        try:
            stored = await ingest(self.writer, self.inbound, p)
            replies, code, status = stored.replies, stored.ack_code, stored.status
        except StorageUnavailable as exc:
            replies, code, status = self.inbound.storage_failure_acks(p, str(exc)), "AR", MessageStatus.NOT_STORED
        except Exception as exc:  # a bug in a job: the message was not stored, say so
            reason = report_failure(log, exc, "channel %s: message from %s could not be stored", name, remote)
            replies, code, status = self.inbound.storage_failure_acks(p, f"internal error: {reason}"), "AR", MessageStatus.NOT_STORED
        if status == MessageStatus.DUPLICATE:
            self.metrics.duplicates.inc(channel=name)
        elif status in (MessageStatus.ERROR, MessageStatus.REJECTED, MessageStatus.NOT_STORED):
            self.metrics.failed.inc(channel=name, reason=status)
        for reply in replies:
            self.metrics.acked.inc(channel=name, code=reply.split("\r", 2)[1][4:6] if "\rMSA" in reply else code)
        elapsed = time.perf_counter() - t0
        self.metrics.latency.observe(elapsed, channel=name)
        self.minutes.add(code, elapsed)
        return [r.encode(charset, errors="replace") for r in replies]

    def _on_problem(self, problem: FrameProblem) -> None:
        self.metrics.frame_errors.inc(channel=self.channel.name, kind=problem.kind)

    async def _on_report(self, report: FramingReport, remote: str) -> None:
        """One rejected message per connection (and per run of problems between good frames) with
        the counts and a sample, never one per problem."""
        if not report.sample:
            return
        p = Prepared(raw=report.sample, remote=remote, received_at=time.time())
        p.reject = HL7Error(E.SEGMENT_SEQUENCE, report.summary())
        try:
            await ingest(self.writer, self.inbound, p)
        except Exception as exc:
            log.warning("channel %s: framing errors from %s not recorded: %s", self.channel.name, remote, exc)
