"""PEFT and EMA with `trainer.compile` and with 2-process DDP on CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe
from safetensors import safe_open

from vittune.recipe.load import load_recipe
from vittune.training.run import fit

WEIGHT_ATOL = 1e-4  # compiled vs eager fp32 rounding, see tests/tasks/test_compile.py
PEFT = ("peft.method=lora", "ema={decay: 0.9}")


def recipe_file(tmp_path: Path, images: int = 12) -> Path:
    make_class_images(tmp_path / "data", {"a": images, "b": images}, size=32)
    return write_recipe(
        tmp_path / "r.yaml",
        {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.25, "batch_size": 8}},
    )


def last_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_compiled_lora_with_ema_follows_eager(tmp_path: Path) -> None:
    path = recipe_file(tmp_path)
    runs = {}
    for compiled in ("false", "true"):
        recipe = load_recipe(
            path,
            tiny(
                *PEFT,
                "trainer.max_epochs=1",
                "schedule.name=constant",
                f"trainer.compile={compiled}",
                f"logging.run_dir={tmp_path / 'runs'}",
                f"logging.name=compile-{compiled}",
            ),
            command="finetune",
        )
        runs[compiled] = fit(recipe, "finetune", path, log=lambda _: None).run_dir
    eager, compiled = last_state(runs["false"]), last_state(runs["true"])
    assert list(compiled) == list(eager)  # no `_orig_mod.` anywhere, EMA included
    lora_b = [k for k in eager if k.startswith("model.") and "lora_B" in k]
    assert lora_b
    for key in lora_b:
        assert eager[key].abs().max() > 10 * WEIGHT_ATOL, key  # lora_B starts at zero
    for key in eager:  # raw weights and the average alike
        assert torch.allclose(compiled[key], eager[key], atol=WEIGHT_ATOL), key
    with safe_open(str(runs["true"] / "model.safetensors"), "pt") as handle:
        assert not any("lora" in k for k in handle.keys())  # noqa: SIM118 (not a dict)
    timm.create_model(f"local-dir:{runs['true']}", pretrained=True)  # plain timm layout


@pytest.mark.slow
def test_two_process_ddp_trains_lora_with_ema(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, images=16)
    overrides = tiny(
        *PEFT,
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "logging.name=ddp",
    )
    result = run_cli("finetune", str(path), *overrides, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    state = last_state(run)
    # the average moved away from the raw weights' start and from the raw weights themselves
    assert not torch.equal(state["ema.module.head.weight"], state["model.head.weight"])
    plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert plain.num_classes == 2
