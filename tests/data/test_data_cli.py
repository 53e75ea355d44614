"""Runs you can trust, end to end through the `vittune` console script: the same recipe and seed
give the same metrics, and corrupt files are summarised once at the end of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, read_metrics, tiny, write_recipe


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_same_recipe_and_seed_give_byte_identical_metrics_with_two_workers(
    tmp_path: Path,
) -> None:
    make_class_images(tmp_path / "data", {"a": 12, "b": 12, "c": 12}, size=32)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        {
            # strong: random crops, flips, two of eight random operations, random erasing
            "augment": {"preset": "strong"},
            "data": {"root": str(tmp_path / "data"), "batch_size": 8},
            "trainer": {"max_epochs": 2, "seed": 3, "log_every_n_steps": 1},
            "logging": {"name": "same"},
        },
    )
    overrides = tiny("data.num_workers=2")  # persistent workers, augmenting in parallel
    for _ in range(2):
        ok(run_cli("finetune", str(recipe), *overrides, cwd=tmp_path, env=ONE_THREAD))
    first, second = (
        tmp_path / "runs" / name / "csv" / "metrics.csv" for name in ("same", "same-2")
    )
    # Every column is compared, none dropped: the CSV logger writes no wall-clock column.
    assert first.read_bytes() == second.read_bytes()
    rows = read_metrics(tmp_path / "runs" / "same")
    assert [r["epoch"] for r in rows if r.get("val/loss")] == ["0", "1"]
    assert len({r["train/loss_step"] for r in rows if r.get("train/loss_step")}) == 8  # 2 x 4


@pytest.mark.slow
def test_corrupt_files_are_summarised_once_and_listed_in_the_run_folder(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"a": 8, "b": 8}, size=32, dtype=np.uint16)
    unreadable = data / "a" / "notes.png"
    unreadable.write_text("not an image")
    cut = data / "b" / "0003.png"
    cut.write_bytes(cut.read_bytes()[:-40])  # header intact, pixel data cut short
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        {
            "data": {"root": str(data), "batch_size": 4, "val_fraction": 0.25},
            "trainer": {"max_epochs": 2},
            "logging": {"name": "bad"},
        },
    )
    stdout = ok(run_cli("finetune", str(recipe), *tiny("data.num_workers=2"), cwd=tmp_path))
    # 16 readable images (the text file is in no split), stratified 6 + 2 per class
    assert "images per split {'train': 12, 'val': 4}" in stdout
    summary = [line for line in stdout.splitlines() if "corrupt files:" in line]
    assert len(summary) == 1, stdout
    listing = tmp_path / "runs" / "bad" / "corrupt_files.txt"
    assert summary[0].strip() == (
        "corrupt files: 2 left out (1 unreadable at setup, not in any split; 1 failed to "
        f"decode, dropped from their batches): {unreadable}, {cut}; all listed in "
        "runs/bad/corrupt_files.txt"
    )
    assert [line.split("\t")[0] for line in listing.read_text().splitlines()] == [
        str(unreadable),
        str(cut),
    ]
    strict = run_cli(
        "finetune", str(recipe), *tiny("data.on_corrupt=error", "logging.name=strict"), cwd=tmp_path
    )
    assert strict.returncode == 2, strict.stdout + strict.stderr
    assert strict.stderr.strip() == (
        f"vittune: error: cannot decode image {unreadable}: the file is corrupt or not an image; "
        "replace or remove it (data.on_corrupt: error)"
    )
    assert not (tmp_path / "runs" / "strict").exists()
