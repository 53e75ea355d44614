"""Preemption: SIGTERM and SIGUSR1 stop a `vittune finetune` subprocess with a checkpoint of
the step it was on (no work lost), exit 143 / 138, and `trainer.resume_from: auto` finishes
the run in the same folder, the same W&B run, with the global step and best score kept."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from ckpt_helpers import (
    best_score,
    fingerprint,
    load,
    one_line_error,
    start_cli,
    stderr_of,
    step_of,
    wait_until,
)
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, column, read_metrics, tiny, write_recipe

STEPS_PER_EPOCH = 32  # 64 training images in batches of 2
EPOCHS = 3


def train_steps(run_dir: Path) -> list[int]:
    """The steps of the training-loss rows of metrics.csv, in file order."""
    return [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss_step")]


def stop_with(signum: int, args: list[str], cwd: Path, log: Path, after_step: int) -> int:
    """Start the run, send `signum` once last.ckpt holds `after_step` or more, and return the
    step the run says it stopped at (after checking the exit code and the message)."""
    last = cwd / "runs" / "pre" / "checkpoints" / "last.ckpt"
    run = start_cli(*args, cwd=cwd, log=log)
    wait_until(lambda: step_of(last) >= after_step, run)
    run.send_signal(signum)
    assert run.wait(timeout=120) == 128 + signum
    message = stderr_of(log).strip().splitlines()[-1]
    name = signal.Signals(signum).name
    found = re.fullmatch(
        rf"vittune: stopped by {name} at step (\d+); .*resume_from=auto.*", message
    )
    assert found, stderr_of(log)[-3000:]
    return int(found.group(1))


def epoch_seconds(stdout: str) -> list[tuple[int, float, bool]]:
    """(epoch, seconds, whether the line says it timed only the part after a resume) for each
    epoch line."""
    found = [
        re.fullmatch(r"epoch (\d+)/\d+  .*  (\d+\.\d) s( \(part after the resume\))?", line)
        for line in stdout.splitlines()
        if line.startswith("epoch ")
    ]
    assert all(found), stdout
    return [(int(m.group(1)), float(m.group(2)), bool(m.group(3))) for m in found]


@pytest.mark.slow
def test_sigterm_and_sigusr1_lose_no_step_and_auto_resume_finishes(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 40, "b": 40}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    args = [
        "finetune",
        str(recipe),
        *tiny("data.batch_size=2", f"trainer.max_epochs={EPOCHS}", "trainer.log_every_n_steps=1"),
        "logging.name=pre",
        "trainer.resume_from=auto",  # the first run finds no checkpoint and starts fresh
    ]
    # W&B (offline, WANDB_MODE) from the second process on: its run id must survive a resume.
    wandb = ["logging.wandb=true"]
    run_dir = tmp_path / "runs" / "pre"
    last = run_dir / "checkpoints" / "last.ckpt"
    began = time.monotonic()

    # SIGTERM once epoch 0 has ended (its checkpoint exists): the run is inside epoch 1.
    stopped = stop_with(signal.SIGTERM, args, tmp_path, tmp_path / "first", STEPS_PER_EPOCH)
    assert STEPS_PER_EPOCH < stopped < EPOCHS * STEPS_PER_EPOCH
    assert load(last)["global_step"] == stopped  # the checkpoint holds the step it stopped at
    assert max(train_steps(run_dir)) + 1 == stopped  # every trained step is in it: none lost
    best_before = best_score(load(last))
    (epoch, _, part), *_ = epoch_seconds((tmp_path / "first.out").read_text())
    assert (epoch, part) == (0, False)  # a whole epoch in this process: plain seconds

    # Fewer epochs than the checkpoint began: one line before anything is written (before:
    # exit 0 with an export of the stopped weights, recipe.yaml saying max_epochs 1).
    before = fingerprint(tmp_path / "runs")
    refused = run_cli(*args, "trainer.max_epochs=1", cwd=tmp_path, env=ONE_THREAD)
    assert (
        "last.ckpt was saved inside epoch 1 (epochs count from 0), past trainer.max_epochs=1;"
        " set trainer.max_epochs to 2 or more to finish that epoch"
    ) in one_line_error(refused)
    assert fingerprint(tmp_path / "runs") == before

    # SIGUSR1 (SLURM's warning signal) on the resumed run, after it trained further.
    stopped_again = stop_with(
        signal.SIGUSR1, args + wandb, tmp_path, tmp_path / "second", stopped + 1
    )
    assert load(last)["global_step"] == stopped_again > stopped
    # The epoch resumed inside times this process's part of it, and says so (it printed
    # time.monotonic() - 0.0: the machine's uptime).
    (epoch, seconds, part), *_ = epoch_seconds((tmp_path / "second.out").read_text())
    assert seconds < time.monotonic() - began
    assert (epoch, part) == (1, stopped % STEPS_PER_EPOCH > 0)

    started = time.monotonic()
    result = run_cli(*args, *wandb, cwd=tmp_path, env=ONE_THREAD)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (epoch, seconds, part), *more = epoch_seconds(result.stdout)
    assert seconds < wall
    assert (epoch, part) == (2, stopped_again % STEPS_PER_EPOCH > 0) and not more
    assert f"resuming runs/pre/checkpoints/last.ckpt at step {stopped_again}" in result.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pre"]  # one folder
    final = load(last)
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH  # the same total as one run
    # Each step trained (and logged) exactly once over the three processes.
    assert train_steps(run_dir) == list(range(EPOCHS * STEPS_PER_EPOCH))
    # The best score is over all epochs, the interrupted runs' included.
    val = column(read_metrics(run_dir), "val/acc1")
    assert len(val) == EPOCHS and best_score(final) == max(val) >= best_before
    # Both W&B processes logged into one W&B run: the id kept in the run folder.
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{wandb_id}") for name in runs)


def test_a_stop_during_validation_lets_it_finish(tmp_path: Path) -> None:
    # One training step, then 40 one-image validation batches per epoch: a signal sent while
    # the run is going almost always lands in a validation.
    make_class_images(tmp_path / "data", {"a": 40, "b": 40}, size=32)
    data = {"root": str(tmp_path / "data"), "val_fraction": 0.5, "eval_batch_size": 1}
    recipe = write_recipe(tmp_path / "r.yaml", {"data": data})
    args = [
        "finetune",
        str(recipe),
        *tiny("data.batch_size=2", "trainer.limit_train_batches=1", "trainer.max_epochs=4"),
        "logging.name=pre",
        "trainer.resume_from=auto",
    ]
    stop_with(signal.SIGTERM, args, tmp_path, tmp_path / "first", after_step=1)
    result = run_cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # Every epoch was validated once: none was cut short and skipped on resume.
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "runs" / "pre") if r.get("val/acc1")]
    assert epochs == ["0", "1", "2", "3"]
