"""Two-process DDP on CPU through the real console script (Lightning re-launches it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_class_images, run_cli
from helpers import column, held_out, read_metrics, tiny, write_recipe


@pytest.mark.slow
def test_two_process_ddp_on_cpu_completes_a_fit(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 20, "b": 20}, size=32)
    recipe = write_recipe(
        tmp_path / "ddp.yaml",
        {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2, "batch_size": 4}},
    )
    overrides = tiny(
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "logging.name=ddp",
    )
    result = run_cli("finetune", str(recipe), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # the second process really ran
    assert output.count("vittune finetune: done.") == 1  # rank 0 alone reports and exports
    # Both processes used one run folder (shared through VITTUNE_RUN_DIR): no ddp-2 appeared.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    run_dir = tmp_path / "runs" / "ddp"
    for name in (
        "recipe.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["classes"] == ["a", "b"]
    # Each rank saw half the training images: 16 of 32 in batches of 4 -> 4 steps per epoch.
    train_images = 2 * (20 - held_out(20, 0.2))
    steps_per_epoch = train_images // 2 // 4
    rows = read_metrics(run_dir)
    assert max(column(rows, "step")) + 1 == 2 * steps_per_epoch
    assert len(column(rows, "val/acc1")) == 2
