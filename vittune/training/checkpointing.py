"""Checkpoints you can trust: atomic writes, a `last.ckpt` that is always the latest state,
best scores that survive a resume, and a checkpointed stop on preemption signals.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vittune.errors import RecipeError
from vittune.files import atomic_link, atomic_write
from vittune.training.resume import LAST, ResumePoint
from vittune.training.stop_signals import StopSignals
from vittune.training.tracking import summarize_run


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with a write that is atomic on the destination filesystem.

    Lightning's `_atomic_save` goes through an fsspec transaction, whose local temp file is
    made in $TMPDIR and moved into place on commit; with $TMPDIR on another filesystem that
    move is a copy, and a kill during it leaves a truncated checkpoint and an orphan temp file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:  # the parent explains that it takes none
            super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda temp: torch.save(checkpoint, temp))


def best_filename(monitor: str, save_top_k: int) -> str:
    """The best checkpoint's file name template: `best` when one is kept, else epoch and score.

    `best-epoch=03-val_acc1=0.9120.ckpt`: the metric's `/` becomes `_` in the literal part (a
    `/` would make a sub-folder); only the value is formatted from Lightning's metrics.
    """
    if save_top_k == 1:
        return "best"
    return f"best-epoch={{epoch:02d}}-{monitor.replace('/', '_')}={{{monitor}:.4f}}"


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best scores survive a resume into a new run folder, and which
    remembers the best epoch's validation values.

    Lightning keeps `best_model_score` only when the run folder is the same; a resume into a
    new folder would forget the epochs before it and could export a worse model than one
    already seen. The best files are copied into the new folder first (`carry_best`), and
    here the restored state is pointed at those copies.

    When an epoch becomes the best, its `val/*` values and epoch are kept (in the checkpoint
    state too, so a resume keeps them), the LightningModule's `on_new_best(epoch, monitor,
    score)` is called if it has one (classification keeps that epoch's confusion matrix),
    and at the end of fit they go into the W&B summary as `best/<metric>` and `best/epoch`
    (W&B's own summary holds each metric's last value).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        # (path, global step) of a full-state save made in this epoch's on_train_epoch_end:
        # LatestCheckpoint, next in that hook, links last.ckpt to it instead of a second write
        self.epoch_end_save: tuple[str, int] | None = None
        self._in_epoch_end = False

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so checkpoints written before this class existed still restore.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.abspath(old) != os.path.abspath(self.dirpath):
            state_dict = moved_best_state(state_dict, Path(self.dirpath))
        super().load_state_dict(state_dict)
        if state_dict.get("best_model_path"):  # else the best files are gone: start afresh
            self.best_epoch = state_dict.get("best_epoch")
            self.best_metrics = dict(state_dict.get("best_metrics") or {})

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint sets best_model_path before it writes, so a write to that path is a
        # new best (with save_top_k == 1 every write is). Recorded first, so the file holds it.
        if filepath == self.best_model_path and self.best_model_score is not None:
            self.best_epoch = trainer.current_epoch
            self.best_metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            }
            hook = getattr(trainer.lightning_module, "on_new_best", None)
            if hook is not None:
                hook(self.best_epoch, self.monitor, float(self.best_model_score))
        super()._save_checkpoint(trainer, filepath)
        if self._in_epoch_end and not self.save_weights_only:
            self.epoch_end_save = (filepath, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_end_save, self._in_epoch_end = None, True
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._in_epoch_end = False

    def best_summary(self) -> dict[str, float | int]:
        """`best/<metric>` for each validation value of the best epoch, and `best/epoch`."""
        if self.best_epoch is None:
            return {}
        return {
            **{f"best/{k}": v for k, v in self.best_metrics.items()},
            "best/epoch": self.best_epoch,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            summarize_run(trainer.loggers, self.best_summary())


def moved_best_state(state: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A ModelCheckpoint state with its best files looked up in `folder` (those not there dropped)."""
    moved = {
        str(folder / Path(p).name): score
        for p, score in state.get("best_k_models", {}).items()
        if (folder / Path(p).name).is_file()
    }
    best = str(folder / Path(state.get("best_model_path") or "").name)
    if best not in moved:
        return {
            **state,
            "dirpath": str(folder),
            "best_k_models": {},
            "best_model_score": None,
            "best_model_path": "",
            "kth_best_model_path": "",
            "last_model_path": "",
        }
    kth = str(folder / Path(state.get("kth_best_model_path") or "").name)
    return {
        **state,
        "dirpath": str(folder),
        "best_k_models": moved,
        "best_model_path": best,
        "kth_best_model_path": kth if kth in moved else "",
        "last_model_path": "",
    }


def carry_best(resume: ResumePoint, folder: Path) -> list[Path]:
    """Copy the resumed run's best checkpoints into this run's checkpoint folder."""
    copied = []
    for key, state in resume.callbacks.items():
        if not key.startswith("ModelCheckpoint{"):
            continue
        for source in map(Path, state.get("best_k_models", {})):
            target = folder / source.name
            if source.is_file() and source.resolve() != target.resolve():
                atomic_write(target, lambda temp, s=source: shutil.copyfile(s, temp))
                copied.append(target)
    return copied


class LatestCheckpoint(Checkpoint):
    """Keep `last.ckpt` the latest state: at every epoch end, every `every_n_steps` optimiser
    steps, and when training stops on an exception or a preemption signal.

    Lightning's ModelCheckpoint rewrites its "last" file only together with a top-k save
    (`on_validation_end`: "Only save last checkpoint if a checkpoint was actually saved"), so
    once the monitored metric stops improving `last.ckpt` stops moving. Being a `Checkpoint`
    subclass, Lightning runs this after the LightningModule's and other callbacks' epoch-end
    hooks and after the best-checkpoint callback, so the file holds the epoch's final state.
    """

    def __init__(
        self,
        folder: Path,
        every_n_steps: int | None,
        start_step: int = 0,
        best: BestCheckpoint | None = None,
    ) -> None:
        self.path = folder / LAST
        self.every_n_steps = every_n_steps
        self.saved_step = start_step  # the resumed checkpoint already holds this step
        self.best = best

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        n, step = self.every_n_steps, trainer.global_step
        # global_step repeats over accumulated micro-batches: save each optimiser step once
        if n and step % n == 0 and step != self.saved_step:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # also when a step save came first: this one has the validation
        if not self._link_best(trainer):
            self._save(trainer)

    def _link_best(self, trainer: L.Trainer) -> bool:
        """Link last.ckpt to the best checkpoint saved a moment ago in this same hook.

        Nothing runs between the two saves (Lightning calls the checkpoint callbacks last,
        the best one first), so that file already holds exactly the state this save would
        write: the link spares a full serialisation of weights and optimiser state, its
        write and its fsync, at every epoch that sets a new best (a second per epoch on a
        1 GB ViT-B checkpoint). Every rank takes the same branch (rank 0's answer is
        broadcast), as a save ends in a barrier.
        """
        saved = self.best.epoch_end_save if self.best is not None else None
        if saved is None or saved[1] != trainer.global_step:
            return False
        linked = trainer.is_global_zero and atomic_link(Path(saved[0]), self.path)
        if not trainer.strategy.broadcast(linked, src=0):
            return False
        self.saved_step = trainer.global_step
        return True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A stop signal reaches every rank at the same step (Lightning broadcasts it); any other
        # error may have hit one rank only, and a save (which ends in a barrier) would hang.
        together = isinstance(exception, SIGTERMException) or trainer.world_size == 1
        if together and trainer.global_step != self.saved_step:
            self._save(trainer)


class PreemptionGuard(Callback):
    """SIGTERM (what SLURM and Kubernetes send before preemption) and SIGUSR1 (SLURM's
    `--signal=SIGUSR1@90` warning) stop training at the end of the current step with a
    checkpoint of that step; the CLI then exits with 128 + the signal number.

    While training runs, the run's StopSignals handler only notes the signal. At the end of
    each training step (and of each validation) the processes agree whether any of them got one
    (an all-reduce under DDP), and if so all set Lightning's stop flag at that same step:
    Lightning stops its loops there on every rank and raises SIGTERMException, on which
    LatestCheckpoint saves. Lightning's own SIGTERM handler is replaced for the training
    phase: it runs a broadcast inside the signal handler and signals the other ranks itself,
    so when a scheduler signals every process of the job at once the collectives pair up
    wrongly and the run hangs. Validations are never cut short (Lightning stops a validation
    half-way on its flag, and a resume does not run the rest of it). Outside training
    (building, exporting) either signal becomes `Preempted` at once. DataLoader workers
    ignore both signals (vittune/data/workers.py). Lightning's SLURM auto-requeue handler is
    not used: it saves from inside the signal handler, possibly between the parameter groups
    of an optimiser step, and does not stop the run.
    """

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self._deferred = False  # a stop agreed on just before a validation

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Over Lightning's handler, which Lightning's teardown replaces by the run's again.
        self.signals.phase = None
        self.signals.reinstall()

    def _agree(self, trainer: L.Trainer) -> None:
        """Set Lightning's stop flag on every rank when any rank noted a signal."""
        noted = self.signals.noted
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([noted], device=trainer.strategy.root_device)  # [1]
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            noted = int(flag.item())
        if noted:
            self.signals.signum = noted  # every rank names the same signal
            # Lightning's own flag (Lightning 2.6); its loops raise SIGTERMException on it
            # right after this hook, at the same step on every rank.
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.signals.phase is None:
            self._agree(trainer)

    # Lightning stops a validation half-way on its flag, and a resume does not run the rest of
    # it (measured: that epoch's val/* never appear and the best checkpoint never sees them).
    # A stop agreed at the step before a validation therefore waits until the validation ends.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signals.phase is None and trainer.received_sigterm:
            self._deferred = True
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signals.phase is None and not trainer.sanity_checking:
            if self._deferred:
                trainer._signal_connector.received_sigterm = True
            self._agree(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.phase = "after training"


class OptimizerCheck(Callback):
    """Refuse, before any step, an optimiser state that does not fit the optimiser built now
    (torch would load it silently into the wrong parameters, or fail deep in `step`)."""

    def __init__(self, point: ResumePoint) -> None:
        self.point = point

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        built = [[len(g["params"]) for g in opt.param_groups] for opt in trainer.optimizers]
        if built != self.point.optimizer_groups:
            raise RecipeError(
                f"trainer.resume_from {self.point.path} holds optimiser state for parameter groups"
                f" of sizes {self.point.optimizer_groups}, but this run builds {built};"
                " resume with the recipe that wrote it (freeze and optim settings included)"
            )
