"""MLLP framing as senders really do it."""

from __future__ import annotations

from engine.connectors.mllp.framing import HEAD_BYTES, MLLPDecoder

MSG = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1||42\r"


def test_frame_split_over_many_reads() -> None:
    d = MLLPDecoder(1 << 20)
    data = b"\x0b" + MSG + b"\x1c\r"
    out = []
    for i in range(len(data)):
        frames, problems = d.feed(data[i:i + 1])
        out += frames
        assert not problems
    assert [f.data for f in out] == [MSG]


def test_several_frames_in_one_read_and_missing_trailing_cr() -> None:
    d = MLLPDecoder(1 << 20)
    frames, problems = d.feed(b"\x0b" + MSG + b"\x1c" + b"\x0b" + MSG + b"\x1c\r\n\x0b" + MSG + b"\x1c")
    assert len(frames) == 3 and not problems


def test_garbage_between_frames_is_reported_and_skipped() -> None:
    d = MLLPDecoder(1 << 20)
    frames, problems = d.feed(b"hello\x0b" + MSG + b"\x1c\r")
    assert [f.data for f in frames] == [MSG]
    assert [p.kind for p in problems] == ["garbage"]


def test_start_block_inside_a_frame_means_the_previous_was_truncated() -> None:
    d = MLLPDecoder(1 << 20)
    frames, problems = d.feed(b"\x0bMSH|^~\\&|partial\x0b" + MSG + b"\x1c\r")
    assert [f.data for f in frames] == [MSG]
    assert problems[0].kind == "truncated" and problems[0].data.startswith(b"MSH|")


def test_oversized_frame_keeps_only_its_head() -> None:
    d = MLLPDecoder(1000)
    body = MSG + b"X" * (3 * HEAD_BYTES)
    frames, _ = d.feed(b"\x0b" + body[:5000])
    assert not frames
    frames, _ = d.feed(body[5000:] + b"\x1c\r")
    (f,) = frames
    assert f.oversized and f.size == len(body) and f.data == body[:HEAD_BYTES]


def test_close_inside_a_frame_is_truncation() -> None:
    d = MLLPDecoder(1 << 20)
    d.feed(b"\x0bMSH|^~\\&|half")
    problem = d.close()
    assert problem is not None and problem.kind == "truncated"
    assert MLLPDecoder(10).close() is None
