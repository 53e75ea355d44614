"""Stop signals before a run's own handling is in place: one line and 128 + signum.

Importing torch, timm and Lightning takes seconds (13 s measured on a busy machine), and a
SIGTERM or SIGUSR1 in that time ended the process silently, with the shell's -15 instead of
the 143 / 138 that a requeue script tests for. Nothing has been written yet then (the run's
PreemptionGuard takes over before the run folder is made), so the process ends at once.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from vittune.errors import STOP_SIGNALS


def _stop_now(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"vittune: stopped by {name} (outside training: nothing to save)\n".encode())
    os._exit(128 + signum)


def install() -> None:
    """Handle the stop signals from the first line of the CLI on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_now)
