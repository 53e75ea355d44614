"""`vittune sweep`: trials one after another in this process, until the study holds enough.

Any number of such workers (other GPUs, other machines, a SLURM array) may share one study
through its storage; each asks Optuna for the next trial, so their trials are disjoint. A
worker started again with the same study name continues it: the trial its predecessor was
running is failed and repeated (study.py), nothing else is lost or repeated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vittune.errors import Preempted, RecipeError, VittuneError
from vittune.files import check_folder_name
from vittune.recipe.schema import Command, Recipe
from vittune.search.objective import TrialFailed, run_trial
from vittune.search.results import SweepResult
from vittune.search.space import grid_of, recipe_start, sweep_config
from vittune.search.study import (
    INTERRUPTED,
    open_storage,
    open_study,
    reap_dead,
    remaining,
    requeue,
)


def monitor_for(recipe: Recipe, command: Command) -> tuple[str, str]:
    """The objective: `checkpoint.monitor` / `mode`, as the run's best checkpoint uses them."""
    from vittune.training.trainer import monitor_of

    if command == "pretrain-mae":
        from vittune.tasks.mae import MaeTask as task_class
    elif command == "distill":
        from vittune.tasks.distillation import DistillationTask as task_class
    else:
        from vittune.tasks.classification import ClassificationTask as task_class
    return monitor_of(recipe, task_class)  # reads only the class's default_monitor


def default_sweep_name(recipe: Recipe, recipe_path: str | Path) -> str:
    """`<logging.name or the recipe file's stem>-sweep`: the study's and the W&B sweep's."""
    return f"{recipe.logging.name or Path(recipe_path).stem}-sweep"


def sweep_folder(recipe: Recipe, recipe_path: str | Path, study_name: str | None) -> Path:
    name = check_folder_name(study_name, "--study") if study_name else None
    folder = Path(recipe.logging.run_dir) / (name or default_sweep_name(recipe, recipe_path))
    if (folder / "recipe.yaml").is_file():
        raise RecipeError(
            f"{folder} is a training run folder, not a sweep; name the sweep with --study NAME"
        )
    return folder


def run_sweep(
    recipe: Recipe,
    command: Command,
    recipe_path: str | Path,
    trials: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run trials until the study has `trials` (default `sweep.trials`) finished ones, then
    write the sweep folder's report (trials.csv, best_recipe.yaml, figures)."""
    try:
        import optuna
    except ImportError:
        raise VittuneError(
            "vittune sweep needs Optuna; install it with: pip install 'vittune[sweep]'"
        ) from None

    from vittune.search.report import write_report

    cfg = sweep_config(recipe)
    sweep_dir = sweep_folder(recipe, recipe_path, study_name)
    monitor, mode = monitor_for(recipe, command)
    target = trials or cfg.trials
    if cfg.sampler == "grid":
        target = min(target, math.prod(len(v) for v in grid_of(cfg.space).values()))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # vittune prints one line per trial
    seed = cfg.seed if cfg.seed is not None else recipe.trainer.seed
    study, created = open_study(
        sweep_dir.name,
        open_storage(storage, sweep_dir),
        cfg,
        "maximize" if mode == "max" else "minimize",
        seed,
        recipe.trainer.max_epochs,
    )
    # trial 0 = the recipe's own values; a grid runs every point anyway (and Optuna's grid
    # does not count an enqueued point as visited, so it would run twice)
    starts = created and cfg.start_from_recipe and cfg.sampler != "grid"
    if starts and (start := recipe_start(recipe, cfg.space)):
        study.enqueue_trial(start, user_attrs={"start": "recipe"}, skip_if_exists=True)
    where = storage or str(sweep_dir / "study.journal")
    log(
        f"vittune sweep: study {sweep_dir.name} ({'new' if created else 'continued'}, {where});"
        f" {target} trials; objective {monitor} ({mode}); trials in {sweep_dir}"
    )
    result = SweepResult(sweep_dir, sweep_dir.name, monitor, [], None, None)
    while True:
        if reaped := reap_dead(study, cfg.heartbeat_s):
            log(
                f"vittune sweep: trials {reaped} were running in a process that is gone;"
                " failed, and their values queued again"
            )
        if remaining(study, target) <= 0:
            break
        current: dict[str, Any] = {}
        objective = _objective(current, recipe, command, recipe_path, sweep_dir, monitor, log)
        try:
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        except (Preempted, KeyboardInterrupt):
            _interrupted(study, current.get("trial"))
            raise
        if "trial" in current:
            number = current["trial"].number
            result.ran.append(number)
            log(_trial_line(study, number, monitor))
    write_report(study, recipe, command, result, mode, log)
    return result


def _objective(
    current: dict[str, Any],
    recipe: Recipe,
    command: Command,
    recipe_path: str | Path,
    sweep_dir: Path,
    monitor: str,
    log: Callable[[str], None],
) -> Callable[[Any], float]:
    """Optuna's objective for one trial; `current["trial"]` names it for the stop handler."""

    def objective(trial: Any) -> float:
        current["trial"] = trial
        try:
            return run_trial(trial, recipe, command, recipe_path, sweep_dir, monitor, log)
        except (Preempted, KeyboardInterrupt) as stop:
            trial.set_user_attr(INTERRUPTED, str(stop) or type(stop).__name__)
            raise

    return objective


def _interrupted(study: Any, trial: Any) -> None:
    """Fail a trial a stop interrupted (Optuna leaves it RUNNING for a BaseException) and queue
    its values again, so that the next worker repeats it."""
    import optuna
    from optuna.trial import TrialState

    if trial is None:
        return
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # KeyboardInterrupt:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # already failed
    requeue(study, trial)


def _trial_line(study: Any, number: int, monitor: str) -> str:
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    state = trial.state.name.lower()
    if trial.value is not None and state == "complete":
        detail = f"{monitor} {trial.value:.4f}"
    elif state == "pruned":
        epochs = trial.user_attrs.get("epochs", 0)
        detail = f"after {epochs} epoch{'s' if epochs != 1 else ''}"
    else:
        detail = trial.user_attrs.get("fail_reason", "")
    return f"vittune sweep: trial {number} {state}: {detail} ({trial.user_attrs.get('wall_s', 0):.1f} s)"
