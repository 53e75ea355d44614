"""PEFT adapters on tiny timm ViTs: what trains, forwards against direct computations, merges
to plain timm weights with the same logits, adapter files that re-apply, layer-decay lrs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from vittune.errors import RecipeError
from vittune.models.adapters import (
    apply_peft,
    is_mergeable,
    load_adapter,
    merged_model,
    save_adapter,
)
from vittune.models.adapters.ssf import merge_state
from vittune.models.adapters.vpt import PROMPT
from vittune.models.backbone import count_parameters
from vittune.optim.param_groups import build_param_groups
from vittune.recipe.schema import OptimConfig, PeftConfig

METHODS = ["lora", "dora", "ia3", "vpt", "vpt_deep", "ssf", "bitfit"]
DEPTH = 3


def tiny_vit(name: str = "vit_tiny_patch16_224", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=2, num_classes=5)
    return timm.create_model(name, **{**args, **extra}).eval()


def trained(method: str, model: torch.nn.Module | None = None, **cfg) -> tuple:
    """A model with `method`'s adapters, their values moved off init (as training would)."""
    model = model if model is not None else tiny_vit()
    config = PeftConfig(method=method, prompt_tokens=3, **cfg)
    apply_peft(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval(), config


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_adapts_exactly_the_named_block_layers_never_patch_embed_or_head() -> None:
    model, _ = trained("lora")
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {
        f"blocks.{i}.{t}"
        for i in range(DEPTH)
        for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert wrapped == expected
    assert {n for n in trainable(model) if "lora_" not in n} == {"head.weight", "head.bias"}
    # the base layers are frozen and keep their timm names under peft's base_layer
    assert not model.get_submodule("blocks.0.attn.qkv.base_layer").weight.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_and_head_train(method: str) -> None:
    base = tiny_vit()
    model, _ = trained(method, copy.deepcopy(base))
    names = trainable(model)
    assert {"head.weight", "head.bias"} <= names
    new = names - set(dict(base.named_parameters()))
    if method == "bitfit":
        biases = {n for n in dict(base.named_parameters()) if n.endswith("bias")}
        assert not new and names == biases | {"head.weight"}
    else:
        assert new and all(n.startswith("blocks.") for n in new)
    count, total = count_parameters(model)
    assert count == sum(model.get_parameter(n).numel() for n in names)
    assert count < 0.2 * total  # tiny model: the head alone is 325 of ~150 K


def test_bitfit_norms_option_adds_the_norm_scales() -> None:
    model, _ = trained("bitfit", bitfit_norms=True)
    names = trainable(model)
    assert "blocks.0.norm1.weight" in names and "norm.weight" in names
    assert "blocks.0.attn.qkv.weight" not in names


def test_distilled_deit_trains_both_heads() -> None:
    model, _ = trained("lora", tiny_vit("deit_tiny_distilled_patch16_224"))
    assert {"head.weight", "head_dist.weight"} <= trainable(model)


@pytest.mark.parametrize("method", METHODS)
def test_merged_weights_give_the_adapted_logits_in_plain_timm(method: str) -> None:
    model, cfg = trained(method)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)  # [4, 5]
        merged = merged_model(model, cfg).eval()
        got = merged(images)
    assert torch.allclose(got, expected, atol=1e-5)
    if method == "vpt_deep":
        assert not is_mergeable(model, cfg)
        return
    # plain timm weights: a fresh timm model of the recorded architecture takes them strictly
    args = dict(merged._model_args)
    fresh = timm.create_model("vit_tiny_patch16_224", **args).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(images), expected, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_folder_applied_to_the_base_gives_the_same_logits(
    method: str, tmp_path: Path
) -> None:
    base = tiny_vit()
    model, cfg = trained(method, copy.deepcopy(base))
    save_adapter(model, cfg, tmp_path / "adapter", base="test")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        got = load_adapter(base, tmp_path / "adapter").eval()(images)
    assert torch.allclose(got, expected, atol=1e-5)


def test_peft_adapter_folder_is_what_peft_model_from_pretrained_reads(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny_vit()
    model, cfg = trained("lora", copy.deepcopy(base))
    save_adapter(model, cfg, tmp_path, base="test")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-6)


def direct_vpt(base: torch.nn.Module, prompts: list[torch.Tensor], images: torch.Tensor):
    """VPT written out on an unmodified timm ViT: [cls, prompts, patches] through the blocks."""
    x = base._pos_embed(base.patch_embed(images))  # [B, 1 + N, D]
    batch, tokens = len(images), prompts[0].shape[1]
    for i, block in enumerate(base.blocks):
        if i == 0:
            x = torch.cat([x[:, :1], prompts[0].expand(batch, -1, -1), x[:, 1:]], dim=1)
        elif i < len(prompts):
            x = torch.cat([x[:, :1], prompts[i].expand(batch, -1, -1), x[:, 1 + tokens :]], dim=1)
        x = block(x)  # [B, 1 + P + N, D]
    x = base.norm(x)
    return base.head(x[:, 0])  # the class token


@pytest.mark.parametrize("method", ["vpt", "vpt_deep"])
def test_vpt_forward_equals_the_direct_computation(method: str) -> None:
    base = tiny_vit()
    model, _ = trained(method, copy.deepcopy(base))
    blocks = DEPTH if method == "vpt_deep" else 1
    prompts = [getattr(model.blocks[i], PROMPT) for i in range(blocks)]
    assert prompts[0].shape == (1, 3, 64)
    base.head.load_state_dict(model.head.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), direct_vpt(base, prompts, images), atol=1e-5)


def test_vpt_init_is_the_papers_uniform_bound() -> None:
    model = apply_peft(tiny_vit(), PeftConfig(method="vpt", prompt_tokens=50))
    bound = (6.0 / (3 * 8 * 8 + 64)) ** 0.5
    prompt = getattr(model.blocks[0], PROMPT)
    assert prompt.abs().max() <= bound and prompt.abs().max() > 0.9 * bound


def test_ssf_scales_and_shifts_each_output_and_folds_into_the_layer() -> None:
    model, _ = trained("ssf")
    layer = model.blocks[1].mlp.fc1
    scale, shift = layer.ssf_scale, layer.ssf_shift
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        direct = F.linear(x, layer.weight, layer.bias) * scale + shift
        assert torch.allclose(layer(x), direct, atol=1e-6)
        norm = model.blocks[0].norm2
        direct_norm = F.layer_norm(x, (64,), norm.weight, norm.bias, norm.eps)
        assert torch.allclose(norm(x), direct_norm * norm.ssf_scale + norm.ssf_shift, atol=1e-6)
    wrapped = {n.rsplit(".", 1)[0] for n in trainable(model) if n.endswith("ssf_scale")}
    assert wrapped == {
        f"blocks.{i}.{t}"
        for i in range(DEPTH)
        for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
    }
    state = merge_state({k: v.detach() for k, v in layer.state_dict().items()})
    assert set(state) == {"weight", "bias"}
    with torch.no_grad():
        assert torch.allclose(F.linear(x, state["weight"], state["bias"]), direct, atol=1e-5)


def test_unknown_target_names_the_blocks_layers() -> None:
    with pytest.raises(RecipeError, match=r"'attn\.qkvv'.*did you mean 'attn\.qkv'"):
        apply_peft(tiny_vit(), PeftConfig(method="lora", targets=["attn.qkvv"]))


def test_a_cnn_is_refused_in_one_line() -> None:
    cnn = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(RecipeError, match="peft needs a ViT"):
        apply_peft(cnn, PeftConfig(method="lora"))


@pytest.mark.parametrize("method", ["lora", "ia3", "vpt_deep", "ssf"])
def test_layer_decay_gives_each_adapter_its_blocks_lr(method: str) -> None:
    model, _ = trained(method)
    decay, lr = 0.5, 1.0
    groups = build_param_groups(model, OptimConfig(layer_decay=decay), lr)
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    adapters = [n for n in lr_of if not n.startswith("head.")]
    assert adapters
    for name in adapters:
        block = int(name.split(".")[1])  # blocks.N...
        # timm's ids: stem 0, blocks 1..depth, head depth + 1; scale decay ** (depth - block)
        assert lr_of[name] == pytest.approx(lr * decay ** (DEPTH - block)), name
    assert lr_of["head.weight"] == pytest.approx(lr)


def test_ssf_refuses_a_layer_without_bias_before_training() -> None:
    model = tiny_vit(qkv_bias=False)
    with pytest.raises(RecipeError, match=r"blocks\.0\.attn\.qkv has no bias"):
        apply_peft(model, PeftConfig(method="ssf"))


def test_vpt_deep_attention_maps_skip_the_prompts_and_token_merging_refuses() -> None:
    from vittune.models.attention import attention_maps
    from vittune.models.token_merging import token_merging

    model, _ = trained("vpt_deep")
    heads, rollout = attention_maps(model, torch.randn(2, 3, 32, 32))
    assert heads.shape == (2, 2, 32, 32) and rollout.shape == (2, 32, 32)
    with pytest.raises(RecipeError, match="vpt_deep"), token_merging(model, 2):
        pass
