"""Which trials still count, and which running trials belong to a dead worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import write_recipe

from vittune.errors import RecipeError
from vittune.recipe.load import load_recipe
from vittune.search.study import (
    FAIL_REASON,
    RETRY_OF,
    heartbeat,
    open_storage,
    open_study,
    reap_dead,
    remaining,
)


def journal_study(tmp_path: Path) -> optuna.Study:
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", {"data": {"builtin": "digits"}}),
        ["sweep.space={optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}", "sweep.sampler=random"],
    )
    study, created = open_study(
        "s", open_storage(None, tmp_path), recipe.sweep, "maximize", seed=0, max_epochs=3
    )
    assert created
    return study


def running(study: optuna.Study, **attrs) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def test_dead_workers_trials_are_failed_and_queued_again(tmp_path: Path) -> None:
    study = journal_study(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host, now = socket.gethostname(), time.time()
    dead_here = running(study, host=host, pid=int(gone.stdout), heartbeat=now)
    silent_there = running(study, host="other-node", pid=1, heartbeat=now - 100)
    alive_there = running(study, host="other-node", pid=1, heartbeat=now - 10)
    alive_here = running(study, host=host, pid=os.getpid(), heartbeat=now - 10)
    assert remaining(study, 6) == 2  # four running trials count against the target

    reaped = reap_dead(study, heartbeat_s=30)  # 100 s > 3 x 30 s; 10 s is not
    assert sorted(reaped) == sorted([dead_here.number, silent_there.number])
    states = {t.number: t.state.name for t in study.trials}
    assert states[dead_here.number] == states[silent_there.number] == "FAIL"
    assert states[alive_there.number] == states[alive_here.number] == "RUNNING"
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs[RETRY_OF] for t in queued) == sorted(reaped)
    assert remaining(study, 6) == 4  # interrupted trials do not use up the target
    assert reap_dead(study, heartbeat_s=30) == []  # once only

    study.tell(alive_here, 0.5)
    failed = running(study)
    failed.set_user_attr(FAIL_REASON, "out of memory")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert remaining(study, 6) == 6 - 2 - 1  # complete + failed for its own reason; 1 running


def test_the_heartbeat_is_kept_fresh_while_a_trial_runs(tmp_path: Path) -> None:
    study = journal_study(tmp_path)
    trial = study.ask()
    with heartbeat(trial, every_s=0.05):
        first = study.trials[0].user_attrs["heartbeat"]
        time.sleep(0.3)
        later = study.trials[0].user_attrs["heartbeat"]
    assert later > first and study.trials[0].user_attrs["pid"] == os.getpid()


def test_a_worker_with_the_other_direction_is_refused(tmp_path: Path) -> None:
    journal_study(tmp_path)
    recipe = load_recipe(
        tmp_path / "r.yaml", ["sweep.space={optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}"]
    )
    with pytest.raises(RecipeError, match="was created to maximise its objective"):
        open_study("s", open_storage(None, tmp_path), recipe.sweep, "minimize", 0, 3)
