"""A channel's per-minute figures (engine/store/minutes.py) on their way to the database: counted
in memory as each message is answered, handed to the writer every FLUSH_SECONDS (its next batch),
and once more when the channel stops. Used by the connectors that take HL7 v2 (mllp, file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from engine.pipeline.writer import IngestWriter
from engine.store import minutes

log = logging.getLogger(__name__)
FLUSH_SECONDS = 2.0  # how often the counts go to the writer
PRUNE_SECONDS = 3600.0  # and how often a flush also drops the rows older than two days


class MinuteFigures:
    def __init__(self, channel: str, writer: IngestWriter) -> None:
        self.channel = channel
        self.writer = writer
        self.tally = minutes.MinuteTally()
        self._task: asyncio.Task[None] | None = None
        self._prune_at = 0.0

    def add(self, ack_code: str | None, seconds: float) -> None:
        """One message answered with ``ack_code``, ``seconds`` after it was complete (no I/O)."""
        self.tally.add(self.channel, ack_code, seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._every(FLUSH_SECONDS), name=f"minutes-{self.channel}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Hand what was counted since the last flush to the writer."""
        rows = self.tally.drain()
        if not rows:
            return
        prune = time.monotonic() >= self._prune_at
        try:
            await self.writer.run(lambda session: minutes.flush(session.connection(), rows, prune=prune))
            if prune:
                self._prune_at = time.monotonic() + PRUNE_SECONDS
        except Exception as exc:  # kept for the next flush: figures are late, never lost while running
            self.tally.restore(rows)
            log.warning("channel %s: per-minute figures not written yet: %s", self.channel, exc)

    async def _every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()
