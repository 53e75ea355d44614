"""Transfer end to end through the `vittune` console script: new resolution, logged layer-decay
learning rates, freezing schedules (also under 2-process DDP), `inspect`, and an offline hub cache."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_OVERRIDES, make_class_images, run_cli
from helpers import ROOT, run_in_process
from safetensors.torch import save_file

from vittune.models.weights import read_state_dict

CLASSES = {"a": 24, "b": 24, "c": 24, "d": 24}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transfer")
    make_class_images(root / "images", CLASSES, size=32)
    (root / "base.yaml").write_text(
        f"data:\n  root: {root / 'images'}\n  batch_size: 8\n  val_fraction: 0.25\naugment:\n  preset: none\n"
    )
    return root


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def best_val_acc(run: Path) -> float:
    return max(float(r["val/acc1"]) for r in metrics_rows(run) if r.get("val/acc1"))


def finetune(workspace: Path, name: str, *extra: str):
    result = run_cli(
        "finetune", "base.yaml", *TINY_OVERRIDES, f"logging.name={name}", *extra, cwd=workspace
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, workspace / "runs" / name


@pytest.fixture(scope="module")
def source_run(workspace: Path) -> Path:
    """A 32 px model trained briefly: the weights every transfer below starts from."""
    _, run = finetune(workspace, "source32", "trainer.max_epochs=4", "optim.lr=2e-3")
    assert best_val_acc(run) > 0.5
    return run


@pytest.mark.slow
def test_finetune_at_48px_from_32px_export_loads_and_learns(workspace, source_run):
    result, run = finetune(
        workspace,
        "at48",
        "model.img_size=48",
        f"model.pretrained={source_run}",
        "trainer.max_epochs=3",
        "optim.lr=1e-3",
    )
    assert "pos_embed resampled 4x4 -> 6x6 tokens" in result.stdout
    assert best_val_acc(run) >= 0.75  # 4 classes: chance is 0.25
    state = read_state_dict(run / "model.safetensors")
    assert state["pos_embed"].shape == (1, 1 + 36, 64)


def test_layer_lrs_are_logged_and_follow_decay_and_schedule(workspace):
    decay, lr, warmup, total = 0.5, 1e-3, 2, 4
    _, run = finetune(
        workspace,
        "decay",
        f"optim.layer_decay={decay}",
        f"optim.lr={lr}",
        f"schedule.warmup_steps={warmup}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={total}",
        "trainer.log_every_n_steps=1",
    )
    rows = [r for r in metrics_rows(run) if r.get("lr/layer_0_decay")]
    assert len(rows) == total
    for row in rows:
        step = int(row["step"])
        factor = (
            (step + 1) / (warmup + 1)
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        )
        for layer in range(4):  # depth 2: stem 0, blocks 1-2, head 3
            expected = lr * decay ** (3 - layer) * factor
            assert float(row[f"lr/layer_{layer}_decay"]) == pytest.approx(expected, rel=1e-6), (
                step,
                layer,
            )


def test_linear_probe_then_gradual_unfreezing(workspace, source_run):
    source = read_state_dict(source_run / "model.safetensors")
    _, probe = finetune(
        workspace,
        "probe",
        f"model.pretrained={source_run}",
        "freeze.linear_probe=true",
        "trainer.max_epochs=1",
    )
    probed = read_state_dict(probe / "checkpoints" / "last.ckpt")
    assert torch.equal(probed["blocks.1.mlp.fc1.weight"], source["blocks.1.mlp.fc1.weight"])
    assert torch.equal(probed["pos_embed"], source["pos_embed"])
    assert not torch.equal(probed["head.weight"], source["head.weight"])

    decay, lr, steps_per_epoch, epochs = 0.7, 1e-3, 9, 3  # 72 training images, batch 8
    _, gradual = finetune(
        workspace,
        "gradual",
        f"model.pretrained={source_run}",
        "freeze.linear_probe=true",
        "freeze.unfreeze_schedule={1: 1, 2: 0}",
        f"optim.layer_decay={decay}",
        f"optim.lr={lr}",
        f"trainer.max_epochs={epochs}",
        "trainer.log_every_n_steps=1",
    )
    final = read_state_dict(gradual / "checkpoints" / "last.ckpt")
    assert not torch.equal(
        final["blocks.1.mlp.fc1.weight"], source["blocks.1.mlp.fc1.weight"]
    )  # unfrozen at epoch 1
    assert not torch.equal(
        final["blocks.0.mlp.fc1.weight"], source["blocks.0.mlp.fc1.weight"]
    )  # unfrozen at epoch 2
    total = steps_per_epoch * epochs
    rows = [r for r in metrics_rows(gradual) if r.get("lr/layer_3_decay")]
    assert len(rows) == total
    for row in rows:
        step = int(row["step"])
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        for layer in range(4):
            unfrozen_at = {3: 0, 2: 1, 1: 2, 0: 2}[
                layer
            ] * steps_per_epoch  # head, block 2, block 1 + stem
            logged = row.get(f"lr/layer_{layer}_decay")
            if step < unfrozen_at:
                assert not logged, (step, layer)
            else:  # a new group joins the schedule where it stands, with its layer-decay scale
                assert float(logged) == pytest.approx(
                    lr * decay ** (3 - layer) * factor, rel=1e-6
                ), (step, layer)


@pytest.mark.slow
def test_ddp_with_frozen_blocks_needs_no_find_unused_parameters(workspace, source_run):
    _, run = finetune(
        workspace,
        "ddp-freeze",
        f"model.pretrained={source_run}",
        "freeze.frozen_blocks=1",
        "freeze.unfreeze_schedule={1: 0}",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
    )
    assert (run / "model.safetensors").is_file()
    state = read_state_dict(run / "checkpoints" / "last.ckpt")
    source = read_state_dict(source_run / "model.safetensors")
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], source["blocks.0.mlp.fc1.weight"])


def test_inspect_medical_recipe_offline():
    root = ROOT
    result = run_cli(
        "inspect", "recipes/medical.yaml", "model.pretrained=false", cwd=root, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "token grid   14x14 -> 14x14" in out
    assert (
        "layer_13_decay" in out and "layer_0_no_decay" in out
    )  # ViT-B/16: 12 blocks + stem + head
    assert "trainable of" in out and "GFLOPs per image" in out


def test_inspect_shows_grid_change_and_reinitialised_head(workspace, source_run):
    result = run_cli(
        "inspect",
        "base.yaml",
        *TINY_OVERRIDES,
        "model.img_size=48",
        f"model.pretrained={source_run}",
        "freeze.frozen_blocks=1",
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "token grid   4x4 -> 6x6" in result.stdout
    assert "re-init      head.bias, head.weight" in result.stdout
    assert "frozen" in result.stdout.split("group")[1]


def _populate_hub_cache(cache: Path) -> None:
    """What `huggingface_hub` leaves after downloading timm's default vit_tiny weights
    (here: a tiny model with the same names, trained at 224 px with 16 px patches)."""
    repo = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    model = timm.create_model("vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(snapshot / "model.safetensors"),
    )


def test_hub_weights_from_offline_cache_are_resampled(workspace, tmp_path):
    _populate_hub_cache(tmp_path / "hub")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run_cli(
        "inspect",
        "base.yaml",
        *TINY_OVERRIDES,
        "model.pretrained=true",
        "model.in_chans=1",
        cwd=workspace,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timm hub (timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k)" in result.stdout
    assert "token grid   14x14 -> 4x4" in result.stdout

    # Without the weights, training stops in one line; inspect shows the architecture anyway.
    empty_env = {**env, "HF_HUB_CACHE": str(tmp_path / "none")}
    empty = run_cli(
        "finetune",
        "base.yaml",
        *TINY_OVERRIDES,
        "model.pretrained=true",
        cwd=workspace,
        env=empty_env,
    )
    assert empty.returncode == 2
    assert empty.stderr.count("\n") == 1 and "cannot get hub weights" in empty.stderr
    shown = run_cli(
        "inspect",
        "base.yaml",
        *TINY_OVERRIDES,
        "model.pretrained=true",
        cwd=workspace,
        env=empty_env,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "cannot get hub weights" in shown.stdout and "shown with random init" in shown.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.img_size=36", "not divisible"),
        ("optim.layer_decay=1.5", "layer_decay must be in (0, 1]"),
        ("freeze.frozen_blocks=99", "more than the model's 2 blocks"),
    ],
)
def test_transfer_settings_errors_are_one_line(workspace, override, message):
    # Same path as tests/cli/test_errors.py's console-script case: run in this process.
    result = run_in_process("finetune", "base.yaml", *TINY_OVERRIDES, override, cwd=workspace)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_multi_label_head_trains_with_multilabel_metrics(workspace):
    images = sorted((workspace / "images").rglob("*.png"))
    rows = ["path,label"]
    for path in images:  # every image has its class; classes a and b also share the tag "ab"
        tags = [path.parent.name] + (["ab"] if path.parent.name in "ab" else [])
        rows.append(f"{path},{';'.join(tags)}")
    (workspace / "multi.csv").write_text("\n".join(rows) + "\n")
    result = run_cli(
        "finetune",
        "base.yaml",
        *TINY_OVERRIDES,
        "data.root=null",
        "data.csv=multi.csv",
        "data.multi_label=true",
        "logging.name=multi",
        "trainer.max_epochs=1",
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = (workspace / "runs" / "multi" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert {"val/acc1", "val/f1", "val/auroc"} <= set(header.split(","))
    config = (workspace / "runs" / "multi" / "config.json").read_text()
    assert '"ab"' in config

    mixed = run_cli(
        "finetune",
        "base.yaml",
        *TINY_OVERRIDES,
        "data.root=null",
        "data.csv=multi.csv",
        "data.multi_label=true",
        "augment.mixup_alpha=0.8",
        cwd=workspace,
    )
    assert (
        mixed.returncode == 2
        and "mixup/cutmix are not supported with data.multi_label" in mixed.stderr
    )
