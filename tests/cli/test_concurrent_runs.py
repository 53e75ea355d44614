"""Two `trainer.resume_from=auto` runs with the same name: the second stops in one line naming
the first one's PID and touches nothing; after the first is killed with SIGKILL (its lock left
behind) a new run takes the stale lock over and continues the run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from ckpt_helpers import load, one_line_error, start_cli, step_of, wait_until
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, read_metrics, tiny, write_recipe

from vittune.training.run_lock import LOCK_NAME


def files_at_rest(run_dir: Path, busy_writer: int) -> list[str]:
    """The run folder's names, leaving out what the running first run rewrites as it goes: its
    last.ckpt and the temp files (`.<name>.<pid>.<random>.tmp`) it is writing at this moment."""
    return sorted(
        p.name
        for p in run_dir.rglob("*")
        if p.name != "last.ckpt" and not (p.name.endswith(".tmp") and f".{busy_writer}." in p.name)
    )


@pytest.mark.slow
def test_a_second_auto_resume_on_a_busy_folder_stops_and_a_stale_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    make_class_images(tmp_path / "data", {"a": 20, "b": 20}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    args = [
        "finetune",
        str(recipe),
        *tiny("data.batch_size=2", "trainer.log_every_n_steps=1"),
        "logging.name=pre",
        "trainer.resume_from=auto",
    ]
    run_dir = tmp_path / "runs" / "pre"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = start_cli(*args, "trainer.max_epochs=200", cwd=tmp_path, log=tmp_path / "first")
    try:
        wait_until(lambda: step_of(last) >= 1, first, timeout=300)
        before = files_at_rest(run_dir, busy_writer=first.pid)
        second = run_cli(*args, "trainer.max_epochs=200", cwd=tmp_path, env=ONE_THREAD)
        line = one_line_error(second)
        assert f"runs/pre is in use by another vittune run (PID {first.pid})" in line
        assert first.poll() is None  # the first run goes on
        after = files_at_rest(run_dir, busy_writer=first.pid)
        assert after == before  # the second run wrote and deleted nothing there
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert (run_dir / LOCK_NAME).is_file()  # SIGKILL leaves it behind
    stopped = load(last)["global_step"]
    epoch = load(last)["epoch"]
    third = run_cli(*args, f"trainer.max_epochs={epoch + 2}", cwd=tmp_path, env=ONE_THREAD)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert f"at step {stopped}" in third.stdout  # it resumed the killed run's checkpoint
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss_step")]
    assert steps[-1] + 1 == load(last)["global_step"] > stopped
