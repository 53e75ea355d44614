"""Checkpoints survive what kills runs: kill -9 at random moments (also mid-write), and a
metric that stops improving never leaves last.ckpt behind."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from ckpt_helpers import (
    best_score,
    cli_env,
    fingerprint,
    load,
    one_line_error,
    start_cli,
    step_of,
    wait_until,
)
from conftest import TINY_VIT, make_class_images, run_cli
from helpers import ONE_THREAD, column, read_metrics, run_in_process, tiny, write_recipe
from PIL import Image
from safetensors.torch import load_file

from vittune.files import atomic_write
from vittune.models.weights import read_state_dict
from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import build
from vittune.training.checkpointing import LatestCheckpoint
from vittune.training.trainer import build_trainer

# Saves a 16 MB tensor that holds its own sequence number, as fast as it can, through the
# same atomic write the checkpoint plugin uses; says "ready" after the first save.
SAVER = """
import sys, torch
from pathlib import Path
from vittune.files import atomic_write
target, first = Path(sys.argv[1]), int(sys.argv[2]) + 1
for n in range(first, first + 10_000):
    content = {"n": n, "weights": torch.full((4_000_000,), float(n))}
    atomic_write(target, lambda temp: torch.save(content, temp))
    if n == first:
        print("ready", flush=True)
"""


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    # $TMPDIR on another filesystem (tmpfs) than the checkpoint: the write must not use it.
    other_fs = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
    env = {**cli_env(TMPDIR=other_fs), **ONE_THREAD}
    seen, orphans_after_kill = 0, 0
    for _ in range(3):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(target), str(seen)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert saver.stdout.readline() == "ready\n"  # the next saves overwrite the first
        time.sleep(rng.uniform(0.05, 0.6))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        orphans_after_kill += len(list(target.parent.glob(".last.ckpt.*.tmp")))
        content = load(target)  # loadable after every kill, with a consistent content
        assert torch.equal(content["weights"], torch.full((4_000_000,), float(content["n"])))
        assert content["n"] > seen  # and it is the newest completed save
        seen = content["n"]
    # Kills did land mid-write (they left a temp file), and the next write sweeps it away.
    assert orphans_after_kill >= 1
    atomic_write(target, lambda temp: torch.save({"n": seen + 1}, temp))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch run whose learning rate is too small to change val/acc1 after epoch 0."""
    work = tmp_path_factory.mktemp("plateau")
    make_class_images(work / "data", {"a": 12, "b": 12}, size=32)
    recipe = write_recipe(
        work / "r.yaml", {"data": {"root": str(work / "data"), "val_fraction": 0.25}}
    )
    result = run_cli(
        "finetune",
        str(recipe),
        *tiny("data.batch_size=4", "optim.lr=1e-9", "trainer.max_epochs=3"),
        "logging.name=plateau",
        cwd=work,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return work


def test_last_ckpt_is_the_final_epoch_when_the_metric_stopped_improving(plateau_run: Path):
    checkpoints = plateau_run / "runs" / "plateau" / "checkpoints"
    scores = column(read_metrics(plateau_run / "runs" / "plateau"), "val/acc1")
    assert len(scores) == 3 and len(set(scores)) == 1  # no improvement after epoch 0
    best, last = load(checkpoints / "best.ckpt"), load(checkpoints / "last.ckpt")
    steps_per_epoch = 18 // 4  # 18 training images in batches of 4, the partial one dropped
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 3 * steps_per_epoch
    assert best_score(last) == scores[0]
    assert figure_title(plateau_run / "runs" / "plateau") == (
        f"validation, epoch 0 (best val/acc1 {scores[0]:.4f})"
    )


def figure_title(run_dir: Path) -> str:
    with Image.open(run_dir / "confusion_matrix.png") as figure:
        return figure.info["Title"]


def test_resume_into_a_new_folder_keeps_the_best_of_the_earlier_epochs(plateau_run: Path):
    old = plateau_run / "runs" / "plateau"
    result = run_cli(
        "finetune",
        str(plateau_run / "r.yaml"),
        *tiny("data.batch_size=4", "optim.lr=1e-9", "trainer.max_epochs=4"),
        f"trainer.resume_from={old / 'checkpoints' / 'last.ckpt'}",
        "logging.name=more",
        cwd=plateau_run,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    new = plateau_run / "runs" / "more"
    # Epoch 3 did not beat epoch 0: the best stays epoch 0's, copied into the new folder,
    # and the export is epoch 0's weights, not the last epoch's.
    assert load(new / "checkpoints" / "best.ckpt")["epoch"] == 0
    assert load(new / "checkpoints" / "last.ckpt")["epoch"] == 3
    exported = load_file(str(new / "model.safetensors"))
    epoch0 = read_state_dict(old / "checkpoints" / "best.ckpt")
    assert all(torch.equal(exported[k], epoch0[k]) for k in exported)
    # The figure too is epoch 0's, drawn from the counts the checkpoint kept.
    assert figure_title(new) == figure_title(old)


def test_resume_past_max_epochs_or_max_steps_is_one_line_and_changes_nothing(plateau_run: Path):
    # The plateau run finished 3 epochs (epochs 0-2) at step 12. Before: max_epochs=1 was
    # Lightning's traceback, max_epochs=2 exported as if the run had ended at epoch 1; both
    # after recipe.yaml and csv/hparams.yaml had been rewritten (and a new folder left half made).
    last = plateau_run / "runs" / "plateau" / "checkpoints" / "last.ckpt"
    args = ["finetune", "r.yaml", *tiny("data.batch_size=4", "optim.lr=1e-9")]
    before = fingerprint(plateau_run / "runs")
    same_folder = ["trainer.resume_from=auto", "logging.name=plateau"]
    result = run_cli(*args, *same_folder, "trainer.max_epochs=2", cwd=plateau_run, env=ONE_THREAD)
    assert one_line_error(result) == (
        "vittune: error: trainer.resume_from runs/plateau/checkpoints/last.ckpt already finished"
        " epoch 2 (3 epochs), more than trainer.max_epochs=2; set trainer.max_epochs above 3 to"
        " train on from it"
    )
    new_folder = [f"trainer.resume_from={last}", "logging.name=fewer"]
    for overrides, expected in [
        ([*new_folder, "trainer.max_epochs=1"], "more than trainer.max_epochs=1;"),
        (
            [*same_folder, "trainer.max_epochs=5", "trainer.max_steps=11"],
            "is already at step 12, past trainer.max_steps=11; set trainer.max_steps above 12",
        ),
    ]:
        assert expected in one_line_error(run_in_process(*args, *overrides, cwd=plateau_run))
    assert fingerprint(plateau_run / "runs") == before  # byte-identical, no new folder

    # Reaching the limit exactly trains nothing and goes on to the export: how a run stopped
    # after training, before its export, is finished (the stop message says to do this).
    shutil.copytree(plateau_run / "runs" / "plateau", plateau_run / "runs" / "again")
    rows = len(read_metrics(plateau_run / "runs" / "again"))
    result = run_cli(
        *args,
        "trainer.resume_from=auto",
        "logging.name=again",
        "trainer.max_epochs=3",
        cwd=plateau_run,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (
        "  it already reached trainer.max_epochs=3: nothing left to train; it goes on to the test"
        " and the export (raise trainer.max_epochs to train on)"
    ) in result.stdout.splitlines()
    assert not [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert load(plateau_run / "runs" / "again" / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert len(read_metrics(plateau_run / "runs" / "again")) == rows  # no epoch trained
    assert (plateau_run / "runs" / "again" / "model.safetensors").is_file()


@pytest.mark.slow
def test_kill_9_mid_training_then_auto_resume_finishes_the_run(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 30, "b": 30}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    args = [
        "finetune",
        str(recipe),
        *tiny("data.batch_size=2", "trainer.max_epochs=3", "checkpoint.every_n_steps=1"),
        "logging.name=crash",
    ]
    checkpoints = tmp_path / "runs" / "crash" / "checkpoints"
    run = start_cli(*args, cwd=tmp_path, log=tmp_path / "first")
    seen = set()  # the steps last.ckpt held while polling

    def step_30_or_more() -> bool:
        seen.add(step_of(checkpoints / "last.ckpt"))
        return max(seen) >= 30  # into epoch 1

    wait_until(step_30_or_more, run)
    run.send_signal(signal.SIGKILL)  # saving every step: it often lands mid-write
    run.wait()
    assert any(step % 24 for step in seen if step > 0)  # every_n_steps: saves inside epochs
    before = load(checkpoints / "last.ckpt")["global_step"]
    assert 30 <= before < 72 and load(checkpoints / "best.ckpt")["epoch"] == 0
    result = run_cli(*args, "trainer.resume_from=auto", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"at step {before}" in result.stdout  # continued from the newest checkpoint
    assert load(checkpoints / "last.ckpt")["global_step"] == 3 * 24  # 48 images, batches of 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["crash"]


def same_content(a: object, b: object) -> bool:
    """Deep equality of two loaded checkpoints (tensors by value, NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_content(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b or (a != a and b != b)


def test_last_ckpt_linked_to_a_new_best_holds_what_its_own_save_would(tmp_path: Path) -> None:
    """At an epoch that sets a new best, last.ckpt becomes a hard link to the best file just
    written (one serialisation and fsync instead of two); at an epoch that does not, it is
    written. The link's content equals that of a run identical but for the link."""
    make_class_images(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    recipe = Recipe.model_validate(
        {
            "model": {**TINY_VIT, "drop_path_rate": 0.0},
            "data": {"root": str(tmp_path / "data"), "batch_size": 4, "num_workers": 0},
            "augment": {"preset": "none"},
            "optim": {"lr": 1e-12},  # val/acc1 never improves after epoch 0
            "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1}
            | {"precision": "32-true"},
            "logging": {"wandb": False},
        }
    )
    linked_after: dict[int, bool] = {}

    class LinkState(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            folder = tmp_path / "run" / "checkpoints"
            if trainer.current_epoch:
                linked_after[trainer.current_epoch - 1] = os.path.samefile(
                    folder / "last.ckpt", folder / "best.ckpt"
                )

    def fit(run: str, epochs: int, link: bool, extra: list[L.Callback]) -> Path:
        L.seed_everything(0)
        assembly = build(recipe.model_copy(deep=True), "finetune")
        trainer, _, _ = build_trainer(recipe, tmp_path / run, ("val/acc1", "max"), extra)
        trainer.fit_loop.max_epochs = epochs
        if not link:
            next(c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)).best = None
        trainer.fit(assembly.task, datamodule=assembly.datamodule)
        return tmp_path / run / "checkpoints"

    folder = fit("run", 2, True, [LinkState()])
    assert linked_after == {0: True}  # epoch 0: a new best, linked
    assert not os.path.samefile(folder / "last.ckpt", folder / "best.ckpt")  # epoch 1: written
    assert load(folder / "last.ckpt")["epoch"] == 1 and load(folder / "best.ckpt")["epoch"] == 0

    linked, written = fit("one", 1, True, []), fit("other", 1, False, [])
    assert os.path.samefile(linked / "last.ckpt", linked / "best.ckpt")
    assert not os.path.samefile(written / "last.ckpt", written / "best.ckpt")
    first, second = load(linked / "last.ckpt"), load(written / "last.ckpt")
    for state in (first, second):  # the folder names differ, and only they
        state["callbacks"] = {k: {**v, "dirpath": None} for k, v in state["callbacks"].items()}
        for key in ("best_model_path", "kth_best_model_path", "best_k_models", "last_model_path"):
            for v in state["callbacks"].values():
                v.pop(key, None)
    assert same_content(first, second)
