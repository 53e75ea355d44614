"""The distillation chain through the `vittune` console script: fine-tune a tiny CNN teacher at its
own resolution, distil a tiny DeiT from its run folder, and refuse mismatched teachers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_OVERRIDES, make_class_images, run_cli, write_image
from safetensors.torch import load_file

PATTERNS = ("a", "b", "c")  # horizontal stripes, vertical stripes, checkerboard
# test_resnet (0.37M parameters, BatchNorm) at 24 px while the student runs at 32 px.
TEACHER = [
    *(o for o in TINY_OVERRIDES if not o.startswith("model.")),
    "model.name=test_resnet",
    "model.pretrained=false",
    "model.img_size=24",
    "model.drop_path_rate=0.0",
    "optim.lr=3e-3",
]
STUDENT = [*TINY_OVERRIDES, "model.name=deit_tiny_distilled_patch16_224", "optim.lr=2e-3"]


def make_pattern_images(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """Stripe and checker textures at random phases: learnable by a CNN (whose global pooling
    cannot tell the position of conftest's bars) and by a ViT alike."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    for name in PATTERNS:
        for k in range(per_class):
            phase_r, phase_c = rng.integers(0, 8, size=2)
            bands_r, bands_c = ((rows + phase_r) // 4) % 2, ((cols + phase_c) // 4) % 2
            pattern = {"a": bands_r, "b": bands_c, "c": bands_r ^ bands_c}[name]
            image = 0.6 * pattern + rng.uniform(0, 0.4, size=(size, size))
            write_image(root / name / f"{k:04d}.png", np.round(image * 255).astype(np.uint8))
    return root


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def last_value(run: Path, key: str) -> float:
    return [float(r[key]) for r in metrics_rows(run) if r.get(key)][-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    make_pattern_images(root / "images", per_class=20)
    (root / "base.yaml").write_text(
        f"data:\n  root: {root / 'images'}\n  batch_size: 8\n  val_fraction: 0.25\n"
        "augment:\n  preset: none\n"
    )
    return root


@pytest.fixture(scope="module")
def teacher_run(workspace: Path) -> Path:
    result = run_cli(
        "finetune",
        "base.yaml",
        *TEACHER,
        "trainer.max_epochs=6",
        "logging.name=teacher",
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace / "runs" / "teacher"


@pytest.mark.slow
def test_distill_from_a_finetuned_cnn_run(workspace, teacher_run):
    result = run_cli(
        "distill",
        "base.yaml",
        *STUDENT,
        "distill.teacher.name=test_resnet",
        f"distill.teacher.pretrained={teacher_run}",
        "distill.type=hard",
        "trainer.max_epochs=3",
        "logging.name=student",
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = workspace / "runs" / "student"
    assert "teacher: test_resnet from" in result.stdout and "24x24 px" in result.stdout

    # The teacher, seen through the student's 32 px batches, is as good as in its own run.
    teacher_acc = max(float(r["val/acc1"]) for r in metrics_rows(teacher_run) if r.get("val/acc1"))
    assert teacher_acc > 0.6  # 3 classes: chance is 1/3
    assert abs(last_value(run, "val/acc1_teacher") - teacher_acc) <= 0.1
    for key in ("val/acc1", "val/acc1_cls", "val/acc1_dist"):  # averaged and per-head top-1
        assert 0.0 <= last_value(run, key) <= 1.0, key
    losses = [float(r["train/loss_dist"]) for r in metrics_rows(run) if r.get("train/loss_dist")]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the student learns to follow it

    # The export is the timm student (both heads) and predicts their average; no teacher inside.
    state = load_file(str(run / "model.safetensors"))
    assert {"head.weight", "head_dist.weight", "dist_token"} <= set(state)
    assert not any(k.startswith(("teacher", "model.")) for k in state)
    student = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        num_classes=3,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    student.load_state_dict(state)  # strict
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])


def test_mismatched_teacher_classes_exit_2_with_one_line(workspace, teacher_run):
    make_class_images(workspace / "other", {"a": 4, "b": 4, "d": 4}, size=32)  # no c, a d
    result = run_cli(
        "distill",
        "base.yaml",
        *STUDENT,
        f"data.root={workspace / 'other'}",
        "distill.teacher.name=test_resnet",
        f"distill.teacher.pretrained={teacher_run}",
        "logging.name=mismatch",
        cwd=workspace,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not in the teacher ['d']" in lines[0] and "only in the teacher ['c']" in lines[0]


def test_random_teacher_exits_2(workspace):
    result = run_cli(
        "distill",
        "base.yaml",
        *STUDENT,
        "distill.teacher.name=test_resnet",
        "distill.teacher.pretrained=false",
        cwd=workspace,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "random teacher" in result.stderr
