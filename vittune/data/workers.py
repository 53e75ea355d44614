"""What every DataLoader worker process does first: leave the stop signals to the main process.

A cluster scheduler signals a whole process group (SLURM `--signal=SIGUSR1@90` reaches every
process of the job step, Kubernetes and `kill -- -PGID` the same), so DataLoader workers get
SIGTERM / SIGUSR1 together with the training process. A forked worker inherits the main
process's Python handlers (Lightning's, vittune's); acting on the signal there ends the worker,
and torch's worker-failure handler then raises in the main process in the middle of its stop
checkpoint. Workers therefore ignore the stop signals: the main process stops at a step
boundary, saves, and shuts its workers down itself (a worker whose parent died exits on its
own: torch's watchdog checks the parent).
"""

from __future__ import annotations

import signal
from typing import Any

from vittune.errors import STOP_SIGNALS


def ignore_stop_signals(worker_id: int = 0, *_: Any) -> None:
    """DataLoader `worker_init_fn` (also called by other worker init functions)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
