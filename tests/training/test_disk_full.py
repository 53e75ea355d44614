"""A full disk and a file-size limit, caused for real (a small tmpfs mounted for the test; a
child process under RLIMIT_FSIZE with SIGXFSZ ignored): one line naming the file, the free
space and the space needed; the previous checkpoint is whole and loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import load
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, read_metrics, tiny, write_recipe

WRITE_UNDER_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from vittune.errors import StorageError
from vittune.training.run_folder import atomic_write
path = Path(sys.argv[1])
atomic_write(path, lambda t: torch.save({"w": torch.zeros(1000)}, t))  # 4 kB: fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    atomic_write(path, lambda t: torch.save({"w": torch.zeros(1_000_000)}, t))  # 4 MB
except StorageError as err:
    print(err)
"""


def test_a_file_size_limit_is_one_line_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    result = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_LIMIT, str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith(f"cannot write {path}: the write was refused with space free"), line
    assert "(a quota or a file-size limit, ulimit -f);" in line
    assert "MB free there, about 0.1 MB needed (the previous file is kept, whole);" in line
    assert torch.load(path, weights_only=True)["w"].shape == (1000,)  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs: room for two tiny-model checkpoints (1.4 MB each), not a third."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the file-size-limit test still runs)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    make_class_images(tmp_path / "data", {"a": 10, "b": 10}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    result = run_cli(
        "finetune",
        str(recipe),
        *tiny("trainer.max_epochs=4", "trainer.log_every_n_steps=1"),
        f"logging.run_dir={small_disk}",
        "logging.name=x",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vittune:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    run_dir = small_disk / "x"
    assert errors[0].startswith(f"vittune: error: cannot write {run_dir}/")
    assert (
        "no space left on device;" in errors[0]
        and "MB free there, about 1.4 MB needed" in errors[0]
    )
    assert f"run folder {run_dir} kept: it holds checkpoints/" in errors[0]
    last = load(run_dir / "checkpoints" / "last.ckpt")  # whole, loadable
    assert last["global_step"] >= 1
    assert max(int(r["step"]) for r in read_metrics(run_dir)) + 1 >= last["global_step"]
    assert not list(run_dir.rglob("*.tmp"))
