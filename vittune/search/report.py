"""A sweep's report in its folder: trials.csv, best_recipe.yaml, Optuna's figures, a table.

Every worker writes it from the whole study when it ends (atomically: a reader, or a second
worker writing at the same moment, never leaves half a file).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vittune.recipe.load import dump_recipe
from vittune.recipe.schema import Command, Recipe
from vittune.search.space import shown_value, trial_recipe
from vittune.search.study import FAIL_REASON, INTERRUPTED, RETRY_OF
from vittune.training.run_folder import atomic_write

if TYPE_CHECKING:
    import optuna

    from vittune.search.results import SweepResult

FIGURES = {
    "optimization_history.png": "plot_optimization_history",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "param_importances.png": "plot_param_importances",
}


def best_epoch(trial: optuna.trial.FrozenTrial, mode: str) -> int | None:
    """The first epoch with the best reported monitor value (the best checkpoint's epoch)."""
    values = sorted(trial.intermediate_values.items())
    if not values:
        return None
    pick = max if mode == "max" else min
    best = pick(v for _, v in values)
    return next(epoch for epoch, v in values if v == best)


def reason_of(trial: optuna.trial.FrozenTrial, retries: dict[int, int]) -> str:
    attrs = trial.user_attrs
    if FAIL_REASON in attrs:
        return attrs[FAIL_REASON]
    if trial.state.name == "FAIL":
        why = attrs.get(INTERRUPTED, "its worker process stopped")
        again = f"; repeated as trial {retries[trial.number]}" if trial.number in retries else ""
        return f"interrupted: {why}{again}"
    if RETRY_OF in attrs:
        return f"repeats interrupted trial {attrs[RETRY_OF]}"
    return "the recipe's own values" if attrs.get("start") == "recipe" else ""


def trial_rows(study: optuna.Study, keys: list[str], mode: str) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    retries = {t.user_attrs[RETRY_OF]: t.number for t in trials if RETRY_OF in t.user_attrs}
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name.lower()}
        row.update({key: t.params.get(key, "") for key in keys})
        complete = t.state.name == "COMPLETE" and t.value is not None
        row["objective"] = t.value if complete else ""
        row["best_epoch"] = best_epoch(t, mode) if t.intermediate_values else ""
        row["epochs"] = t.user_attrs.get("epochs", "")
        row["wall_s"] = t.user_attrs.get("wall_s", "")
        row["run_folder"] = t.user_attrs.get("run_folder", "")
        row["reason"] = reason_of(t, retries)
        rows.append(row)
    return rows


def write_trials_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    columns = ["number", "state", *keys, "objective", "best_epoch", "epochs", "wall_s"]
    columns += ["run_folder", "reason"]

    def write(temp: Path) -> None:
        with temp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def write_best_recipe(
    path: Path, recipe: Recipe, command: Command, trial: optuna.trial.FrozenTrial, monitor: str
) -> None:
    """The best trial's recipe, as its run trained it, but named as a run of its own (in the
    recipe's run_dir, `<sweep>-best`), so that `vittune finetune best_recipe.yaml` trains it
    again with the same seed."""
    sweep = path.parent.name
    best = trial_recipe(
        recipe, command, dict(trial.params), Path(recipe.logging.run_dir), f"{sweep}-best", ""
    )
    best.logging.group = recipe.logging.group
    header = (
        f"# Best trial of sweep {sweep}: trial {trial.number}, {monitor} = {trial.value:.6g}\n"
        f"# Train it again: vittune {command} {path}\n"
    )
    atomic_write(path, lambda temp: temp.write_text(header + dump_recipe(best)))


def write_figures(study: optuna.Study, folder: Path, monitor: str) -> tuple[list[Path], list[str]]:
    """Optuna's matplotlib figures; (written files, notes on the ones that cannot be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as plots

    written, notes = [], []
    for name, function in FIGURES.items():
        kwargs: dict[str, Any] = {"target_name": monitor}
        if "importances" in name:
            kwargs["evaluator"] = FanovaImportanceEvaluator(seed=0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = getattr(plots, function)(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            notes.append(f"{name} not drawn: {str(err).splitlines()[0]}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        atomic_write(folder / name, lambda temp, f=figure: f.savefig(temp, format="png", dpi=100))
        plt.close(figure)
        written.append(folder / name)
    return written, notes


def top_table(rows: list[dict[str, Any]], keys: list[str], mode: str, top: int = 5) -> str:
    done = [r for r in rows if r["state"] == "complete"]
    done.sort(key=lambda r: r["objective"], reverse=mode == "max")
    header = ["trial", "objective", *keys, "best_epoch", "wall_s"]
    lines = [[str(r["number"]), f"{r['objective']:.4f}"] for r in done[:top]]
    for line, row in zip(lines, done, strict=False):
        line += [shown_value(row[k]) for k in keys] + [
            str(row["best_epoch"]),
            f"{row['wall_s']:.1f}",
        ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=False)]
    return "\n".join(
        "  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, *lines]
    )


def write_report(
    study: optuna.Study,
    recipe: Recipe,
    command: Command,
    result: SweepResult,
    mode: str,
    log: Callable[[str], None],
) -> None:
    folder = result.sweep_dir
    keys = list(recipe.sweep.space)
    rows = trial_rows(study, keys, mode)
    write_trials_csv(folder / "trials.csv", rows, keys)
    result.files.append(folder / "trials.csv")
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    done = [t for t in done if t.value is not None and math.isfinite(t.value)]
    if done:
        best = max(done, key=lambda t: t.value if mode == "max" else -t.value)
        result.best_number, result.best_value = best.number, best.value
        write_best_recipe(folder / "best_recipe.yaml", recipe, command, best, result.monitor)
        result.files.append(folder / "best_recipe.yaml")
    figures, notes = write_figures(study, folder, result.monitor)
    result.files += figures
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    log(
        f"vittune sweep: {len(rows)} trials in study {result.study_name}: "
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    )
    if done:
        log(top_table(rows, keys, mode))
        log(f"  best: trial {result.best_number}, {result.monitor} = {result.best_value:.4f}")
    for note in notes:
        log(f"  {note}")
    for path in result.files:
        log(f"  wrote {path}")
