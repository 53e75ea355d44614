"""files.py: atomic writes and staging folders clean up after dead writers, never after live
ones; a Ctrl-C waits for the renames that replace a set of files."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vittune.files import atomic_link, atomic_write, replace_files, signals_held, staging_folder


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


def test_atomic_link_replaces_the_name_and_keeps_the_old_content_for_its_readers(
    tmp_path: Path,
) -> None:
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    best.write_bytes(b"epoch 3")
    last.write_bytes(b"epoch 2")
    with last.open("rb") as reader:  # a reader of the old last.ckpt (a resume, an export)
        assert atomic_link(best, last)
        assert reader.read() == b"epoch 2"  # its file was replaced, not rewritten
    assert last.samefile(best) and last.read_bytes() == b"epoch 3"
    best.unlink()  # the next best is written under the same name: last.ckpt keeps its content
    assert last.read_bytes() == b"epoch 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp left


def test_atomic_link_refused_by_the_filesystem_changes_nothing(tmp_path: Path) -> None:
    # A hard link across filesystems is refused (EXDEV), as one on a mount without hard links
    # is (EPERM, ENOTSUP): the caller is told, and writes the file itself.
    here = os.stat(tmp_path).st_dev
    others = [
        Path(p)
        for p in ("/dev/shm", tempfile.gettempdir(), "/run", "/var/tmp")
        if os.path.isdir(p) and os.access(p, os.W_OK) and os.stat(p).st_dev != here
    ]
    if not others:
        pytest.skip("this machine has no second writable filesystem to link across")
    source = others[0] / f"vittune-link-{os.getpid()}.ckpt"
    source.write_bytes(b"new")
    try:
        last = tmp_path / "last.ckpt"
        last.write_bytes(b"old")
        assert atomic_link(source, last) is False
        assert last.read_bytes() == b"old" and not last.samefile(source)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    finally:
        source.unlink()


def test_a_staging_folder_goes_whatever_happens_and_a_dead_ones_leftover_too(
    tmp_path: Path,
) -> None:
    """Files made in a staging folder replace the old ones only when moved; an error leaves
    the old file as it was, and a killed process's staging folder is cleared by the next."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left = tmp_path / f".model.onnx.{dead.stdout.strip()}.abc123.staging"  # killed mid-export
    left.mkdir()
    (left / "model.onnx").write_bytes(b"half")
    with pytest.raises(ZeroDivisionError), staging_folder(target) as staging:
        assert not left.exists()
        (staging / "model.onnx").write_bytes(b"new")
        1 / 0  # noqa: B018 (a failure before the move)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert target.read_bytes() == b"old"
    with staging_folder(target) as staging:
        (staging / "model.onnx").write_bytes(b"new")
        replace_files([(staging / "model.onnx", target)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert target.read_bytes() == b"new"


def test_ctrl_c_inside_signals_held_acts_when_the_block_ends() -> None:
    """A real SIGINT arriving between two renames waits for the second, then interrupts."""
    # Python's own Ctrl-C handler, as a fresh vittune process has it. This test process may
    # have run other tests first, and a library may have left its own handler (litdata's
    # optimize did, before prepare-data restored it: this test failed once on it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), signals_held():
            signal.raise_signal(signal.SIGINT)  # without signals_held: KeyboardInterrupt here
            done.append("the rest of the block")
        assert done == ["the rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
