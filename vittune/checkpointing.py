"""Checkpoints you can trust: atomic writes, a `last.ckpt` that is always the latest state,
resumes that are checked before they start, and a checkpointed stop on preemption signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pydantic import ValidationError

from vittune.errors import Preempted, RecipeError
from vittune.recipe.schema import Recipe
from vittune.run_folder import atomic_write

LAST = "last.ckpt"

# Recipe keys a resume may change; they take effect as given. Any other difference from the
# recipe stored in the checkpoint is refused: the restored weights, optimiser state and
# schedule position would silently override it while recipe.yaml claimed otherwise.
RESUME_MAY_CHANGE = (
    "trainer.resume_from",
    "trainer.max_epochs",  # continue a finished run: the schedule stretches to the new total
    "trainer.max_steps",
    "trainer.accelerator",
    "trainer.devices",  # a requeued job may land on other hardware
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.early_stopping_patience",
    "data.root",  # the same data may live elsewhere on another machine
    "data.csv",
    "data.num_workers",
    "data.eval_batch_size",
    "data.on_corrupt",
    "model.pretrained",  # only the starting weights, which the checkpoint replaces
    "model.pretrained_sha256",
    "checkpoint.every_n_steps",
    "logging.",
    "mae.vis_every_n_epochs",
    "mae.vis_num_images",
)


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


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best scores survive a resume into a new run folder.

    Lightning keeps `best_model_score` only when the run folder is the same; a resume into a
    new folder would forget the epochs before it and could export a worse model than one
    already seen. The best files are copied into the new folder first (`carry_best`), and
    here the restored state is pointed at those copies.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so checkpoints written before this class existed still restore.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.abspath(old) != os.path.abspath(self.dirpath):
            state_dict = moved_best_state(state_dict, Path(self.dirpath))
        super().load_state_dict(state_dict)


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

    def __init__(self, folder: Path, every_n_steps: int | None, start_step: int = 0) -> None:
        self.path = folder / LAST
        self.every_n_steps = every_n_steps
        self.saved_step = start_step  # the resumed checkpoint already holds this step

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        n, step = self.every_n_steps, trainer.global_step
        # global_step repeats over accumulated micro-batches: save each optimiser step once
        if n and step % n == 0 and step != self.saved_step:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # also when a step save came first: this one has the validation

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

    While training runs, Lightning's own SIGTERM handler does the work: it stops the loops at
    a step boundary on every rank and raises SIGTERMException, on which LatestCheckpoint saves.
    This guard records which signal came, hands SIGUSR1 over to that handler, and outside
    training (building, exporting) turns either signal into `Preempted` at once. Lightning's
    SLURM auto-requeue handler is not used: it saves from inside the signal handler, possibly
    between the parameter groups of an optimiser step, and does not stop the run.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase: str | None = "before training"  # None while Lightning's handler acts
        self.stopped_in: str | None = None  # the phase in which this guard raised Preempted
        self._lightning_handler: Any = None  # Lightning's SIGTERM handler, while validating
        self._held = False

    @contextmanager
    def installed(self) -> Iterator[PreemptionGuard]:
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        if self.phase is not None:
            self.stopped_in = self.phase
            raise Preempted(signum, f"stopped by {signal.Signals(signum).name} {self.phase}")
        if signum != signal.SIGTERM:  # Lightning's handler (installed over ours) takes it
            signal.raise_signal(signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.phase = None

    # Lightning stops a validation half-way on SIGTERM, and a resume does not run the rest of it
    # (measured: that epoch's val/* never appear and the best checkpoint never sees them). So a
    # stop signal during validation is held until the validation ends, then handed on.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase is None:
            self._lightning_handler = signal.signal(signal.SIGTERM, self._hold)
            self._held = False

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        self._held = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._lightning_handler is None:
            return
        signal.signal(signal.SIGTERM, self._lightning_handler)
        self._lightning_handler = None
        if self._held:
            signal.raise_signal(signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.phase = "after training"


@dataclass
class ResumePoint:
    """What vittune needs to know about a checkpoint before resuming from it."""

    path: Path
    global_step: int
    epoch: int
    recipe: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    optimizer_groups: list[list[int]]  # parameter counts per group, per optimiser
    callbacks: dict[str, Any] = field(default_factory=dict)


def read_resume_point(path: Path) -> ResumePoint:
    """Read a checkpoint's metadata safely (`weights_only=True`; mmap: tensors stay on disk)."""
    hint = "point trainer.resume_from at runs/<name>/checkpoints/last.ckpt, or use auto"
    if not zipfile.is_zipfile(path):  # what torch.save (and so Lightning) writes
        raise RecipeError(
            f"trainer.resume_from {path} is not a checkpoint (not a torch file); {hint}"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # text files, foreign pickles, truncated files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecipeError(
            f"trainer.resume_from {path} is not a vittune checkpoint ({first}); {hint}"
        ) from None
    hparams = content.get("hyper_parameters") if isinstance(content, dict) else None
    needed = ("state_dict", "optimizer_states", "global_step", "loops")
    if (
        not isinstance(hparams, dict)
        or "recipe" not in hparams
        or any(k not in content for k in needed)
    ):
        raise RecipeError(
            f"trainer.resume_from {path} is not a vittune training checkpoint (no recipe, loop or optimiser state); {hint}"
        )
    return ResumePoint(
        path=path,
        global_step=int(content["global_step"]),
        epoch=int(content.get("epoch", 0)),
        recipe=hparams["recipe"],
        shapes={k: tuple(v.shape) for k, v in content["state_dict"].items()},
        optimizer_groups=[
            [len(g["params"]) for g in opt.get("param_groups", [])]
            for opt in content["optimizer_states"]
        ],
        callbacks=content.get("callbacks", {}),
    )


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of a run folder with the most steps (last.ckpt on a tie), or None."""
    found = []
    for path in [*(folder / "checkpoints").glob("*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]:
        try:  # mmap: only the metadata is read, however large the weights
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        except Exception:  # not a checkpoint this run can resume from: the next one may be
            continue
        found.append((int(step), path.name == LAST, path.stat().st_mtime, path))
    return max(found)[-1] if found else None


def resolve_resume(recipe: Recipe) -> ResumePoint | None:
    """The checkpoint `trainer.resume_from` names, checked against the recipe before a run
    folder exists; None to start fresh (also `auto` in a folder without checkpoints yet)."""
    spec = recipe.trainer.resume_from
    if spec is None:
        return None
    if spec == "auto":
        if not recipe.logging.name:
            raise RecipeError(
                "trainer.resume_from: auto resumes the run folder named by logging.name; set logging.name"
            )
        path = newest_checkpoint(Path(recipe.logging.run_dir) / recipe.logging.name)
        if path is None:
            return None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise RecipeError(
                f"trainer.resume_from {spec} is not a checkpoint file; point it at runs/<name>/checkpoints/last.ckpt, or use auto"
            )
    point = read_resume_point(path)
    check_recipe_unchanged(point, recipe)
    return point


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for key in sorted(set(old) | set(new), key=str)
            for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def check_recipe_unchanged(point: ResumePoint, recipe: Recipe) -> None:
    """Refuse recipe keys that differ from the checkpoint's and that a resume cannot apply."""
    try:  # fill keys added to the schema since the checkpoint was written with their defaults
        stored = Recipe.model_validate(point.recipe).model_dump(mode="json")
    except ValidationError:
        stored = point.recipe
    changed = _differences(stored, recipe.model_dump(mode="json"))
    refused = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if refused:
        shown = ", ".join(refused[:6]) + (
            f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        )
        raise RecipeError(
            f"trainer.resume_from {point.path}: the recipe differs from the checkpoint's in {shown},"
            " which a resume cannot change; restore them, or start a new run from its weights"
            f" with model.pretrained={point.path}"
        )


def check_model_fits(point: ResumePoint, task: L.LightningModule) -> None:
    """The built task must have exactly the checkpoint's tensors (names and shapes)."""
    shapes = dict(point.shapes)
    # A task may put back what it keeps out of checkpoints (the distillation teacher).
    probe: dict[str, Any] = {
        "state_dict": {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    }
    task.on_load_checkpoint(probe)
    shapes = {k: tuple(v.shape) for k, v in probe["state_dict"].items()}
    own = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    problems = [f"missing {k}" for k in own if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in own]
    problems += [f"{k} {shapes[k]} vs {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
    if problems:
        raise RecipeError(
            f"trainer.resume_from {point.path} holds another model than this recipe builds"
            f" ({'; '.join(problems[:3])}); resume with the recipe and data that wrote it"
        )


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
