"""A training run inside its run folder: assembly, Trainer, fit, the test report, export.

`training/run.py` makes the folder and says where it is before this module (and Lightning)
is imported; this one builds everything else and turns a stop signal during training into
a `Preempted` naming the checkpoint that holds the stop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vittune.data.datasets import SplitSamples
from vittune.data.groups import write_splits
from vittune.deploy.timm_folder import export_best
from vittune.errors import Preempted
from vittune.files import atomic_write
from vittune.inference.tested_split import TestedSplit
from vittune.recipe.schema import Command, Recipe
from vittune.tasks.assembly import build
from vittune.tasks.callbacks import GradualUnfreeze
from vittune.training.checkpointing import OptimizerCheck, PreemptionGuard, carry_best
from vittune.training.results import test_weights, write_metrics_json
from vittune.training.resume import ResumePoint, check_model_fits
from vittune.training.run_folder import RunFolder, wandb_run_id
from vittune.training.settings import check_monitor, validation_metrics
from vittune.training.stop_signals import StopSignals
from vittune.training.tracking import summarize_run
from vittune.training.trainer import build_trainer, monitor_of


@dataclass
class RunResult:
    run_dir: Path
    monitor: str
    best_score: float | None
    export_path: Path | None
    messages: list[str] = field(default_factory=list)
    exported: str = "best"  # which weights the export holds: "best", or "last" (save_top_k 0)
    metrics: dict = field(default_factory=dict)  # what metrics.json holds


def train_in_folder(
    folder: RunFolder,
    recipe: Recipe,
    command: Command,
    log: Callable[[str], None],
    resume: ResumePoint | None,
    signals: StopSignals,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Build, train, test and export into a folder that `training.run.fit` made and named."""
    run_dir = folder.path
    guard = PreemptionGuard(signals)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    assembly = build(recipe, command, run_dir)
    extra = [*assembly.callbacks, *callbacks, guard]
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
        if resume is None:  # a resumed run's weights are the checkpoint's (run.py said so)
            log(
                f"  weights: {assembly.report.source}"
                + "".join(f"\n  {n}" for n in assembly.report.notes)
            )
        sizes = {s: len(v) for s, v in assembly.datamodule.found.splits.items()}
        kind = "unlabelled" if command == "pretrain-mae" else f"{len(assembly.classes)} classes"
        log(f"  data: {kind}, images per split {sizes}")
        found = assembly.datamodule.found  # the split, auditable and reusable (data.splits_from)
        atomic_write(run_dir / "splits.csv", lambda p: write_splits(p, found))
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
        signals.phase = "while stopping"
        signum = signals.signum or signal.SIGTERM
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
        signals.phase = "while stopping"  # Lightning's handler is gone: a signal stops at once
        raise
    signals.phase = "after training"
    # the lr the last epoch line printed (the largest group's), before testing touches anything
    final_lr = (
        max((g["lr"] for g in trainer.optimizers[0].param_groups), default=None)
        if trainer.optimizers
        else None
    )
    if trainer.is_global_zero and (corrupt := assembly.datamodule.corrupt_report()):
        log(corrupt)
    result = RunResult(run_dir, monitor[0], None, None, [m for m in [wandb_message] if m])
    score = checkpoint.best_model_score
    result.best_score = float(score) if score is not None else None
    best, last = checkpoint.best_model_path, run_dir / "checkpoints" / "last.ckpt"
    tests, tested = {}, None
    if "test" in assembly.datamodule.found.splits and command != "pretrain-mae":
        chosen = {"test_last": last} if recipe.checkpoint.test_last and last.is_file() else {}
        chosen["test"] = Path(best) if best else last  # the exported weights
        tests, tested = test_weights(trainer, assembly, chosen)
    if trainer.is_global_zero:
        result.export_path = export_best(
            assembly, recipe, command, best, run_dir, metrics=tests.get("test")
        )
        signals.phase = "after the export"
        result.exported = "best" if best else "last"
        result.metrics = write_metrics_json(run_dir, checkpoint, tests)
        report = None
        if tests:
            report, ci95 = log_tests(
                run_dir,
                tests,
                log,
                "best" if best else "last; no best checkpoint",
                assembly.datamodule.found,
                tested,
            )
            # written again with the report's AUROC interval; the first write above keeps the
            # run's numbers on disk should the report fail
            if ci95 is not None:
                result.metrics = write_metrics_json(run_dir, checkpoint, tests, ci95)
        send_to_wandb(trainer, run_dir, result.export_path, bool(best), final_lr, report)
    return result


def send_to_wandb(
    trainer: L.Trainer,
    run_dir: Path,
    export: Path,
    best: bool,
    final_lr: float | None,
    report: Path | None,
) -> None:
    """The test report and the model artifact; the summary's epoch is the last one trained
    (Lightning's test logging leaves it one past) and its `lr` the one the console printed."""
    from vittune.training.wandb_run import log_model_artifact, log_test_report  # noqa: PLC0415

    if report is not None:  # eval/test, or eval/test-2... in a resumed run's folder
        log_test_report(trainer.loggers, report)
    log_model_artifact(trainer.loggers, run_dir, export, best)
    last = {"epoch": trainer.fit_loop.epoch_progress.current.started - 1}
    summarize_run(trainer.loggers, last | ({"lr": final_lr} if final_lr is not None else {}))


def log_tests(
    run_dir: Path,
    tests: dict[str, dict[str, float]],
    log: Callable[[str], None],
    exported: str = "best",
    scanned: SplitSamples | None = None,
    tested: TestedSplit | None = None,
) -> tuple[Path, list[float] | None]:
    """Print the test numbers, and save the full test report (per class, confusion matrix,
    calibration, mistakes) of the exported weights in eval/test/, as `vittune evaluate` does.
    Returns the report's folder and the test AUROC's 95 % interval (None when undefined)."""
    from vittune.inference.evaluate import evaluate_run  # noqa: PLC0415 (matplotlib only when testing)

    for name, values in tests.items():
        weights = "last" if name == "test_last" else exported
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        log(f"  {name} ({weights} weights): {shown}")
    report = evaluate_run(run_dir, [], split="test", name="test", scanned=scanned, tested=tested)
    low, high = report.clinical.get("auroc_macro_ci95", (None, None))
    if low is not None:
        log(
            f"  test AUROC macro {report.clinical['auroc_macro']:.4f}, 95% CI [{low:.4f}, {high:.4f}]"
        )
    log(f"  test report: {report.folder}")
    return report.folder, ([low, high] if low is not None else None)
