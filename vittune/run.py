"""A training run from a checked recipe: folder, resume, assembly, Trainer, fit, export.

Data flows one way: recipe -> assembly (data, models, optim, task) -> Trainer -> export. The
pieces live in assembly.py, trainer.py, run_folder.py, resume.py, checkpointing.py and
export.py; this module puts them in order and turns stops and mistakes into clear endings.
Nothing here knows about the command line.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vittune.assembly import build
from vittune.callbacks import GradualUnfreeze
from vittune.checkpointing import (
    PreemptionGuard,
    carry_best,
)
from vittune.errors import Preempted, RecipeError
from vittune.export import export_best
from vittune.recipe.load import dump_recipe
from vittune.recipe.schema import Command, Recipe
from vittune.results import test_weights, write_metrics_json
from vittune.resume import OptimizerCheck, ResumePoint, check_model_fits, resolve_resume
from vittune.run_folder import (
    RunFolder,
    atomic_write,
    prepare_run_dir,
    release_run_dir,
    removed_on_user_error,
    wandb_run_id,
)
from vittune.safeguards.run_lock import acquire, release
from vittune.safeguards.settings import check_machine, check_monitor, validation_metrics
from vittune.trainer import build_trainer, monitor_of


@dataclass
class RunResult:
    run_dir: Path
    monitor: str
    best_score: float | None
    export_path: Path | None
    messages: list[str] = field(default_factory=list)
    exported: str = "best"  # which weights the export holds: "best", or "last" (save_top_k 0)
    metrics: dict = field(default_factory=dict)  # what metrics.json holds


def fit(
    recipe: Recipe, command: Command, recipe_path: str | Path, log: Callable[[str], None] = print
) -> RunResult:
    """Train as the recipe says, keep best/last checkpoints, and export the best weights.

    `trainer.resume_from` is checked before the run folder exists; `auto` continues the newest
    checkpoint of `<logging.run_dir>/<logging.name>` in that same folder (or starts fresh there).
    """
    check_machine(recipe)  # a GPU that is not there, an unusable cache folder: no folder yet
    resume = resolve_resume(recipe)
    guard = PreemptionGuard()
    with guard.installed():
        folder = prepare_run_dir(
            recipe.logging.name,
            recipe.logging.run_dir,
            Path(recipe_path).stem,
            reuse=recipe.trainer.resume_from == "auto",
        )
        lock = None
        try:
            lock = acquire(folder.path) if folder.owner else None  # one writer per run folder
            with removed_on_user_error(folder, lambda: held_checkpoints(folder.path)):
                return _fit_into(folder, recipe, command, log, resume, guard)
        except Preempted as stop:
            held = held_checkpoints(folder.path)
            if folder.created and held is None:
                shutil.rmtree(folder.path, ignore_errors=True)  # stopped before any step
            if guard.stopped_in == "after the export":
                raise Preempted(
                    stop.signum,
                    f"{stop}; the run had finished: {folder.path} holds its export",
                ) from None
            if guard.stopped_in == "after training":
                raise Preempted(
                    stop.signum,
                    f"{stop}, before the export; {folder.path / 'checkpoints' / 'last.ckpt'}"
                    " holds the final step; export it with trainer.resume_from=auto"
                    f" logging.name={folder.path.name}",
                ) from None
            raise
        finally:
            release(lock)
            release_run_dir(folder)


def held_checkpoints(run_dir: Path) -> str | None:
    """What a run folder holds that is worth keeping ("checkpoints/last.ckpt, ..."), or None."""
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    return f"checkpoints/{', '.join(names)}" if names else None


def _fit_into(
    folder: RunFolder,
    recipe: Recipe,
    command: Command,
    log: Callable[[str], None],
    resume: ResumePoint | None,
    guard: PreemptionGuard,
) -> RunResult:
    run_dir = folder.path
    if folder.owner:
        try:  # a resumed run records the recipe it continues with (only resumable keys differ)
            atomic_write(run_dir / "recipe.yaml", lambda p: p.write_text(dump_recipe(recipe)))
        except OSError as err:
            raise RecipeError(
                f"cannot write to run folder {run_dir}: {err.strerror}; point logging.run_dir at a writable folder"
            ) from None
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    assembly = build(recipe, command, run_dir)
    extra = [*assembly.callbacks, guard]
    if resume is not None:
        check_model_fits(resume, assembly.task)
        for callback in assembly.callbacks:
            if isinstance(callback, GradualUnfreeze):
                callback.resumed_epoch = resume.epoch
        extra.append(OptimizerCheck(resume))
        if folder.owner:
            carry_best(resume, run_dir / "checkpoints")
    monitor = monitor_of(recipe, assembly.task)
    check_monitor(monitor[0], validation_metrics(assembly.task))
    start = resume.global_step if resume else 0
    wandb_id = wandb_run_id(folder) if recipe.logging.wandb else None
    trainer, checkpoint, wandb_message = build_trainer(
        recipe, run_dir, monitor, extra, start, wandb_id
    )
    if trainer.is_global_zero:
        log(f"vittune {command}: run folder {run_dir}")
        if resume is not None:
            log(f"  resuming {resume.path} at step {resume.global_step} (epoch {resume.epoch})")
        log(
            f"  weights: {assembly.report.source}"
            + "".join(f"\n  {n}" for n in assembly.report.notes)
        )
        sizes = {s: len(v) for s, v in assembly.datamodule.found.splits.items()}
        log(f"  data: {len(assembly.classes)} classes, images per split {sizes}")
        if wandb_message:
            log(f"  {wandb_message}")
    try:
        trainer.fit(
            assembly.task,
            datamodule=assembly.datamodule,
            ckpt_path=resume.path if resume else None,
            weights_only=True,  # checkpoints hold tensors and plain data only
        )
    except SIGTERMException:
        guard.phase = "while stopping"
        signum = guard.signum or signal.SIGTERM
        name, last = signal.Signals(signum).name, run_dir / "checkpoints" / "last.ckpt"
        if not trainer.is_global_zero:  # rank 0 says it, once
            raise Preempted(signum, "") from None
        if not last.is_file():
            raise Preempted(signum, f"stopped by {name} before the first step") from None
        raise Preempted(
            signum,
            f"stopped by {name} at step {trainer.global_step}; {last} holds that step;"
            f" continue in this folder with trainer.resume_from=auto logging.name={run_dir.name}",
        ) from None
    except BaseException:
        guard.phase = "while stopping"  # Lightning's handler is gone: a signal stops at once
        raise
    guard.phase = "after training"
    if trainer.is_global_zero and (corrupt := assembly.datamodule.corrupt_report()):
        log(corrupt)
    result = RunResult(run_dir, monitor[0], None, None, [m for m in [wandb_message] if m])
    score = checkpoint.best_model_score
    result.best_score = float(score) if score is not None else None
    best, last = checkpoint.best_model_path, run_dir / "checkpoints" / "last.ckpt"
    tests = {}
    if "test" in assembly.datamodule.found.splits and command != "pretrain-mae":
        chosen = {"test_last": last} if recipe.checkpoint.test_last and last.is_file() else {}
        chosen["test"] = Path(best) if best else last  # the exported weights
        tests = test_weights(trainer, assembly, chosen)
    if trainer.is_global_zero:
        result.export_path = export_best(
            assembly, recipe, command, best, run_dir, metrics=tests.get("test")
        )
        guard.phase = "after the export"
        result.exported = "best" if best else "last"
        result.metrics = write_metrics_json(run_dir, checkpoint, tests)
        if tests:
            log_tests(run_dir, tests, log, result.exported)
    return result


def log_tests(
    run_dir: Path,
    tests: dict[str, dict[str, float]],
    log: Callable[[str], None],
    exported: str = "best",
) -> None:
    """Print the test numbers, and save the full test report (per class, confusion matrix,
    calibration, mistakes) of the exported weights in eval/test/, as `vittune evaluate` does."""
    from vittune.evaluate import evaluate_run  # noqa: PLC0415 (matplotlib only when testing)

    for name, values in tests.items():
        weights = "last" if name == "test_last" else exported
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        log(f"  {name} ({weights} weights): {shown}")
    report = evaluate_run(run_dir, [], split="test", name="test")
    log(f"  test report: {report.folder}")
