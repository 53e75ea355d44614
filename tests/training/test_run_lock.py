"""The run-folder lock at function level: held, refused with the holder's PID, stale after
the holder died, reported (not taken) when it comes from another host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vittune.errors import RecipeError
from vittune.training.run_lock import LOCK_NAME, acquire, release


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_holder_is_named_and_the_lock_is_released_after(tmp_path: Path) -> None:
    other = live_process()
    try:
        (tmp_path / LOCK_NAME).write_text(f"{other.pid} {socket.gethostname()}\n")
        with pytest.raises(
            RecipeError, match=rf"in use by another vittune run \(PID {other.pid}\)"
        ):
            acquire(tmp_path)
    finally:
        other.kill()
        other.wait()
    lock = acquire(tmp_path)  # the holder is dead now: its lock is stale
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(RecipeError, match=f"PID {os.getpid()}"):
        acquire(tmp_path)  # a second claim, even from this process, is refused
    release(lock)
    assert not lock.exists()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    assert acquire(tmp_path).read_text().split()[0] == str(os.getpid())


def test_a_lock_from_another_host_is_reported_with_the_way_out(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()} some-other-node\n")
    with pytest.raises(RecipeError, match="on some-other-node.*delete .*vittune.lock"):
        acquire(tmp_path)


def test_release_leaves_another_process_lock_alone(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_text(f"{os.getpid() + 1} {socket.gethostname()}\n")
    release(lock)
    assert lock.exists()
