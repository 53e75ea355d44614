"""From a validated recipe to a finished run: build (task, datamodule, trainer), fit, export.

Data flows one way: recipe -> data, models, optim -> task -> Trainer. Nothing here knows
about the command line.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vittune.assembly import Assembly, build
from vittune.checkpointing import (
    AtomicCheckpointIO,
    BestCheckpoint,
    LatestCheckpoint,
    PreemptionGuard,
    carry_best,
)
from vittune.errors import Preempted, RecipeError
from vittune.export import export_config, write_export
from vittune.models.weights import read_state_dict
from vittune.recipe.load import dump_recipe
from vittune.recipe.schema import Command, Recipe
from vittune.resume import OptimizerCheck, ResumePoint, check_model_fits, resolve_resume
from vittune.run_folder import (
    RunFolder,
    atomic_write,
    prepare_run_dir,
    release_run_dir,
    removed_on_user_error,
    wandb_run_id,
)
from vittune.tasks.base import VitTask
from vittune.tracking import build_loggers


@dataclass
class RunResult:
    run_dir: Path
    monitor: str
    best_score: float | None
    export_path: Path | None
    messages: list[str] = field(default_factory=list)


def default_precision(accelerator: str) -> str:
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    # Native bf16 only (Ampere and newer): emulated bf16 on V100/T4 is slower than fp32.
    native_bf16 = on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native_bf16 else "32-true"


def build_trainer(
    recipe: Recipe,
    run_dir: Path,
    monitor: tuple[str, str],
    extra: list[Callback],
    start_step: int = 0,
    wandb_id: str | None = None,
) -> tuple[L.Trainer, BestCheckpoint, str | None]:
    t = recipe.trainer
    name = run_dir.name
    loggers, wandb_message = build_loggers(recipe.logging, run_dir, name, wandb_id)
    checkpoint = BestCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor[0],
        mode=monitor[1],
        save_top_k=recipe.checkpoint.save_top_k,
        save_last=False,  # LatestCheckpoint keeps last.ckpt, at every epoch and on a stop
        auto_insert_metric_name=False,
    )
    latest = LatestCheckpoint(run_dir / "checkpoints", recipe.checkpoint.every_n_steps, start_step)
    callbacks: list[Callback] = [checkpoint, LearningRateMonitor(logging_interval="step"), *extra]
    if t.early_stopping_patience:
        # Checked after each validation, not at the end of a training epoch: a run capped by
        # `max_steps` mid-epoch ends an epoch that had no validation, and the metric is missing.
        callbacks.append(
            EarlyStopping(
                monitor=monitor[0],
                mode=monitor[1],
                patience=t.early_stopping_patience,
                check_on_train_epoch_end=False,
            )
        )
    callbacks.append(latest)  # after the best checkpoint: last.ckpt holds its updated score
    optional = {
        "limit_train_batches": t.limit_train_batches,
        "limit_val_batches": t.limit_val_batches,
    }
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision or default_precision(t.accelerator),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        **{k: v for k, v in optional.items() if v is not None},
    )
    return trainer, checkpoint, wandb_message


def monitor_of(recipe: Recipe, task: VitTask) -> tuple[str, str]:
    metric = recipe.checkpoint.monitor or task.default_monitor[0]
    mode = recipe.checkpoint.mode or (
        task.default_monitor[1]
        if metric == task.default_monitor[0]
        else ("min" if "loss" in metric else "max")
    )
    return metric, mode


def export_best(
    assembly: Assembly, recipe: Recipe, command: Command, checkpoint: BestCheckpoint, run_dir: Path
) -> Path:
    """Write the best (else last) weights of the exported module in timm key names."""
    module = assembly.export_module(assembly.task)
    candidates = [checkpoint.best_model_path, str(run_dir / "checkpoints" / "last.ckpt")]
    best = next((p for p in candidates if p and Path(p).is_file()), None)
    state = read_state_dict(Path(best)) if best else module.state_dict()
    own = set(module.state_dict())
    state = {k: v for k, v in state.items() if k in own}
    config = export_config(
        recipe.model.name,
        module,
        assembly.classes,
        recipe.model.img_size,
        recipe.model.in_chans,
        assembly.mean,
        assembly.std,
        dict(recipe.model.kwargs),
        command,
    )
    return write_export(state, config, run_dir, assembly.export_name)


def fit(
    recipe: Recipe, command: Command, recipe_path: str | Path, log: Callable[[str], None] = print
) -> RunResult:
    """Train as the recipe says, keep best/last checkpoints, and export the best weights.

    `trainer.resume_from` is checked before the run folder exists; `auto` continues the newest
    checkpoint of `<logging.run_dir>/<logging.name>` in that same folder (or starts fresh there).
    """
    resume = resolve_resume(recipe)
    guard = PreemptionGuard()
    with guard.installed():
        folder = prepare_run_dir(
            recipe.logging.name,
            recipe.logging.run_dir,
            Path(recipe_path).stem,
            reuse=recipe.trainer.resume_from == "auto",
        )
        try:
            with removed_on_user_error(folder, lambda: held_checkpoints(folder.path)):
                return _fit_into(folder, recipe, command, log, resume, guard)
        except Preempted as stop:
            held = held_checkpoints(folder.path)
            if folder.created and held is None:
                shutil.rmtree(folder.path, ignore_errors=True)  # stopped before any step
            if guard.stopped_in == "after training":
                raise Preempted(
                    stop.signum,
                    f"{stop}, before the export; {folder.path / 'checkpoints' / 'last.ckpt'}"
                    " holds the final step; export it with trainer.resume_from=auto"
                    f" logging.name={folder.path.name}",
                ) from None
            raise
        finally:
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
        extra.append(OptimizerCheck(resume))
        if folder.owner:
            carry_best(resume, run_dir / "checkpoints")
    monitor = monitor_of(recipe, assembly.task)
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
    if trainer.is_global_zero:
        result.export_path = export_best(assembly, recipe, command, checkpoint, run_dir)
    return result
