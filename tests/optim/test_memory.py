"""`vittune inspect` for PEFT recipes: trainable parameters per method, counted directly, and
the memory line equal to weights + gradients + optimiser state (+ EMA) of those counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
from helpers import tiny, write_recipe

from vittune.inference.inspect import inspect_recipe
from vittune.models.adapters import apply_peft
from vittune.optim.memory import training_memory
from vittune.recipe.load import load_recipe
from vittune.recipe.schema import PeftConfig


def test_memory_counts_each_part() -> None:
    memory = training_memory(total=1000, trainable=10, optimizer="adamw", ema=True)
    assert (memory.weights, memory.gradients, memory.optimiser, memory.ema) == (4000, 40, 80, 4000)
    assert training_memory(1000, 10, "sgd", ema=False).total == 4000 + 40 + 40


@pytest.mark.parametrize("method", ["lora", "vpt_deep", "bitfit"])
def test_inspect_shows_the_methods_trainable_share_and_memory(tmp_path: Path, method: str):
    path = write_recipe(tmp_path / "r.yaml", {"data": {"builtin": "digits"}})
    recipe = load_recipe(path, tiny(f"peft.method={method}", "ema.decay=0.99"), command="finetune")
    text = inspect_recipe(recipe, "finetune")
    classes = int(re.search(r"head\s+(\d+) classes", text).group(1))  # digits: 10
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=classes,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    apply_peft(model, PeftConfig(method=method))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters   {trainable:,} trainable of {total:,}" in text
    assert f"peft         {method}:" in text
    memory = training_memory(total, trainable, "adamw", ema=True)
    assert f"memory       {memory.total / 2**20:.1f} MB" in text
    assert f"EMA copy {memory.ema / 2**20:.1f} MB" in text
