"""Every PEFT method trains and exports through `vittune.training.run.fit`; the export is plain timm
(except VPT-deep, which keeps its prompts and is rebuilt by vittune); PEFT students distil,
MAE encoders transfer, and the shipped recipes/lora.yaml runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import make_class_images
from helpers import RECIPES, tiny, write_recipe

from vittune.errors import RecipeError
from vittune.inference.trained_run import build_trained, load_trained_run
from vittune.models.adapters.export_weights import checkpoint_weights
from vittune.recipe.load import load_recipe
from vittune.tasks.assembly import build
from vittune.training.run import fit

METHODS = ["lora", "dora", "ia3", "vpt", "vpt_deep", "ssf", "bitfit"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peft-runs")
    make_class_images(root / "data", {"a": 10, "b": 10, "c": 10}, size=32)
    write_recipe(
        root / "r.yaml",
        {"data": {"root": str(root / "data"), "val_fraction": 0.3, "batch_size": 8}},
    )
    return root


def train(workspace: Path, command: str, *overrides: str, recipe: Path | None = None) -> Path:
    path = recipe or workspace / "r.yaml"
    extra = [*tiny("trainer.max_epochs=2"), f"logging.run_dir={workspace / 'runs'}"]
    loaded = load_recipe(path, [*extra, *overrides], command=command)
    return fit(loaded, command, path, log=lambda _: None).run_dir


@pytest.fixture(scope="module")
def source(workspace: Path) -> Path:
    return train(workspace, "finetune", "logging.name=source")


def best_checkpoint(run: Path) -> Path:
    return next(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_exports(workspace: Path, source: Path, method: str) -> None:
    run = train(
        workspace,
        "finetune",
        f"peft.method={method}",
        f"model.pretrained={source}",
        "peft.prompt_tokens=2",
        "optim.lr=3e-3",
        f"logging.name={method}",
    )
    # the adapted model, rebuilt from the recipe and the best checkpoint ...
    recipe = load_recipe(run / "recipe.yaml", [], command="finetune")
    adapted = build(recipe, "finetune").task.model.eval()
    adapted.load_state_dict(checkpoint_weights(best_checkpoint(run), ema=False))
    base = dict(timm.create_model("vit_tiny_patch16_224", **timm_args(run)).named_parameters())
    changed = [n for n, p in adapted.named_parameters() if p.requires_grad and n not in base]
    assert changed or method == "bitfit"
    # ... gives the logits of the exported weights, read back as evaluate reads them
    trained = load_trained_run(run)
    exported = build_trained(trained).task.model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = adapted(images)
        assert torch.allclose(exported(images), expected, atol=1e-5)
        if method != "vpt_deep":  # plain timm reads the folder as it is
            plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
            assert torch.allclose(plain(images), expected, atol=1e-5)
    if method == "vpt_deep":
        with pytest.raises(RuntimeError, match="vpt_prompt"):
            timm.create_model(f"local-dir:{run}", pretrained=True)
    assert (run / "adapter" / "vittune_adapter.json").is_file()
    card = (run / "README.md").read_text()
    assert ("plain timm refuses it" if method == "vpt_deep" else "merged into these") in card


def timm_args(run: Path) -> dict:
    import json

    args = json.loads((run / "config.json").read_text())["model_args"]
    return {k: v for k, v in args.items() if k != "reg_tokens"}


def test_a_lora_student_distils_from_a_teacher(workspace: Path, source: Path) -> None:
    run = train(
        workspace,
        "distill",
        "model.name=deit_tiny_distilled_patch16_224",
        "peft.method=lora",
        f"distill={{teacher: {{name: vit_tiny_patch16_224, pretrained: {source}}}}}",
        "logging.name=distilled",
    )
    plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    assert type(plain).__name__ == "VisionTransformerDistilled"
    state = checkpoint_weights(best_checkpoint(run), ema=False)
    assert any("lora_A" in k for k in state)
    assert not any(k.startswith("teacher.") for k in state)


def test_an_mae_encoder_transfers_with_ssf(workspace: Path) -> None:
    encoder = train(
        workspace,
        "pretrain-mae",
        "mae={decoder_depth: 1, decoder_dim: 32, decoder_heads: 2}",
        "data.labelled=false",
        "trainer.max_epochs=1",
        "logging.name=mae",
    )
    run = train(
        workspace,
        "finetune",
        "peft.method=ssf",
        f"model.pretrained={encoder}",
        "trainer.max_epochs=1",
        "logging.name=mae-ssf",
    )
    encoder_state = timm.create_model(f"local-dir:{encoder}", pretrained=True).state_dict()
    state = checkpoint_weights(best_checkpoint(run), ema=False)
    # the frozen encoder weights are the MAE's; only SSF factors and the head moved
    assert torch.equal(state["blocks.1.attn.qkv.weight"], encoder_state["blocks.1.attn.qkv.weight"])
    assert "blocks.1.attn.qkv.ssf_scale" in state


def test_shipped_lora_recipe_runs_with_tiny_overrides(workspace: Path, source: Path) -> None:
    run = train(
        workspace,
        "finetune",
        f"model.pretrained={source}",
        f"data.root={workspace / 'data'}",
        "data.builtin=null",
        "model.in_chans=3",
        "trainer.max_epochs=1",
        "logging.name=shipped",
        recipe=RECIPES / "lora.yaml",
    )
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert load_recipe(run / "recipe.yaml", [], command="finetune").peft.method == "lora"


def test_peft_with_freezing_is_one_clear_recipe_error(workspace: Path) -> None:
    with pytest.raises(RecipeError, match=r"remove freeze\.unfreeze_schedule"):
        load_recipe(
            workspace / "r.yaml",
            ["peft.method=lora", "freeze.unfreeze_schedule={1: 0}"],
            command="finetune",
        )


def test_bf16_mixed_lora_with_ema_trains_and_merges(workspace: Path, source: Path) -> None:
    run = train(
        workspace,
        "finetune",
        "peft.method=lora",
        "ema={decay: 0.9}",
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=1",
        f"model.pretrained={source}",
        "logging.name=bf16",
    )
    state = checkpoint_weights(best_checkpoint(run), ema=True)
    assert state["blocks.0.attn.qkv.lora_A.default.weight"].dtype == torch.float32
    plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    adapted = build(load_recipe(run / "recipe.yaml", [], command="finetune"), "finetune")
    model = adapted.task.model.eval()
    model.load_state_dict(state)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(images), model(images), atol=1e-5)
