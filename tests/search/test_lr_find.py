"""The LR range test keeps layer decay: every group steps with optim.lr x its own scale."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_images
from helpers import tiny, write_recipe

from vittune.recipe.load import load_recipe
from vittune.search.lr_find import exponential_lrs, lr_range_test, smooth, steepest_descent
from vittune.tasks.assembly import build

DECAY = 0.75


def test_every_group_keeps_its_layer_decay_ratio_and_the_model_comes_back(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    path = write_recipe(tmp_path / "r.yaml", {"model": {"in_chans": 1}})
    recipe = load_recipe(
        path,
        tiny(
            f"data.root={data}",
            "data.batch_size=4",
            "augment.preset=none",
            f"optim.layer_decay={DECAY}",
            "freeze.frozen_blocks=1",  # patch embedding and block 0 frozen: no group at all
            "optim.lr=1e-3",
        ),
    )
    assembly = build(recipe, "finetune")
    before = {k: v.clone() for k, v in assembly.task.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in assembly.task.named_parameters()}
    lrs = exponential_lrs(1e-6, 1e-1, 12)
    result = lr_range_test(assembly.task, assembly.datamodule, recipe, lrs, recipe_lr=1e-3)

    # 2 blocks: timm's layer ids are 0 (embedding), 1-2 (blocks), 3 (norm and head)
    assert sorted(result.group_names) == [
        "layer_2_decay",
        "layer_2_no_decay",
        "layer_3_decay",
        "layer_3_no_decay",
    ]
    assert len(result.group_lrs) == len(result.lrs) == len(result.losses) == 12
    assert result.lrs == lrs  # the planned exponential steps, all taken
    for step, lr in enumerate(result.lrs):
        for name, group_lr in zip(result.group_names, result.group_lrs[step], strict=True):
            layer = int(name.split("_")[1])
            assert math.isclose(group_lr, lr * DECAY ** (3 - layer), rel_tol=1e-12), (step, name)
    assert result.scales == pytest.approx(
        [DECAY ** (3 - int(n.split("_")[1])) for n in result.group_names]
    )

    # the model and its trainable flags are as they were
    after = assembly.task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in assembly.task.named_parameters()} == trainable

    # the smoothing and the suggestion, recomputed from the recorded losses
    beta, losses = 0.98, result.losses
    expected = [
        sum((1 - beta) * beta ** (k - j) * losses[j] for j in range(k + 1)) / (1 - beta ** (k + 1))
        for k in range(len(losses))
    ]
    assert np.allclose(result.smoothed, expected, rtol=1e-12)
    skip = 1  # 10 % of 12 steps, at least one
    logs = np.log(result.lrs[skip:])
    s = np.asarray(expected[skip:])
    slopes = [(s[1] - s[0]) / (logs[1] - logs[0])]
    slopes += [(s[i + 1] - s[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(s) - 1)]
    slopes += [(s[-1] - s[-2]) / (logs[-1] - logs[-2])]
    assert result.suggestion == result.lrs[skip + int(np.argmin(slopes))]


def test_the_suggestion_is_the_steepest_descent_of_a_known_curve() -> None:
    lrs = exponential_lrs(1e-5, 1.0, 51)
    # a loss that falls fastest (against log lr) at lr = 1e-2, as a logistic step
    losses = [2.0 - 1.0 / (1.0 + math.exp(-3.0 * (math.log10(lr) + 2.0))) for lr in lrs]
    assert steepest_descent(lrs, losses) == min(lrs, key=lambda lr: abs(math.log10(lr) + 2))
    assert steepest_descent(lrs[:3], losses[:3]) is None  # too few steps to say
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx(
        [1.0, 1.0, 1.0], rel=1e-12
    )  # bias correction: no pull towards 0
