"""The stop signals (SIGTERM, SIGUSR1) of one training run, from before its run folder exists
to its last line; the Lightning side of the stop is PreemptionGuard in checkpointing.py.

Kept apart from Lightning so that a run can hold the signals, make its folder and say where it
is within seconds of the command, before Lightning is imported (2 s and more on a CPU machine).
Outside training (building, testing, exporting) a signal raises `Preempted` at once; while
training runs it is only noted, and PreemptionGuard stops the loops at the end of a step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from vittune.errors import STOP_SIGNALS, Preempted


class StopSignals:
    """What happened to the run's stop signals: which arrived, and in which phase."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase: str | None = "before training"  # None while training
        self.stopped_in: str | None = None  # the phase in which a signal raised Preempted
        self.noted = 0  # the signal noted while training, not yet agreed on

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def reinstall(self) -> None:
        """Take the signals back (from Lightning's own handler, set when training starts)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        if self.phase is not None:
            self.stopped_in = self.phase
            raise Preempted(signum, f"stopped by {signal.Signals(signum).name} {self.phase}")
        self.noted = self.noted or signum
