"""Transfer surgery against references: timm's own resampling and loading, layer-decay maths,
freezing, the partial-load key check, and weight sources (files, hashes, offline hub cache)."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch.optim.lr_scheduler import LambdaLR

from vittune.errors import WeightsError
from vittune.models import surgery
from vittune.models.backbone import create_backbone
from vittune.models.freezing import apply_freeze
from vittune.models.weights import read_state_dict
from vittune.optim.param_groups import build_optimizer, build_param_groups
from vittune.optim.schedules import lr_multiplier
from vittune.recipe.schema import ModelConfig, OptimConfig

TINY = dict(embed_dim=64, depth=2, num_heads=2)
NAME = "vit_tiny_patch16_224"


def tiny_vit(img_size=32, patch_size=8, num_classes=10, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        NAME,
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        **{**TINY, **kwargs},
    )


def saved_weights(
    tmp_path: Path, model: torch.nn.Module, name: str = "weights.safetensors"
) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def model_cfg(**overrides) -> ModelConfig:
    base = dict(name=NAME, img_size=32, patch_size=8, kwargs=TINY, drop_path_rate=0.0)
    return ModelConfig(**{**base, **overrides})


# --- position embeddings and patch size -------------------------------------------------


@pytest.mark.parametrize("new_size", [(48, 48), (32, 48), (24, 40)])
def test_pos_embed_resample_equals_timm(new_size):
    source = tiny_vit(img_size=32)
    target = tiny_vit(img_size=new_size)
    state, note = surgery.resample_pos_embed(source.state_dict(), target, old_grid=(4, 4))
    expected = resample_abs_pos_embed(
        source.pos_embed.detach(),
        new_size=[new_size[0] // 8, new_size[1] // 8],
        old_size=[4, 4],
        num_prefix_tokens=1,
    )
    torch.testing.assert_close(state["pos_embed"], expected, rtol=0, atol=0)
    assert state["pos_embed"].shape == target.pos_embed.shape
    assert torch.equal(
        state["pos_embed"][:, :1], source.pos_embed.detach()[:, :1]
    )  # cls row kept as is
    assert note == f"pos_embed resampled 4x4 -> {new_size[0] // 8}x{new_size[1] // 8} tokens"


def test_non_square_source_grid_uses_recorded_grid():
    source = tiny_vit(img_size=(32, 64))  # 4x8 grid: not inferable from the token count
    target = tiny_vit(img_size=(64, 32))  # 8x4: the same token count
    state, _ = surgery.resample_pos_embed(source.state_dict(), target, old_grid=(4, 8))
    expected = resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=[8, 4], old_size=[4, 8], num_prefix_tokens=1
    )
    torch.testing.assert_close(state["pos_embed"], expected, rtol=0, atol=0)


def test_register_tokens_without_embed_class_resample_patch_rows_only():
    kwargs = dict(reg_tokens=4, no_embed_class=True, class_token=True)
    source, target = tiny_vit(img_size=32, **kwargs), tiny_vit(img_size=48, **kwargs)
    assert source.pos_embed.shape[1] == 16  # prefix tokens carry no position rows
    state, _ = surgery.resample_pos_embed(source.state_dict(), target)
    expected = resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=0
    )
    torch.testing.assert_close(state["pos_embed"], expected, rtol=0, atol=0)


def _timm_reference(path: Path, **kwargs) -> torch.nn.Module:
    """timm's own loader: create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))."""
    model = timm.create_model(
        NAME,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        num_classes=10,
        **TINY,
        **kwargs,
    )
    return model.eval()


@pytest.mark.parametrize(
    ("img_size", "patch_size", "in_chans"),
    [(48, 8, 3), ((32, 48), 8, 3), (32, 4, 3), (48, 8, 1)],
    ids=["resolution", "non-square", "patch-size", "grey-input"],
)
def test_loaded_model_matches_timm_logits(tmp_path, img_size, patch_size, in_chans):
    path = saved_weights(tmp_path, tiny_vit(img_size=32, patch_size=8))
    ours, report = create_backbone(
        model_cfg(
            pretrained=str(path),
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            keep_head=True,
        ),
        10,
    )
    reference = _timm_reference(path, img_size=img_size, patch_size=patch_size, in_chans=in_chans)
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    images = torch.randn(2, in_chans, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), reference(images), rtol=1e-5, atol=1e-5)
    assert report.reinitialised == []


# --- heads and the partial-load key check ------------------------------------------------


def test_head_replaced_when_classes_differ_and_only_head_reinitialised(tmp_path):
    path = saved_weights(tmp_path, tiny_vit())
    model, report = create_backbone(
        model_cfg(pretrained=str(path), head_init="zeros"), num_classes=3
    )
    assert report.reinitialised == ["head.bias", "head.weight"]
    assert torch.count_nonzero(model.head.weight) == 0
    source = read_state_dict(path)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])


def test_keep_head_keeps_matching_head_and_replaces_by_default(tmp_path):
    trained = tiny_vit()
    path = saved_weights(tmp_path, trained)
    kept, report = create_backbone(model_cfg(pretrained=str(path), keep_head=True), num_classes=10)
    torch.testing.assert_close(kept.head.weight, trained.head.weight)
    replaced, report2 = create_backbone(model_cfg(pretrained=str(path)), num_classes=10)
    assert report2.reinitialised == ["head.bias", "head.weight"]
    assert not torch.equal(replaced.head.weight, trained.head.weight)


def test_key_check_fails_on_a_wrong_key():
    with pytest.raises(WeightsError, match=r"missing \['blocks.0.attn.qkv.weight'\]"):
        surgery.check_load_keys(["blocks.0.attn.qkv.weight", "head.weight"], [], ["head.weight"])
    with pytest.raises(WeightsError, match=r"unexpected \['decoder.weight'\]"):
        surgery.check_load_keys([], ["decoder.weight"], [])
    surgery.check_load_keys(
        ["head.weight", "head.bias"], [], ["head.weight", "head.bias"]
    )  # exactly the head: fine


def test_weights_missing_a_block_key_are_refused(tmp_path):
    state = {
        k: v.contiguous()
        for k, v in tiny_vit().state_dict().items()
        if k != "blocks.1.norm1.weight"
    }
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match="blocks.1.norm1.weight"):
        create_backbone(model_cfg(pretrained=str(tmp_path / "broken.safetensors")), 10)


def test_weights_of_another_width_are_refused_in_one_line(tmp_path):
    path = saved_weights(tmp_path, tiny_vit())
    with pytest.raises(WeightsError) as err:
        create_backbone(
            model_cfg(pretrained=str(path), kwargs=dict(embed_dim=96, depth=2, num_heads=2)), 10
        )
    assert "\n" not in str(err.value) and "model.kwargs" in str(err.value)


# --- layer-wise lr decay ------------------------------------------------------------------


def _reference_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup from 0 over `warmup` steps, then half-cosine to 0 (written independently)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, **TINY)),
    "vit-reg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, reg_tokens=4, **TINY)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, **TINY)),
    "eva": (
        "eva02_tiny_patch14_224",
        dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2),
    ),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, **TINY)),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_decay_lrs_follow_formula_through_the_schedule(arch):
    name, kwargs = ARCHS[arch]
    model = timm.create_model(name, num_classes=5, **kwargs)
    depth, decay, base_lr = 2, 0.6, 1e-3
    groups = build_param_groups(
        model, OptimConfig(lr=base_lr, layer_decay=decay, weight_decay=0.05), base_lr
    )
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    for group in groups:
        assert group["lr"] == pytest.approx(base_lr * decay ** (depth + 1 - group["layer_id"]))
        no_decay = any(
            p.ndim <= 1 or n in model.no_weight_decay()
            for n, p in zip(group["param_names"], group["params"], strict=True)
        )
        assert group["weight_decay"] == (0.0 if no_decay else 0.05)
    ids = {g["layer_id"] for g in groups}
    assert ids == set(range(depth + 2)), ids  # stem, every block, head
    names = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert {"pos_embed", "cls_token"} & set(dict(model.named_parameters())) <= names

    optimizer = build_optimizer(groups, OptimConfig(lr=base_lr, layer_decay=decay), base_lr)
    total, warmup = 20, 4
    scheduler = LambdaLR(optimizer, lr_multiplier("cosine", total, warmup))
    for k in range(12):
        factor = _reference_schedule(k, total, warmup)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(
                base_lr * decay ** (depth + 1 - _layer_of(group, groups)) * factor
            )
        optimizer.step()
        scheduler.step()


def _layer_of(opt_group: dict, groups: list[dict]) -> int:
    return next(g["layer_id"] for g in groups if g["params"][0] is opt_group["params"][0])


# --- freezing -----------------------------------------------------------------------------


def _train_step(model: torch.nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    optimizer = build_optimizer(groups, OptimConfig(lr=1e-2), 1e-2)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize(("frozen_blocks", "linear_probe"), [(1, False), (0, True)])
def test_frozen_parameters_do_not_change_and_are_absent_from_the_optimiser(
    frozen_blocks, linear_probe
):
    model = tiny_vit()
    frozen = apply_freeze(model, frozen_blocks, linear_probe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = build_param_groups(model, OptimConfig(lr=1e-2, weight_decay=0.1), 1e-2)
    optimizer = _train_step(model, groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]), name
            assert id(param) not in in_optimizer and param not in optimizer.state
        else:
            assert not torch.equal(param, before[name]), name
    expected = {"patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"}
    assert expected <= frozen
    assert ("blocks.1.attn.qkv.weight" in frozen) == linear_probe
    assert not any(n.startswith("head.") for n in frozen)


# --- weight sources -----------------------------------------------------------------------


def test_sha256_is_checked_before_loading(tmp_path):
    path = saved_weights(tmp_path, tiny_vit())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    create_backbone(model_cfg(pretrained=str(path), pretrained_sha256=digest), 10)
    with pytest.raises(WeightsError, match="sha256"):
        create_backbone(model_cfg(pretrained=str(path), pretrained_sha256="0" * 64), 10)


class Payload:
    """An arbitrary object: a pickle holding it would run code on load."""


def test_checkpoints_load_with_weights_only(tmp_path):
    model = tiny_vit()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
        tmp_path / "ok.ckpt",
    )
    loaded, _ = create_backbone(model_cfg(pretrained=str(tmp_path / "ok.ckpt"), keep_head=True), 10)
    torch.testing.assert_close(loaded.head.weight, model.head.weight)

    torch.save({"state_dict": model.state_dict(), "payload": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        create_backbone(model_cfg(pretrained=str(tmp_path / "unsafe.pth")), 10)


def test_missing_weight_file_is_one_line(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_backbone(model_cfg(pretrained=str(tmp_path / "nope.safetensors")), 10)


def test_hub_weights_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(WeightsError, match="cannot get hub weights"):
        create_backbone(model_cfg(pretrained=True), 10)
    assert time.monotonic() - start < 20
