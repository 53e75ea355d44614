"""`run_sweep` in this process on a tiny ViT: better lr found, pruning, failures, reports.

The objective and best epoch in trials.csv are checked against each trial's own metrics.csv,
and best_recipe.yaml is trained again to the same number.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import make_class_images
from helpers import column, read_metrics, tiny, write_recipe

from vittune.recipe.load import load_recipe
from vittune.search.study import JOURNAL
from vittune.search.sweep import run_sweep
from vittune.training.run import fit


@pytest.fixture(scope="session")
def sweep_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three learnable classes, 20 images each, shared by every sweep test."""
    return make_class_images(tmp_path_factory.mktemp("sweep") / "data", {"a": 20, "b": 20, "c": 20})


def sweep_recipe(tmp_path: Path, data: Path, *extra: str, drop: tuple[str, ...] = ()):
    path = write_recipe(tmp_path / "tiny.yaml", {"model": {"in_chans": 1}})
    overrides = tiny(
        f"data.root={data}",
        "data.batch_size=16",
        "data.val_fraction=0.2",
        "augment.preset=none",
        "trainer.max_epochs=3",
        "schedule.name=constant",
        "checkpoint.monitor=val/loss",
        f"logging.run_dir={tmp_path / 'runs'}",
        "logging.name=tiny",
        *extra,
        drop=drop,
    )
    return path, load_recipe(path, overrides)


def read_trials(folder: Path) -> list[dict[str, str]]:
    with (folder / "trials.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def val_losses(run_folder: str) -> list[float]:
    rows = read_metrics(Path(run_folder))
    return column([r for r in rows if r.get("epoch")], "val/loss")


@pytest.mark.slow
def test_a_sweep_from_a_bad_lr_finds_a_better_one_and_its_best_recipe_reproduces(
    tmp_path: Path, sweep_data: Path
) -> None:
    space = "sweep.space={optim.lr: {loguniform: [1.0e-6, 1.0e-2]}}"
    path, recipe = sweep_recipe(
        tmp_path, sweep_data, "optim.lr=1e-6", space, "sweep.pruner=none", "sweep.seed=3"
    )
    lines: list[str] = []
    result = run_sweep(recipe, "finetune", path, trials=4, log=lines.append)
    folder = tmp_path / "runs" / "tiny-sweep"
    assert result.sweep_dir == folder and (folder / JOURNAL).is_file()
    rows = read_trials(folder)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["state"] == "complete" for r in rows)
    start = rows[0]
    assert float(start["optim.lr"]) == 1e-6 and start["reason"] == "the recipe's own values"
    for row in rows:  # every number in trials.csv = the trial's own metrics.csv
        losses = val_losses(row["run_folder"])
        assert len(losses) == 3 and int(row["epochs"]) == 3
        assert float(row["objective"]) == pytest.approx(min(losses), rel=1e-6)
        assert int(row["best_epoch"]) == losses.index(min(losses))
        assert Path(row["run_folder"]) == folder / f"trial-{int(row['number']):03d}"
    best = min(rows, key=lambda r: float(r["objective"]))
    assert float(best["optim.lr"]) > 1e-5  # the sweep moved away from the bad start ...
    assert float(best["objective"]) < float(start["objective"]) - 0.05  # ... and it paid off
    assert result.best_number == int(best["number"])
    assert f"  best: trial {best['number']}, val/loss = {float(best['objective']):.4f}" in lines
    for name in ("optimization_history", "parallel_coordinate", "param_importances"):
        assert (folder / f"{name}.png").stat().st_size > 10_000, name

    # best_recipe.yaml trains the best trial again, to the same objective (same seed)
    again = load_recipe(folder / "best_recipe.yaml")
    assert again.optim.lr == pytest.approx(float(best["optim.lr"]), rel=1e-12)
    assert again.logging.name == "tiny-sweep-best" and again.sweep is None
    rerun = fit(again, "finetune", folder / "best_recipe.yaml", log=lambda _: None)
    assert rerun.run_dir == tmp_path / "runs" / "tiny-sweep-best"
    assert rerun.best_score == pytest.approx(float(best["objective"]), abs=1e-6)


@pytest.mark.slow
def test_pruning_stops_bad_trials_early_and_failures_are_recorded(
    tmp_path: Path, sweep_data: Path
) -> None:
    # trial 0: the recipe's good lr; then random lrs, mostly too small to learn in 3 epochs
    space = "sweep.space={optim.lr: {loguniform: [1.0e-7, 3.0e-3]}}"
    pruning = ("sweep.pruner=median", "sweep.startup_trials=1", "sweep.prune_after_epochs=1")
    path, recipe = sweep_recipe(
        tmp_path, sweep_data, "optim.lr=3e-3", space, "sweep.sampler=random", *pruning
    )
    lines: list[str] = []
    run_sweep(recipe, "finetune", path, trials=4, log=lines.append)
    folder = tmp_path / "runs" / "tiny-sweep"
    rows = read_trials(folder)
    assert rows[0]["state"] == "complete" and float(rows[0]["optim.lr"]) == 3e-3
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert any(int(r["epochs"]) < 3 for r in pruned), rows  # at least one stopped early
    for row in pruned:  # its own metrics.csv holds the epochs it trained, no export
        assert len(val_losses(row["run_folder"])) == int(row["epochs"])
        assert not (Path(row["run_folder"]) / "model.safetensors").exists()
        said = f"trial {row['number']} pruned: after {row['epochs']} epoch"
        assert said + ("s" if row["epochs"] != "1" else "") + " (" in "\n".join(lines)
    study = optuna.load_study(
        study_name="tiny-sweep",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL))
        ),
    )
    for trial in study.trials:  # the median rule, recomputed: worse than the median of the
        if trial.state.name != "PRUNED":  # trials finished before it, at the step it stopped
            continue
        step, value = max(trial.intermediate_values.items())
        before = [
            t.intermediate_values[step]
            for t in study.trials
            if t.state.name == "COMPLETE" and t.datetime_complete < trial.datetime_complete
        ]
        assert before and value > float(np.median(before))

    # a NaN loss fails its trial with the reason, and the sweep still writes its report
    blown = "sweep.space={optim.lr: {choice: [1.0e+30]}}"
    path, recipe = sweep_recipe(tmp_path, sweep_data, blown, "sweep.sampler=grid")
    result = run_sweep(recipe, "finetune", path, trials=1, study_name="blowup", log=print)
    (row,) = read_trials(tmp_path / "runs" / "blowup")
    assert row["state"] == "fail" and "loss became NaN or infinite in epoch 0" in row["reason"]
    assert result.best_number is None and not (result.sweep_dir / "best_recipe.yaml").exists()


@pytest.mark.slow
def test_each_trial_logs_to_its_own_wandb_run(tmp_path: Path, sweep_data: Path) -> None:
    space = "sweep.space={optim.lr: {choice: [1.0e-3, 2.0e-3]}}"
    path, recipe = sweep_recipe(
        tmp_path,
        sweep_data,
        space,
        "sweep.sampler=grid",
        "trainer.max_epochs=1",
        drop=("logging.wandb",),
    )  # W&B on, offline (conftest sets WANDB_MODE)
    run_sweep(recipe, "finetune", path, trials=2, log=lambda _: None)
    ids = []
    for trial in ("trial-000", "trial-001"):
        folder = tmp_path / "runs" / "tiny-sweep" / trial
        run_id = (folder / "wandb_id").read_text().strip()
        assert list((folder / "wandb").glob(f"offline-run-*-{run_id}")), trial
        ids.append(run_id)
    assert ids[0] != ids[1]  # the second trial did not log into the first trial's run
