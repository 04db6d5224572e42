"""Stage progress lines: share done, time left from the rate since the first callback, throttled."""
from __future__ import annotations

from surgery.runtime.progress import StageProgress, format_seconds


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_give_the_share_done_and_the_time_left_at_the_rate_so_far():
    clock, lines = Clock(), []
    progress = StageProgress(lines.append, "SAE training", "steps", every=10.0, clock=clock)
    clock.now += 500  # whatever ran before the stage's first callback does not count
    progress(20, 300)
    clock.now += 10
    progress(120, 300)  # 100 steps in 10 s: 180 left at 10 steps/s
    clock.now += 3
    progress(150, 300)  # within 10 s of the last line: not printed
    clock.now += 15
    progress(300, 300)  # the last one always is
    progress(300, 300)  # ...once
    assert lines == ["SAE training: 7% (20 / 300 steps), estimating the time left",
                     "SAE training: 40% (120 / 300 steps), about 18 s left",
                     "SAE training: 100% (300 / 300 steps), done"]


def test_a_new_pass_of_the_stage_restarts_the_estimate():
    clock, lines = Clock(), []
    progress = StageProgress(lines.append, "embedding", every=0.0, clock=clock)
    progress(50, 100)
    clock.now += 5
    progress(100, 100)
    clock.now += 60
    progress(10, 100)  # a second pass starts: its rate is measured afresh
    clock.now += 1
    progress(20, 100)
    assert lines[-1] == "embedding: 20% (20 / 100), about 8 s left"


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 250, 3725)] == ["0 s", "59 s", "4 min 10 s", "1 h 02 min"]
