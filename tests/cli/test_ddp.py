"""Two-process DDP on CPU through the real console script (Lightning re-launches it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, column, held_out, read_metrics, tiny, write_recipe
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score

from vittune.recipe.load import load_recipe
from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import Assembly, build


@pytest.mark.slow
def test_two_process_ddp_on_cpu_completes_a_fit(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 20, "b": 20}, size=32)
    recipe = write_recipe(
        tmp_path / "ddp.yaml",
        {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2, "batch_size": 4}},
    )
    overrides = tiny(
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "logging.name=ddp",
        # weights held still and every forward deterministic, so train/loss_epoch has one
        # right value to compare with: lr 1e-12, no augmentation, no drop path
        "optim.lr=1e-12",
        "augment.preset=none",
        "model.drop_path_rate=0",
    )
    result = run_cli("finetune", str(recipe), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("vittune finetune: done.") == 1  # rank 0 alone reports and exports
    # Both processes used one run folder (shared through VITTUNE_RUN_DIR): no ddp-2 appeared.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    run_dir = tmp_path / "runs" / "ddp"
    for name in (
        "recipe.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["label_names"] == ["a", "b"]
    # The second process really ran: each rank saw half the training images,
    # 16 of 32 in batches of 4 -> 4 steps per epoch.
    train_images = 2 * (20 - held_out(20, 0.2))
    steps_per_epoch = train_images // 2 // 4
    rows = read_metrics(run_dir)
    assert max(column(rows, "step")) + 1 == 2 * steps_per_epoch
    assert len(column(rows, "val/acc1")) == 2
    # train/loss_epoch is the mean over both processes' images, not rank 0's half of them
    expected = training_set_loss(run_dir)
    assert column(rows, "train/loss_epoch") == pytest.approx([expected] * 2, abs=1e-5)


def training_set_loss(run_dir: Path) -> float:
    """Cross-entropy of the last checkpoint's weights over every training image, computed in
    one process (normalised as the task does, without its loss function)."""
    recipe, assembly, _ = last_checkpoint(run_dir)
    task = assembly.task.eval()
    with torch.no_grad():
        batches = [
            task.on_after_batch_transfer(b, 0) for b in assembly.datamodule.train_dataloader()
        ]
        logits = torch.cat([task.model(images) for images, _ in batches])  # [N, K]
        targets = torch.cat([labels for _, labels in batches])  # [N]
    assert len(targets) == 32  # every training image once
    smoothing = recipe.loss.label_smoothing
    return F.cross_entropy(logits, targets, label_smoothing=smoothing).item()


def last_checkpoint(run_dir: Path) -> tuple[Recipe, Assembly, int]:
    """The run's recipe, its task and data built in this process with last.ckpt's weights,
    and that checkpoint's epoch."""
    recipe = load_recipe(run_dir / "recipe.yaml", [], command="finetune")
    assembly = build(recipe, "finetune", run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assembly.task.load_state_dict(checkpoint["state_dict"])
    return recipe, assembly, checkpoint["epoch"]


def sklearn_scores(run_dir: Path) -> tuple[int, dict[str, float]]:
    """(epoch, scores): scikit-learn on one process's predictions of the last checkpoint,
    every validation image once."""
    _, assembly, epoch = last_checkpoint(run_dir)
    model = assembly.task.model.eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in assembly.datamodule.val_dataloader()]
    logits = torch.cat([p for p, _ in pairs])  # [N, K]
    targets = torch.cat([y for _, y in pairs])  # [N]
    y, probs = targets.numpy(), logits.softmax(-1).numpy()
    labels = np.arange(probs.shape[1])
    return epoch, {
        "images": len(y),
        "val/acc1": accuracy_score(y, probs.argmax(1)),
        "val/acc5": top_k_accuracy_score(y, probs, k=5, labels=labels),
        "val/f1": f1_score(y, probs.argmax(1), average="macro"),
        "val/auroc": roc_auc_score(y, probs, multi_class="ovr", labels=labels),
        "val/loss": F.cross_entropy(logits, targets).item(),
    }


@pytest.mark.slow
def test_validation_numbers_are_one_process_numbers_at_any_number_of_processes(
    tmp_path: Path,
) -> None:
    """21 validation images (7 classes x 3) on 2 processes: 11 and 10, none counted twice; a
    first validation batch of one class. Logged numbers equal scikit-learn on the same weights."""
    make_class_images(tmp_path / "data", {c: 15 for c in "abcdefg"}, size=32)
    recipe = write_recipe(
        tmp_path / "odd.yaml",
        {
            "data": {
                "root": str(tmp_path / "data"),
                "val_fraction": 0.2,
                "batch_size": 8,
                "eval_batch_size": 2,
            }
        },
    )
    for devices in (1, 2):
        overrides = tiny(
            f"trainer.strategy={'ddp' if devices > 1 else 'auto'}",
            f"trainer.devices={devices}",
            "trainer.max_epochs=2",
            f"logging.name=ddp{devices}",
        )
        result = run_cli("finetune", str(recipe), *overrides, cwd=tmp_path, env=ONE_THREAD)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run_dir = tmp_path / "runs" / f"ddp{devices}"
        epoch, expected = sklearn_scores(run_dir)
        assert expected.pop("images") == 7 * held_out(15, 0.2) == 21
        logged = [
            r for r in read_metrics(run_dir) if r.get("val/acc1") and int(r["epoch"]) == epoch
        ]
        assert len(logged) == 1
        for name, value in expected.items():
            assert float(logged[0][name]) == pytest.approx(value, abs=1e-5), (devices, name)
