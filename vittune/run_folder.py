"""Run folders: created without races or overwrites, written atomically, cleaned up on errors.

A run folder is `<logging.run_dir>/<logging.name>/`. Lightning's DDP launcher starts the
other ranks by running the same `vittune ...` command again; they find the folder of rank 0
through `VITTUNE_RUN_DIR`. That variable is honoured only in such a child (Lightning sets
LOCAL_RANK, and the parent recorded its pid next to the folder), so a value inherited from a
shell, a notebook or a test harness never sends a new run into an existing folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vittune.errors import RecipeError, VittuneError
from vittune.safeguards.disk_space import is_write_failure, needed_for, storage_error

RUN_DIR_ENV = "VITTUNE_RUN_DIR"  # the folder, for the DDP children Lightning launches
RUN_DIR_PARENT_ENV = "VITTUNE_RUN_DIR_PARENT"  # pid of the process that made the folder
WANDB_ID_FILE = "wandb_id"


@dataclass
class RunFolder:
    path: Path
    created: bool  # made by this process: removed again when an error comes before training
    owner: bool  # rank 0 of the run: writes recipe.yaml and copies files into the folder


def launched_rank() -> int:
    """This process's global rank when an external launcher (torchrun, SLURM, MPI) started it."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "NODE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def inherited_run_dir() -> Path | None:
    """The folder of the parent process when this is a DDP child that Lightning launched."""
    folder = os.environ.get(RUN_DIR_ENV)
    parent = os.environ.get(RUN_DIR_PARENT_ENV)
    if folder and "LOCAL_RANK" in os.environ and parent == str(os.getppid()):
        return Path(folder)
    return None


RUN_DIR_FIX = "point logging.run_dir at a writable folder"


def _make_folder(path: Path, kind: str = "run folder", fix: str = RUN_DIR_FIX) -> bool:
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
    while not _make_folder(candidate, kind, fix):
        suffix += 1
        candidate = base / f"{name}-{suffix}"
    return candidate


def prepare_run_dir(recipe_name: str | None, run_dir: str, stem: str, reuse: bool) -> RunFolder:
    """A run folder: shared with DDP children, reused for `resume_from: auto`, else fresh.

    A fresh folder is never an existing one: `mkdir` without `exist_ok` claims a name
    atomically, so two runs starting at once get `<name>` and `<name>-2`.
    """
    inherited = inherited_run_dir()
    if inherited is not None:
        return RunFolder(inherited, created=False, owner=False)
    name = recipe_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(run_dir)
    if launched_rank() > 0:  # torchrun / SLURM / other nodes: only rank 0 creates the folder
        return RunFolder(base / name, created=False, owner=False)
    if reuse:  # `trainer.resume_from: auto` continues in the folder the name gives
        folder = RunFolder(base / name, created=_make_folder(base / name), owner=True)
    else:
        folder = RunFolder(claim_fresh_folder(base, name), created=True, owner=True)
    _check_writable(folder)
    os.environ[RUN_DIR_ENV] = str(folder.path)
    os.environ[RUN_DIR_PARENT_ENV] = str(os.getpid())
    return folder


def _check_writable(folder: RunFolder) -> None:
    # An existing folder (resume) may be read-only although mkdir was never needed.
    if not os.access(folder.path, os.W_OK | os.X_OK):
        raise RecipeError(
            f"run folder {folder.path} is not writable; point logging.run_dir at a writable folder"
        )


def release_run_dir(folder: RunFolder) -> None:
    """Forget the folder, so that a later fit() in this process (a notebook) gets its own."""
    if os.environ.get(RUN_DIR_ENV) == str(folder.path):
        os.environ.pop(RUN_DIR_ENV, None)
        os.environ.pop(RUN_DIR_PARENT_ENV, None)


@contextmanager
def removed_on_user_error(folder: RunFolder, trained: Callable[[], str | None]) -> Iterator[None]:
    """On a user error, remove a folder this process made if nothing was trained into it;
    otherwise keep it and name it (and what it holds) in the one-line message.

    `trained()` describes what the folder holds (e.g. "checkpoints/last.ckpt at step 12"),
    or returns None when nothing was trained.
    """
    try:
        yield
    except VittuneError as err:
        held = trained()
        if held is None and folder.created:
            shutil.rmtree(folder.path, ignore_errors=True)
            raise
        where = f"{folder.path} kept: it holds {held}" if held else f"{folder.path} kept"
        raise type(err)(f"{str(err).rstrip()} (run folder {where})") from None


def wandb_run_id(folder: RunFolder) -> str | None:
    """The W&B run id of this run folder, so that a resumed run logs into the same W&B run
    (`WandbLogger(id=..., resume="allow")`). Rank 0 makes it on first use; other ranks only
    read it (they do not log to W&B, and two writers could leave the file naming another id)."""
    path = folder.path / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not folder.owner:
        return None
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write(path, lambda temp: temp.write_text(run_id + "\n"))
    return run_id


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
    except BaseException as err:
        needed = needed_for(path, temp)
        temp.unlink(missing_ok=True)
        if is_write_failure(err):  # a full disk: one line naming the file and the space
            raise storage_error(path, needed, err) from None
        raise
    _fsync(folder)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
