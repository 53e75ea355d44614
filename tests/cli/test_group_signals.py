"""A scheduler signals the whole process group (SLURM `--signal=SIGUSR1@90` reaches every
process of the job step, DataLoader workers included): the run still stops at a step with a
checkpoint of that step, exits 128 + signum with one line, and loses no step; also under
two-process DDP (Lightning's own handler paired its in-handler broadcast wrongly and hung)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ckpt_helpers import cli_env, load, stderr_of, step_of, wait_until
from conftest import VITTUNE, make_class_images
from helpers import read_metrics, tiny, write_recipe


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(entry.name))
    return members


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "signum"), [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_a_signal_to_the_process_group_with_workers_loses_no_step(
    tmp_path: Path, devices: int, signum: int
) -> None:
    make_class_images(tmp_path / "data", {"a": 40, "b": 40}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    ddp = ["trainer.strategy=ddp", f"trainer.devices={devices}"] if devices > 1 else []
    args = [
        "finetune",
        str(recipe),
        *tiny("data.batch_size=2", "trainer.max_epochs=40", "trainer.log_every_n_steps=1"),
        "data.num_workers=2",  # persistent workers: alive when the signal comes
        *ddp,
        "logging.name=pre",
        "trainer.resume_from=auto",
    ]
    log = tmp_path / "run"
    run = subprocess.Popen(
        [VITTUNE, *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=log.with_suffix(".out").open("w"),
        stderr=log.with_suffix(".err").open("w"),
        start_new_session=True,  # its own process group, as a job step has
    )
    last = tmp_path / "runs" / "pre" / "checkpoints" / "last.ckpt"
    try:
        wait_until(lambda: step_of(last) >= 1, run, timeout=300)
        time.sleep(1)  # into the next epoch
        # the trainer(s) and at least two workers per trainer get the signal
        assert len(group_members(run.pid)) >= 3 * devices
        os.killpg(run.pid, signum)
        code = run.wait(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert code == 128 + signum, stderr_of(log)[-3000:]
    lines = [line for line in stderr_of(log).splitlines() if line.startswith("vittune:")]
    name = signal.Signals(signum).name
    assert len(lines) == 1, stderr_of(log)[-3000:]  # one line, from rank 0 only
    found = re.fullmatch(
        rf"vittune: stopped by {name} at step (\d+); .*resume_from=auto.*", lines[0]
    )
    assert found, lines
    stopped = int(found.group(1))
    assert load(last)["global_step"] == stopped  # the stop checkpoint was written at that step
    trained = [int(r["step"]) for r in read_metrics(last.parents[1]) if r.get("train/loss_step")]
    assert max(trained) + 1 == stopped  # every trained step is in it: 0 steps lost
    deadline = time.monotonic() + 10  # no worker or rank outlives the run
    while group_members(run.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(run.pid) == []
