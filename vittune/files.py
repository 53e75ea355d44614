"""Writing files so that a crash or a second process never leaves a half-made one.

Every layer that writes into a run folder (checkpoints, exports, evaluation reports) uses
these two primitives: `atomic_write` (the old file or the new one, never a torn one) and
`claim_fresh_folder` (a new folder, never one that exists).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from vittune.errors import RecipeError

RUN_DIR_FIX = "point logging.run_dir at a writable folder"


def make_folder(path: Path, kind: str = "run folder", fix: str = RUN_DIR_FIX) -> bool:
    """mkdir that reports whether it made the folder; a user error when it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise RecipeError(f"cannot create {kind} {path}: {err.strerror}; {fix}") from None


def claim_fresh_folder(
    base: Path, name: str, kind: str = "run folder", fix: str = RUN_DIR_FIX
) -> Path:
    """`base/name`, else `name-2`, `name-3`...: never an existing folder. `mkdir` without
    `exist_ok` claims a name atomically, so two processes at once get different folders."""
    candidate, suffix = base / name, 1
    while not make_folder(candidate, kind, fix):
        suffix += 1
        candidate = base / f"{name}-{suffix}"
    return candidate


def atomic_write(path: Path, write: Callable[[Path], object], mode: int = 0o644) -> None:
    """Write `path` so that readers (and a crash at any moment) see the old file or the new one.

    The temporary file lives in the destination folder, so `os.replace` is a rename within
    one filesystem (a temp file in $TMPDIR is copied across filesystems instead, and a kill
    during the copy truncates the destination). fsync before the rename makes the content
    durable before the name points at it; fsync of the folder makes the rename durable.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        _fsync(temp)
        os.chmod(temp, mode)  # mkstemp makes 0600 files; exports are meant to be shared
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(folder)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
