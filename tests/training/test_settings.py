"""Setting mistakes are one line with exit 2 before any run folder exists (or, for a
monitored metric the task never logs, with the empty folder removed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from ckpt_helpers import one_line_error
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe

from vittune.errors import RecipeError
from vittune.recipe.load import load_recipe
from vittune.training.settings import check_machine


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    make_class_images(tmp_path / "data", {"a": 4, "b": 4}, size=32)
    return write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.precision=banana", "trainer.precision 'banana' is not one of"),
        ("trainer.strategy=nonsense", "trainer.strategy 'nonsense' is not a Lightning strategy"),
        ("trainer.accelerator=gpux", "trainer.accelerator 'gpux' is not one of"),
        ("trainer.devices=0", "trainer.devices 0 must be at least 1"),
        ("trainer.devices=[]", "trainer.devices [] must be a non-empty list"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches 0 trains nothing"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches 1.5 must be a batch count"),
        ("data.eval_batch_size=-1", "data.eval_batch_size -1 must be at least 1"),
        ("data.eval_batch_size=0", "data.eval_batch_size 0 must be at least 1"),
    ],
)
def test_a_setting_mistake_is_refused_when_the_recipe_is_loaded(
    recipe_file: Path, override: str, named: str
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, [override], command="finetune")
    assert named in str(info.value) and "\n" not in str(info.value)


def test_valid_settings_pass(recipe_file: Path) -> None:
    for override in (
        "trainer.precision=bf16-mixed",
        "trainer.devices=[0, 1]",
        "trainer.devices=-1",
    ):
        load_recipe(recipe_file, [override, "trainer.strategy=ddp"], command="finetune")


def test_the_names_checked_without_lightning_are_lightnings_own() -> None:
    """The usual precision and strategy names pass without importing Lightning (start-up);
    they must be names Lightning accepts, and the rarer ones are still asked of Lightning."""
    from lightning.pytorch.strategies import StrategyRegistry  # noqa: PLC0415

    from vittune.recipe import trainer_settings  # noqa: PLC0415

    assert set(trainer_settings.COMMON_PRECISIONS) <= set(trainer_settings._precisions())
    strategies = {"auto", *StrategyRegistry.available_strategies()}
    assert set(trainer_settings.COMMON_STRATEGIES) <= strategies


def test_rarer_lightning_settings_pass_through_lightnings_lists(recipe_file: Path) -> None:
    load_recipe(
        recipe_file,
        [
            "trainer.precision=transformer-engine",
            "trainer.strategy=ddp_find_unused_parameters_true",
        ],
        command="finetune",
    )


def test_a_cache_dir_through_a_file_or_read_only_is_refused(
    recipe_file: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = load_recipe(
        recipe_file, ["data.cache=disk", f"data.cache_dir={blocker}/cache"], command="finetune"
    )
    with pytest.raises(RecipeError, match=f"{blocker} is a file, not a folder"):
        check_machine(recipe)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    bound = subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)])
    if bound.returncode != 0:  # not root: a mode without write permission does the same
        read_only.chmod(0o555)
    try:
        recipe = load_recipe(
            recipe_file, ["data.cache=disk", f"data.cache_dir={read_only}/c"], command="finetune"
        )
        with pytest.raises(RecipeError, match="is not writable"):
            check_machine(recipe)
    finally:
        if bound.returncode == 0:
            subprocess.run(["umount", str(read_only)], check=True)
        os.chmod(read_only, 0o755)


@pytest.mark.slow
def test_cli_setting_mistakes_leave_no_run_folder(recipe_file: Path, tmp_path: Path) -> None:
    cases = {"checkpoint.monitor=val/nonexistent": "val/nonexistent is never logged"}
    if not torch.cuda.is_available():
        cases["trainer.accelerator=gpu"] = "has no usable CUDA GPU"
    for override, named in cases.items():
        result = run_cli(
            "finetune", str(recipe_file), *tiny(override), cwd=tmp_path, env=ONE_THREAD
        )
        assert named in one_line_error(result)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
