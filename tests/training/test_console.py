"""What `vittune` prints, and what a run leaves for people to read: epoch lines in a file, no
third-party noise, the W&B summary's best values, top-k checkpoint names, the best confusion
matrix. One real CLI run with stdout piped (the non-terminal case) serves every check."""

from __future__ import annotations

import io
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, RECIPES, column, read_metrics, tiny
from PIL import Image
from wandb_log import wandb_records

from vittune.training.console import EpochLines, console_callbacks

EPOCHS = 3
LINE = re.compile(
    r"epoch (\d+)/2  train/loss (\S+)  val/loss (\S+)  val/acc1 (\S+)  val/auroc (\S+)"
    r"  val/f1 (\S+)  lr (\d\.\de[-+]\d\d)  \d+\.\d s"
)
NOISE = (
    "Tip:",
    "litlogger",
    "GPU available",
    "TPU available",
    "Total FLOPs",
    "LeafSpec",
    "anonymous setting",
    "weights_only",
    "Loading `train_dataloader`",
    "`Trainer.fit` stopped",
)


def wandb_summary(run_dir: Path) -> dict:
    """The summary an offline W&B run recorded, from its `.wandb` transaction log (wandb 0.31
    writes no `files/wandb-summary.json` for offline runs)."""
    summary = {}
    for record in wandb_records(run_dir):
        for item in record.summary.update if record.HasField("summary") else []:
            summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return summary


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory):
    """Three epochs with stdout and stderr piped, W&B offline, two best checkpoints kept; the
    validation folder lacks class c, so vittune's own note (AUROC undefined) must show."""
    work = tmp_path_factory.mktemp("console")
    make_class_images(work / "data" / "train", {"a": 16, "b": 16, "c": 16})
    make_class_images(work / "data" / "val", {"a": 8, "b": 8}, seed=1)
    overrides = tiny(
        "data.builtin=null",
        "data.root=data",
        "data.batch_size=8",
        "trainer.max_epochs=3",
        "checkpoint.save_top_k=2",
        "logging.name=piped",
        "logging.wandb=true",
        drop=("logging.wandb",),
    )
    # Warnings as a user gets them (the helpers ignore them), W&B as chatty as it gets.
    env = {**ONE_THREAD, "PYTHONWARNINGS": "", "WANDB_SILENT": "false"}
    result = run_cli("finetune", str(RECIPES / "quickstart.yaml"), *overrides, cwd=work, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "piped", result.stdout, result.stderr


def test_one_plain_line_per_epoch(piped_run) -> None:
    run_dir, stdout, stderr = piped_run
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == EPOCHS, stdout
    rows = read_metrics(run_dir)
    logged = {name: column(rows, name) for name in ("train/loss_epoch", "val/loss", "val/acc1")}
    for epoch, line in enumerate(lines):
        match = LINE.fullmatch(line)
        assert match, line
        assert int(match[1]) == epoch
        assert float(match[2]) == pytest.approx(logged["train/loss_epoch"][epoch], abs=1e-3)
        assert float(match[3]) == pytest.approx(logged["val/loss"][epoch], abs=1e-3)
        assert float(match[4]) == pytest.approx(logged["val/acc1"][epoch], abs=1e-3)
        assert match[5] == "nan"  # no validation image of class c
    assert "\x1b[" not in stdout + stderr  # no colour or cursor codes in a file
    assert "\r" not in stdout  # and no progress-bar frames
    assert "  model: " in stdout and "parameters" in stdout


def test_third_party_noise_is_gone_and_vittunes_own_notes_stay(piped_run) -> None:
    _, stdout, stderr = piped_run
    for noise in NOISE:
        assert noise not in stdout + stderr, noise
    assert stdout.count("W&B is logging offline") == 1
    assert "wandb sync" in stdout and "wandb:" not in stdout + stderr
    assert "val/auroc is NaN: classes ['c'] have no val image" in stderr


def test_wandb_summary_holds_the_best_epoch(piped_run) -> None:
    run_dir, _, _ = piped_run
    rows = [r for r in read_metrics(run_dir) if r.get("val/acc1")]
    accuracy = [float(r["val/acc1"]) for r in rows]
    best = accuracy.index(max(accuracy))  # the first of equal scores stays the best
    summary = wandb_summary(run_dir)
    assert summary["best/epoch"] == int(rows[best]["epoch"]) == best
    for name in ("val/acc1", "val/loss", "val/f1"):
        assert summary[f"best/{name}"] == pytest.approx(float(rows[best][name]), rel=1e-5)


def test_top_k_checkpoints_are_named_by_epoch_and_score(piped_run) -> None:
    run_dir, _, _ = piped_run
    rows = [r for r in read_metrics(run_dir) if r.get("val/acc1")]
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("best*.ckpt"))
    assert len(names) == 2, names
    for name in names:
        match = re.fullmatch(r"best-epoch=(\d\d)-val_acc1=(\d\.\d{4})\.ckpt", name)
        assert match, name
        assert float(match[2]) == pytest.approx(float(rows[int(match[1])]["val/acc1"]), abs=1e-4)
    assert (run_dir / "model.safetensors").is_file()


def test_confusion_matrix_is_the_best_epochs(piped_run) -> None:
    run_dir, _, _ = piped_run
    summary = wandb_summary(run_dir)
    with Image.open(run_dir / "confusion_matrix.png") as figure:
        title = figure.info["Title"]
    assert title == (
        f"validation, epoch {summary['best/epoch']} (best val/acc1 {summary['best/val/acc1']:.4f})"
    )


def test_version() -> None:
    result = run_cli("--version", cwd=Path.cwd())
    assert result.returncode == 0 and result.stdout == f"vittune {version('vittune')}\n"


def test_a_terminal_gets_lightnings_bar_and_a_file_gets_epoch_lines() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not any(isinstance(c, EpochLines) for c in console_callbacks(Terminal()))
    assert any(isinstance(c, EpochLines) for c in console_callbacks(io.StringIO()))
