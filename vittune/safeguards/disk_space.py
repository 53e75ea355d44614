"""A full disk (or a quota, or a file-size limit) said in one line: which file, how much
space is free there, and about how much the write needed.

torch.save on a full disk fails inside its zip writer with `RuntimeError: [enforce fail at
inline_container.cc] unexpected pos 64 vs 0` (141 lines of traceback; "No space left"
appeared nowhere), Lightning's CSV writer with a bare OSError. Writes go through atomic
temp files, so the file that was being replaced is still whole: nothing is lost, and the
message says so.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from vittune.errors import StorageError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# torch's zip writer reports a failed write as a RuntimeError with one of these
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a write that the storage refused."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        if isinstance(seen, RuntimeError) and any(m in str(seen) for m in TORCH_WRITE_FAILURES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    chain = (err, err.__cause__, err.__context__)
    return any(isinstance(e, OSError) and e.errno == errno.EFBIG for e in chain)


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
