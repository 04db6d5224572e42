"""Progress lines for long stages: the share of the work done and an estimate of the time left.

A :class:`StageProgress` turns ``(done, total)`` callbacks into lines such as
``"SAE training: 40% (120 / 300 steps), about 35 s left"``, at most one per ``every`` seconds (and
always the last), so a command that prints them stays readable. The estimate is the plain rate
since the first callback (what came before it, e.g. loading, is not the stage's pace); it says
"estimating" until a second callback has moved on from the first. A line equal to the one before
is not repeated.
"""
from __future__ import annotations

import time
from collections.abc import Callable


def format_seconds(seconds: float) -> str:
    """``"35 s"``, ``"4 min 10 s"``, ``"1 h 02 min"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class StageProgress:
    """``progress(done, total)`` -> at most one line per ``every`` seconds through ``say``."""

    def __init__(self, say: Callable[[str], None], stage: str, unit: str = "", every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.say, self.stage, self.unit, self.every, self.clock = say, stage, unit, every, clock
        self.first: tuple[float, int] | None = None  # (time, done) of the first callback
        self.last: float | None = None
        self.last_line: str | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.first is None or done < self.first[1]:  # the first callback, or a new pass of the stage
            self.first = (now, done)
        finished = done >= total
        if not finished and self.last is not None and now - self.last < self.every:
            return
        line = self.line(done, total, now)
        if line != self.last_line:
            self.last, self.last_line = now, line
            self.say(line)

    def line(self, done: int, total: int, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        t0, done0 = self.first if self.first is not None else (now, done)
        share = done / total if total > 0 else 1.0
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.stage}: {share:.0%} ({done} / {total}{unit})"
        if done >= total:
            return f"{head}, done"
        if done <= done0 or now <= t0:
            return f"{head}, estimating the time left"
        return f"{head}, about {format_seconds((now - t0) / (done - done0) * (total - done))} left"
