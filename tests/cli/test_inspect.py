"""`vittune inspect` builds through the training assembly: every bundled recipe, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from helpers import RECIPES, ROOT

from vittune.inference.inspect import inspect_recipe
from vittune.recipe.load import load_recipe


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_recipe_is_inspected_offline_without_naming_a_command(
    path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # relative data and weight paths do not exist here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    recipe = load_recipe(path, command=None)
    task = yaml.safe_load(path.read_text()).get("task") or "finetune"
    report = inspect_recipe(recipe, recipe.task or "finetune")
    assert f"command      vittune {task}" in report
    assert "GFLOPs per image" in report and "trainable of" in report
    if task == "pretrain-mae":
        assert "mae decoder" in report and "the encoder sees" in report
    if task == "distill":
        assert "teacher" in report  # described, or named as not loadable here


def test_inspect_mae_recipe_through_the_cli_reads_its_task(tmp_path: Path) -> None:
    result = run_cli("inspect", str(ROOT / "recipes" / "mae_digits_pretrain.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "command      vittune pretrain-mae" in result.stdout
    assert "masking      ratio 0.75: the encoder sees 4 of 16 patches" in result.stdout
