"""An incremental MLLP decoder.

It accepts what real senders do: a frame split over many reads, several frames in one read, a
missing CR after the end block, stray CR/LF between frames. Bytes outside a frame are reported as
garbage and skipped; a start block inside an open frame means the previous frame was truncated.
A frame over ``max_size`` is not kept: its first bytes are (so the NAK can name MSH-10) and the rest
is counted and dropped until its end block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

_SB, _EB, _CR = 0x0B, 0x1C, 0x0D
_WHITESPACE = b"\r\n\t \x00"
HEAD_BYTES = 64 * 1024


@dataclass
class Frame:
    data: bytes  # the whole payload, or its first HEAD_BYTES when oversized
    size: int
    oversized: bool = False


class ProblemKind(StrEnum):
    GARBAGE = "garbage"  # bytes outside a frame
    TRUNCATED = "truncated"  # a frame cut off by a new start block or by the connection ending


@dataclass
class FrameProblem:
    kind: ProblemKind
    detail: str
    data: bytes = b""


@dataclass
class FramingReport:
    """The framing problems of one connection, kept as counts and one sample: a peer sending
    b"\\x0bX" over and over makes one problem per 2 bytes, and each must not become a stored message
    and a log line of its own."""

    counts: dict[ProblemKind, int] = field(default_factory=dict)
    first: FrameProblem | None = None  # the first problem, whose detail is quoted
    sample: bytes = b""  # the data of the first problem that had any (a truncated frame's head)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, problem: FrameProblem) -> None:
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        if self.first is None:
            self.first = problem
        if not self.sample and problem.data:
            self.sample = problem.data

    def summary(self) -> str:
        truncated = self.counts.get(ProblemKind.TRUNCATED, 0)
        garbage = self.counts.get(ProblemKind.GARBAGE, 0)
        first = self.first.detail if self.first is not None else ""
        return (f"MLLP framing errors on one connection: {truncated} truncated frame(s), {garbage} run(s) of "
                f"bytes outside a frame; the first: {first}")


class MLLPDecoder:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._in_frame = False
        self._size = 0

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    @property
    def buffered_bytes(self) -> int:
        """What the open frame holds in memory (at most max_size)."""
        return len(self._buf)

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> tuple[list[Frame], list[FrameProblem]]:
        frames: list[Frame] = []
        problems: list[FrameProblem] = []
        pos, n = 0, len(data)
        while pos < n:
            if not self._in_frame:
                i = data.find(_SB, pos)
                stray = data[pos:] if i < 0 else data[pos:i]
                if stray.strip(_WHITESPACE):
                    problems.append(FrameProblem(ProblemKind.GARBAGE, f"{len(stray)} byte(s) outside an MLLP frame skipped",
                                                 bytes(stray[:256])))
                if i < 0:
                    break
                self._in_frame = True
                self._buf.clear()
                self._size = 0
                pos = i + 1
                continue
            j = data.find(_EB, pos)
            end = n if j < 0 else j
            k = data.find(_SB, pos, end)
            if k >= 0:
                self._append(data[pos:k])
                problems.append(FrameProblem(ProblemKind.TRUNCATED, "a new frame started before the previous one ended",
                                             bytes(self._buf[:HEAD_BYTES])))
                self._buf.clear()
                self._size = 0
                pos = k + 1
                continue
            self._append(data[pos:end])
            if j < 0:
                break
            frames.append(Frame(bytes(self._buf), self._size, self._size > self.max_size))
            self._buf.clear()
            self._size = 0
            self._in_frame = False
            pos = j + 1
            if pos < n and data[pos] == _CR:
                pos += 1
        return frames, problems

    def _append(self, chunk: bytes) -> None:
        self._size += len(chunk)
        limit = self.max_size if self._size <= self.max_size else HEAD_BYTES  # over the limit: keep the head
        if len(self._buf) > limit:
            del self._buf[limit:]
        room = limit - len(self._buf)
        if room > 0:
            self._buf += chunk[:room]

    def close(self) -> FrameProblem | None:
        """The connection ended; an open frame is truncated."""
        if self._in_frame and (self._buf or self._size):
            return FrameProblem(ProblemKind.TRUNCATED, f"connection closed inside a frame after {self._size} byte(s)",
                                bytes(self._buf[:HEAD_BYTES]))
        return None
