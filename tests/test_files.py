"""files.py: atomic writes clean up after dead writers, never after live ones."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

from vittune.files import atomic_write


def _write_many(path: str, tag: str, count: int) -> None:
    for k in range(count):
        atomic_write(Path(path), lambda temp, k=k: temp.write_text(f"{tag} {k}\n" * 2000))


def test_two_processes_writing_one_file_never_remove_each_others_temp(tmp_path: Path) -> None:
    """Two sweep workers write the same report file; before, each write's stale-temp cleanup
    deleted the other's temp file mid-write (FileNotFoundError at its fsync)."""
    target = tmp_path / "report.png"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(target), t, 150)) for t in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and lines.pop().split()[0] in "ab"  # one whole write, not a mix
    assert list(tmp_path.glob(".report.png.*.tmp")) == []


def test_a_dead_writers_temp_is_removed_and_a_live_writers_kept(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left = tmp_path / f".last.ckpt.{dead.stdout.strip()}.abc123.tmp"  # killed mid-write
    old_style = tmp_path / ".last.ckpt.abc123.tmp"  # a temp name without a pid
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as live:
        writing = tmp_path / f".last.ckpt.{live.pid}.xyz789.tmp"
        for temp in (left, old_style, writing):
            temp.write_text("partial")
        atomic_write(target, lambda temp: temp.write_text("new"))
        assert target.read_text() == "new"
        assert not left.exists() and not old_style.exists()
        assert writing.exists()  # its writer still runs
        live.kill()
