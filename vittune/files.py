"""Writing files so that a crash, a full disk or a second process never leaves a half-made one.

Every layer that writes into a run folder (checkpoints, exports, evaluation reports) uses
these primitives: `atomic_write` (the old file or the new one, never a torn one),
`staging_folder` and `replace_files` (several files made and checked apart, then moved over the
old ones together) and `claim_fresh_folder` (a new folder, never one that exists).

A full disk (or a quota, or a file-size limit) is said in one line: which file, how much space
is free there, and about how much the write needed. torch.save on a full disk fails inside its
zip writer with `RuntimeError: [enforce fail at inline_container.cc] unexpected pos 64 vs 0`
(141 lines of traceback; "No space left" appeared nowhere), Lightning's CSV writer with a bare
OSError. Writes go through atomic temp files, so the file being replaced is still whole.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vittune.errors import STOP_SIGNALS, RecipeError, StorageError

RUN_DIR_FIX = "point logging.run_dir at a writable folder"


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot name one folder inside another (None when it can): a run or
    evaluation name with a separator or `..` would put its files outside the folder meant
    for them (`logging.name=../../etc/x`)."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name in (".", ".."):
        return "is not a folder name"
    return None


def check_folder_name(name: str, option: str) -> str:
    """`name`, or a one-line user error naming `option`."""
    if problem := folder_name_problem(name):
        raise RecipeError(f"{option} {name!r} {problem}; give a plain folder name such as run-1")
    return name


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


def atomic_write(
    path: Path, write: Callable[[Path], object], mode: int = 0o644, size: int = 0
) -> None:
    """Write `path` so that readers (and a crash at any moment) see the old file or the new one.

    The temporary file lives in the destination folder, so `os.replace` is a rename within
    one filesystem (a temp file in $TMPDIR is copied across filesystems instead, and a kill
    during the copy truncates the destination). fsync before the rename makes the content
    durable before the name points at it; fsync of the folder makes the rename durable.
    `size`, when the caller knows it, is what a refused write is said to need (safetensors
    writes nothing before it fails, so the temp file cannot tell).
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        if not _writer_alive(stale):  # another live process may be writing the same file
            stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        _fsync(temp)
        os.chmod(temp, mode)  # mkstemp makes 0600 files; exports are meant to be shared
        os.replace(temp, path)
    except BaseException as err:
        needed = max(size, needed_for(path, temp))
        temp.unlink(missing_ok=True)
        if is_write_failure(err):  # a full disk: one line naming the file and the space
            raise storage_error(path, needed, err) from None
        raise
    _fsync(folder)


def atomic_link(source: Path, path: Path) -> bool:
    """Make `path` a hard link to `source`, atomically (readers see the old file or the new).

    For two names of one content, such as a `last.ckpt` that holds the same state as the best
    checkpoint written a moment before: no second serialisation, write or fsync of the data.
    False, with nothing changed, where the filesystem has no hard links (some network and
    FUSE mounts); the caller then writes the file. The temp name is atomic_write's, so a kill
    between link and rename leaves a leftover that the next write of `path` removes.
    """
    temp = path.parent / f"{_temp_prefix(path)}{secrets.token_hex(4)}.tmp"
    try:
        os.link(source, temp)
    except OSError:
        return False
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return True


@contextmanager
def staging_folder(path: Path) -> Iterator[Path]:
    """A new hidden folder beside `path` to make its replacement in; removed when the block ends.

    Files are made there under their final names (an ONNX file names its external `.data` file
    inside itself), checked, and moved over the old ones with `replace_files`; a failure or a
    Ctrl-C before that leaves the old files as they were. Beside `path`, so each move is a
    rename within one filesystem. Leftovers of killed processes are removed, not live ones'.
    """
    folder = path.parent
    for stale in folder.glob(f".{path.name}.*.staging"):
        if not _writer_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=_temp_prefix(path), suffix=".staging"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_files(moves: list[tuple[Path, Path]]) -> None:
    """Rename each made file over its destination, in order (each name: old file or new one).

    fsync each file before its rename and each folder after, as `atomic_write` does. Call it
    inside `signals_held`, so that a Ctrl-C cannot stop it with half of the files moved.
    """
    for made, destination in moves:
        _fsync(made)
        os.chmod(made, 0o644)
        os.replace(made, destination)
    for folder in {destination.parent for _, destination in moves}:
        _fsync(folder)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and the stop signals wait for the block to end, then act as they would.

    For the few renames and writes that replace one set of files with another: stopped
    halfway, a folder would hold half of each. Python runs signal handlers in the main thread
    only, so elsewhere the block cannot be interrupted by one and nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    signums = (signal.SIGINT, *STOP_SIGNALS)
    try:
        with handlers_restored(signums):
            for signum in signums:
                signal.signal(signum, lambda number, frame: arrived.append(number))
            yield
    finally:
        if arrived:
            signal.raise_signal(arrived[0])


@contextmanager
def handlers_restored(signums: Iterable[int]) -> Iterator[None]:
    """The handlers of `signums` as they were before the block, whatever it installed (a
    library may install its own and leave it: litdata's optimize does for SIGINT). Only the
    main thread can change handlers; elsewhere nothing is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _temp_prefix(path: Path) -> str:
    """`.<name>.<pid>.`: a temp file's name before its random part and `.tmp`; the pid lets
    a later write tell a dead writer's leftover from a live writer's file (`_writer_alive`)."""
    return f".{path.name}.{os.getpid()}."


def _writer_alive(temp: Path) -> bool:
    """Whether the process that named this temp file (`.<name>.<pid>.<random>.tmp`, or a
    `.staging` folder) still runs on this machine. Two processes writing one file (two sweep
    workers' reports) must not delete each other's temp file mid-write; one killed mid-write
    leaves a dead pid."""
    pid = temp.name.split(".")[-3]
    if not pid.isdigit():  # an older temp name without a pid: a leftover
        return False
    return pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (signal 0 probes, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# torch's zip writer reports a failed write as a RuntimeError with one of these
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a write that the storage refused."""
    if any(number in NO_SPACE for number in _errnos(err)):
        return True
    return any(
        isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_FAILURES)
        for e in _chain(err)
    )


# Rust's io::Error as libraries written in Rust report it (safetensors' SafetensorError: "I/O
# error: No space left on device (os error 28)"): the errno is only in the message.
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then the error that caused it, and so on."""
    seen: BaseException | None = err
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _errnos(err: BaseException) -> Iterator[int]:
    """The errno of `err` and of each error that caused it, from OSError or a Rust message."""
    for seen in _chain(err):
        if isinstance(seen, OSError) and seen.errno is not None:
            yield seen.errno
        elif match := RUST_OS_ERROR.search(str(seen)):
            yield int(match[1])


@contextmanager
def storage_errors(path: Path, needed: int) -> Iterator[None]:
    """A write that the storage refuses inside the block (a full disk, a file-size limit)
    leaves it as the one-line StorageError for `path` (about `needed` bytes); other errors
    pass through unchanged."""
    try:
        yield
    except Exception as err:
        if is_write_failure(err):
            raise storage_error(path, needed, err) from None
        raise


def storage_error(path: Path, needed: int, err: BaseException) -> StorageError:
    """The one-line error for a refused write of about `needed` bytes to `path`."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    limit = free > 2 * needed + 10_000_000 or _efbig(err)  # room left, yet refused
    why = (
        "the write was refused with space free (a quota or a file-size limit, ulimit -f)"
        if limit
        else "no space left on device"
    )
    kept = " (the previous file is kept, whole)" if path.exists() else ""
    return StorageError(
        f"cannot write {path}: {why}; {_megabytes(free)} free there, about"
        f" {_megabytes(needed)} needed{kept}; free some space or point logging.run_dir"
        " at a larger disk"
    )


def _efbig(err: BaseException) -> bool:
    return errno.EFBIG in _errnos(err)


def needed_for(path: Path, temp: Path | None) -> int:
    """About how many bytes a write of `path` needs: what it got to, or the file it replaces."""
    sizes = [0]
    for candidate in (temp, path):
        try:
            if candidate is not None:
                sizes.append(candidate.stat().st_size)
        except OSError:
            pass
    return max(sizes)
