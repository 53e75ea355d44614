"""The per-command recipe checker: every recipe-only rule fails at load time, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_recipe

from vittune.errors import RecipeError
from vittune.recipe.checks import CHECKS
from vittune.recipe.load import load_recipe

BASE = {"data": {"builtin": "digits"}, "model": {"img_size": 32, "patch_size": 8}}
TEACHER = "distill.teacher={name: resnet18, pretrained: teacher.safetensors}"


def load_error(tmp_path: Path, command: str, *overrides: str) -> str:
    recipe = write_recipe(tmp_path / "r.yaml", BASE)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, list(overrides), command=command)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("command", "overrides", "expected"),
    [
        ("finetune", ["optim.name=adamm"], "unknown optim.name 'adamm'; did you mean 'adam"),
        ("pretrain-mae", ["optim.name=lamd"], "unknown optim.name 'lamd'"),
        ("finetune", ["model.name=vit_tiny_patch16_24"], "did you mean 'vit_tiny_patch16_224'"),
        ("finetune", ["augment.mixup_alpha=0.8", "data.batch_size=7"], "even data.batch_size"),
        ("distill", [TEACHER, "augment.cutmix_alpha=1", "data.batch_size=3"], "even data.batch"),
        ("finetune", ["freeze.unfreeze_schedule={-1: 2}"], "must map an epoch >= 0"),
        ("pretrain-mae", ["optim.layer_decay=0.65"], "optim.layer_decay is for fine-tuning"),
        ("pretrain-mae", ["mae.decoder_dim=100", "mae.decoder_heads=16"], "not divisible by mae"),
        ("distill", [], "needs a `distill:` section"),
        ("distill", ["distill.teacher={name: resnet18, pretrained: false}"], "random teacher"),
        ("distill", ["distill.teacher={name: resnet1, pretrained: true}"], "distill.teacher.name"),
        ("distill", [TEACHER, "loss.class_weights=balanced"], "not supported by vittune distill"),
        ("distill", [TEACHER, "task=finetune"], "this recipe is for `vittune finetune`"),
        ("finetune", ["peft.method=lora", "freeze.linear_probe=true"], "remove freeze.linear"),
        ("distill", [TEACHER, "peft.method=ssf", "freeze.frozen_blocks=2"], "peft.method: ssf"),
        ("finetune", ["peft.method=ia3", "peft.targets=[]"], "peft.targets is empty"),
        ("finetune", ["peft.method=lora", "peft.targets=[attn.qkv, attn.qkv]"], "twice"),
        ("finetune", ["peft.rnak=4"], "did you mean `peft.rank`"),
        ("finetune", ["ema.decai=0.9"], "did you mean `ema.decay`"),
        ("pretrain-mae", ["peft.method=lora"], "MAE pretraining trains it whole"),
        ("pretrain-mae", ["ema.decay=0.99"], "remove the ema: section"),
    ],
)
def test_recipe_only_rules_fail_at_load_time(
    tmp_path: Path, command: str, overrides: list[str], expected: str
) -> None:
    assert expected in load_error(tmp_path, command, *overrides)


def test_every_command_has_a_checker_and_a_valid_recipe_passes(tmp_path: Path) -> None:
    assert set(CHECKS) == {"finetune", "pretrain-mae", "distill"}
    recipe = write_recipe(tmp_path / "r.yaml", BASE)
    for command, extra in [("finetune", []), ("pretrain-mae", []), ("distill", [TEACHER])]:
        load_recipe(recipe, extra, command=command)  # no error


def test_a_misspelt_optimiser_fails_before_a_run_folder_exists(tmp_path: Path) -> None:
    from conftest import run_cli

    recipe = write_recipe(tmp_path / "r.yaml", BASE)
    result = run_cli("finetune", str(recipe), "optim.name=adamm", cwd=tmp_path)
    assert result.returncode == 2 and "unknown optim.name 'adamm'" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
