"""What listeners share to stay usable under hostile peers."""

from __future__ import annotations

import time


class LogBudget:
    """At most ``lines`` log lines per ``period`` seconds; the lines over it are counted, and the
    next line allowed says how many were left out (a flood of bad peers must not flood the log)."""

    def __init__(self, lines: int = 20, period: float = 60.0) -> None:
        self.lines, self.period = lines, period
        self._window_start = 0.0
        self._used = 0
        self.suppressed = 0

    def take(self) -> int | None:
        """None: stay silent; otherwise the number of lines left out since the last one allowed."""
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._used = now, 0
        if self._used >= self.lines:
            self.suppressed += 1
            return None
        self._used += 1
        left_out, self.suppressed = self.suppressed, 0
        return left_out

    def note(self, msg: str) -> str | None:
        """``msg`` to log now (with the count left out before it), or None to stay silent."""
        left_out = self.take()
        if left_out is None:
            return None
        return f"{msg} ({left_out} similar line(s) left out)" if left_out else msg
