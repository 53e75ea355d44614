"""`vittune sweep` and `vittune lr-find` through the console script: two workers share one
study, a killed (SIGKILL) and a stopped (SIGTERM) sweep continue where they were, a bad space
is one line before any trial, and lr-find prints an override the CSV beside its plot backs."""

from __future__ import annotations

import csv
import re
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from ckpt_helpers import start_cli, wait_until
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe
from PIL import Image

from vittune.search.lr_find import steepest_descent

SPACE = {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    """A recipe file with a `sweep:` section, and the tiny-model overrides."""
    data = make_class_images(tmp_path / "data", {"a": 12, "b": 12, "c": 12})
    recipe = {
        "model": {"in_chans": 1},
        "data": {"root": str(data), "batch_size": 8, "val_fraction": 0.25},
        "augment": {"preset": "none"},
        "trainer": {"max_epochs": 2},
        "logging": {"name": "cli"},
        "sweep": {"space": SPACE, "sampler": "random", "pruner": "none"},
    }
    path = write_recipe(tmp_path / "sweep.yaml", recipe)
    return ["sweep", str(path), *tiny(), *extra]


def study_of(folder: Path, name: str) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(folder / "study.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def ran_by(stdout: str) -> set[int]:
    return {int(n) for n in re.findall(r"vittune sweep: trial (\d+) complete", stdout)}


@pytest.mark.slow
def test_two_workers_share_one_study_and_write_the_report(tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "--study", "shared", "--trials", "6")
    workers = [start_cli(*args, cwd=tmp_path, log=tmp_path / f"w{i}") for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, (tmp_path / "w0.err").read_text()[-2000:]
    outs = [(tmp_path / f"w{i}.out").read_text() for i in range(2)]
    folder = tmp_path / "runs" / "shared"
    trials = study_of(folder, "shared").trials
    # both asked the one study: 6 trials (a 7th if both asked at the same instant), all done
    assert 6 <= len(trials) <= 7 and all(t.state.name == "COMPLETE" for t in trials)
    first, second = ran_by(outs[0]), ran_by(outs[1])
    assert first and second and not first & second, (first, second)  # disjoint, both worked
    assert first | second == {t.number for t in trials}
    pids = {w.pid for w in workers}
    for trial in trials:
        assert trial.user_attrs["pid"] in pids
        assert (trial.user_attrs["pid"] == workers[0].pid) == (trial.number in first)
        assert (folder / f"trial-{trial.number:03d}" / "model.safetensors").is_file()
    assert len({tuple(t.params.items()) for t in trials}) == len(trials)  # no values repeated
    with (folder / "trials.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows] == sorted(t.number for t in trials)
    best = max(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, val/acc1 = {best.value:.4f}" in outs[0] + outs[1]
    assert (
        (folder / "best_recipe.yaml")
        .read_text()
        .startswith(f"# Best trial of sweep shared: trial {best.number}")
    )
    for name in ("optimization_history", "parallel_coordinate", "param_importances"):
        with Image.open(folder / f"{name}.png") as figure:
            assert figure.format == "PNG" and min(figure.size) > 300


@pytest.mark.slow
def test_a_killed_then_a_stopped_sweep_continues_and_repeats_only_the_running_trial(
    tmp_path: Path,
) -> None:
    args = sweep_args(tmp_path, "--trials", "3")
    folder = tmp_path / "runs" / "cli-sweep"
    first = start_cli(*args, cwd=tmp_path, log=tmp_path / "first")
    wait_until(lambda: (folder / "trial-001").is_dir(), first, timeout=300)
    first.send_signal(signal.SIGKILL)  # dies mid-trial 1: nothing is told to the study
    first.wait()

    second = start_cli(*args, cwd=tmp_path, log=tmp_path / "second")
    wait_until(lambda: (folder / "trial-002" / "csv").is_dir(), second, timeout=300)
    second.send_signal(signal.SIGTERM)  # a preemption in its first trial (trial 1's repeat)
    assert second.wait(timeout=120) == 143
    said = (tmp_path / "second.out").read_text()
    assert "vittune sweep: trials [1] were running in a process that is gone" in said

    third = run_cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert third.returncode == 0, third.stderr[-2000:]
    trials = {t.number: t for t in study_of(folder, "cli-sweep").trials}
    states = {n: t.state.name for n, t in trials.items()}
    # 0 done; 1 killed -> repeated as 2; 2 stopped -> repeated as 3; then 4 (a new value)
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "COMPLETE", 4: "COMPLETE"}
    assert trials[2].params == trials[3].params == trials[1].params
    assert trials[2].user_attrs["retry_of"] == 1 and trials[3].user_attrs["retry_of"] == 2
    assert "SIGTERM" in trials[2].user_attrs["interrupted"]
    assert trials[4].params != trials[0].params != trials[1].params
    with (folder / "trials.csv").open(newline="") as handle:
        reasons = {int(r["number"]): r["reason"] for r in csv.DictReader(handle)}
    assert reasons[1] == "interrupted: its worker process stopped; repeated as trial 2"
    assert reasons[2].startswith("interrupted: stopped by SIGTERM")
    assert reasons[3] == "repeats interrupted trial 2"


def test_a_bad_space_is_one_line_before_any_trial(tmp_path: Path) -> None:
    args = sweep_args(tmp_path, "sweep.space={optim.layer_decay: {uniform: [0.5, 1.5]}}")
    result = run_cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 2
    assert result.stderr.startswith("vittune: error: sweep.space `optim.layer_decay`: the value")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_lr_find_prints_an_override_and_keeps_the_layer_decay_ratios(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"a": 16, "b": 16})
    path = write_recipe(tmp_path / "r.yaml", {"model": {"in_chans": 1}})
    extra = (f"data.root={data}", "data.batch_size=4", "optim.layer_decay=0.8", "optim.lr=1e-3")
    args = ["lr-find", str(path), *tiny(*extra), "--steps", "30", "--plot", "find/lr.png"]
    result = run_cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    suggestion = float(re.fullmatch(r"optim\.lr=(\S+)", lines[-1]).group(1))
    with Image.open(tmp_path / "find" / "lr.png") as figure:
        assert figure.format == "PNG"
    with (tmp_path / "find" / "lr.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lrs = [float(r["optim.lr"]) for r in rows]
    groups = [k for k in rows[0] if k.startswith("layer_")]
    assert len(groups) == 8  # layers 0-3, each with and without weight decay
    for name in groups:  # one ratio per group, the same at every step: 0.8 ** (3 - layer)
        ratios = np.array([float(r[name]) for r in rows]) / np.array(lrs)
        assert np.allclose(ratios, 0.8 ** (3 - int(name.split("_")[1])), rtol=1e-9), name
    assert "runs" not in {p.name for p in tmp_path.iterdir()}  # nothing saved as a run
    smoothed = [float(r["smoothed"]) for r in rows]
    assert suggestion == pytest.approx(steepest_descent(lrs, smoothed), rel=1e-2)  # 3 digits
