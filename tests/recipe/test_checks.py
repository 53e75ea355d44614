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
SPACE_LR = "optim.lr: {loguniform: [1.0e-4, 3.0e-3]}"
LRR = "sweep.space: unknown recipe key `optim.lrr`; did you mean `optim.lr`?"


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
        # sweep.space: every key a recipe key, every end of a range a value the recipe accepts
        ("finetune", [f"sweep.space={{{SPACE_LR}, optim.lrr: {{uniform: [0, 1]}}}}"], LRR),
        ("finetune", ["sweep.space={optim.layer_decay: {uniform: [0.5, 1.5]}}"], "value 1.5 is"),
        (
            "finetune",
            ["sweep.space={augment.preset: {choice: [light, huge]}}"],
            "'huge' is refused",
        ),
        (
            "finetune",
            ["sweep.space={optim.name: {choice: [adamw, adamx]}}"],
            "did you mean 'adamax'",
        ),
        ("finetune", ["sweep.space={model.patch_size: {int: [7, 8]}}"], "divisible by model.patch"),
        ("finetune", ["sweep.space={logging.name: {choice: [a, b]}}"], "set by the sweep itself"),
        ("finetune", ["sweep.space={optim.lr: {loguniform: [0, 1]}}"], "positive low end"),
        ("finetune", ["sweep.space={optim.lr: {uniform: [0.1, 0.01]}}"], "low < high"),
        ("finetune", ["sweep.space={optim.lr: {int: [1, 2], choice: [1]}}"], "exactly one of"),
        ("finetune", ["sweep.space={model.kwargs.depth: {int: [1.5, 3]}}"], "sweep.space.model"),
        ("finetune", ["data.group_column=patient"], "data.group_column names a column of data.csv"),
        ("finetune", [r"data.group_pattern=(P\d+)_"], "searched in paths under data.root"),
        ("finetune", ["data.dicom_window=[40, 0]"], "width >= 1"),
        ("finetune", ["data.dicom_frame=all", "data.cache=memory"], "one sample per frame"),
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


def test_a_valid_sweep_space_loads_from_an_override(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", BASE)
    space = f"sweep.space={{{SPACE_LR}, model.kwargs.depth: {{int: [1, 3]}}}}"
    loaded = load_recipe(recipe, [space, "sweep.sampler=random"], command="finetune")
    assert loaded.sweep.space["optim.lr"].loguniform == (1e-4, 3e-3)
    assert loaded.sweep.space["model.kwargs.depth"].kind == "int"
    assert loaded.sweep.sampler == "random" and loaded.sweep.pruner == "median"


def test_a_misspelt_optimiser_fails_before_a_run_folder_exists(tmp_path: Path) -> None:
    from conftest import run_cli

    recipe = write_recipe(tmp_path / "r.yaml", BASE)
    result = run_cli("finetune", str(recipe), "optim.name=adamm", cwd=tmp_path)
    assert result.returncode == 2 and "unknown optim.name 'adamm'" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
