"""A progress line on stderr for long runs: count, rate and time left.

On a terminal the line is rewritten in place after every update; otherwise (a log file, a pipe)
one line is printed at most every `interval` seconds, plus the last one, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call with (done, total) after each step; call `finish()` at the end."""

    def __init__(self, label: str, unit: str, *, stream: TextIO | None = None, interval: float = 10.0):
        self._label, self._unit = label, unit
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = self._stream.isatty()
        self._interval = interval
        self._started = time.monotonic()
        self._last_print = float("-inf")
        self._last_line = ""
        self._pending = False

    def __call__(self, done: int, total: int) -> None:
        self._last_line = self.line(done, total, time.monotonic() - self._started)
        now = time.monotonic()
        if self._interactive:
            self._stream.write("\r" + self._last_line + "\033[K")
            self._stream.flush()
        elif now - self._last_print >= self._interval or done >= total:
            self._stream.write(self._last_line + "\n")
            self._stream.flush()
            self._last_print = now
            self._pending = False
            return
        self._pending = True

    def finish(self) -> None:
        """End the in-place line (terminal) or print the last state if it was not shown."""
        if self._interactive and self._last_line:
            self._stream.write("\n")
        elif self._pending:
            self._stream.write(self._last_line + "\n")
        self._stream.flush()
        self._pending = False

    def line(self, done: int, total: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self._label}: {done}/{total} {self._unit}, {rate:.1f} {self._unit}/s"
        if done >= total:
            return f"{text}, done in {_duration(elapsed)}"
        if rate > 0:
            return f"{text}, {_duration((total - done) / rate)} left"
        return text


def _duration(seconds: float) -> str:
    """'42 s', '3:07' (minutes:seconds) or '1:02:03'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
