"""One writer per run folder: a lock file that names its holder.

Two runs with `trainer.resume_from: auto` and the same `logging.name` would otherwise train
into one folder at once, each deleting the other's in-flight checkpoint temp files. The lock
is a file made with O_CREAT | O_EXCL (atomic, also on NFS v3+) holding the PID and the host
name; it is removed when the run ends in any way Python sees (return, error, stop signal).
A lock left by a process killed with SIGKILL is stale: on the same host its PID no longer
runs (`os.kill(pid, 0)`), and it is taken over. A lock from another host cannot be checked
from here and is reported with the way to remove it.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from vittune.errors import RecipeError
from vittune.files import pid_alive

LOCK_NAME = ".vittune.lock"


def _holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it is unreadable or half-written."""
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def acquire(folder: Path) -> Path:
    """Take the run folder's lock, or raise a one-line RecipeError naming its holder."""
    lock = folder / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(10):  # a stale lock is removed and the claim tried again
        try:
            handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:  # being written right now, or garbage: look again
                if _stale_garbage(lock):
                    lock.unlink(missing_ok=True)
                time.sleep(0.2)
                continue
            pid, host = holder
            if host == socket.gethostname() and not pid_alive(pid):
                lock.unlink(missing_ok=True)  # its writer died (kill -9, power loss)
                continue
            where = "" if host == socket.gethostname() else f" on {host}"
            raise RecipeError(
                f"run folder {folder} is in use by another vittune run (PID {pid}{where});"
                f" wait for it to end, or give this run another logging.name"
                + ("" if not where else f" (if that run is gone, delete {lock})")
            ) from None
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise RecipeError(
                    f"run folder {folder} is not writable ({err.strerror});"
                    " point logging.run_dir at a writable folder"
                ) from None
            raise
        with os.fdopen(handle, "w") as out:
            out.write(me)
        return lock
    raise RecipeError(f"cannot lock run folder {folder}: {lock} keeps changing; try again")


def _stale_garbage(lock: Path, seconds: float = 10.0) -> bool:
    """A lock file without a readable holder that is older than a writer needs to fill it."""
    try:
        return time.time() - lock.stat().st_mtime > seconds
    except OSError:
        return False


def release(lock: Path | None) -> None:
    """Remove this process's lock (only if it is still this process's)."""
    if lock is None:
        return
    holder = _holder(lock)
    if holder is not None and holder[0] == os.getpid():
        lock.unlink(missing_ok=True)
