"""Edges of the stop handling: a signal while the CLI is still importing its libraries, and
`checkpoint.save_top_k: 0` (no best checkpoint) saying that the last weights were exported."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from ckpt_helpers import load, start_cli, stderr_of
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe
from safetensors.torch import load_file


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    make_class_images(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    return write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})


def test_a_signal_during_the_imports_is_one_line_and_128_plus_signum(
    tmp_path: Path, recipe: Path
) -> None:
    run = start_cli("finetune", str(recipe), *tiny(), cwd=tmp_path, log=tmp_path / "early")
    time.sleep(1.5)  # the console script is running, torch/timm/Lightning are being imported
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143, stderr_of(tmp_path / "early")[-2000:]
    lines = [line for line in stderr_of(tmp_path / "early").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vittune: stopped by SIGTERM"), lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_save_top_k_0_exports_the_last_weights_and_says_so(tmp_path: Path, recipe: Path) -> None:
    result = run_cli(
        "finetune",
        str(recipe),
        *tiny("trainer.max_epochs=2", "checkpoint.save_top_k=0", "logging.name=k0"),
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done. exported the last weights (no best kept)" in result.stdout
    assert "best val/acc1" not in result.stdout
    run_dir = tmp_path / "runs" / "k0"
    assert not list((run_dir / "checkpoints").glob("best*"))
    exported = load_file(str(run_dir / "model.safetensors"))
    last = load(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    name = next(iter(exported))
    assert torch.equal(exported[name], last[f"model.{name}"])  # the export is the last state
