"""Resuming checked before anything starts: which checkpoint (`trainer.resume_from`, `auto`),
whether it is a vittune training checkpoint, and whether the recipe and the model still fit it.

Checkpoints are read with `weights_only=True` and `mmap=True`: only metadata and shapes are
kept, the tensors stay on disk.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe

if TYPE_CHECKING:  # Lightning is imported once the run folder exists (training/run.py)
    import lightning as L

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
    "data.format",  # the same images as shards (vittune prepare-data keeps splits and labels)
    "data.cache",  # how images are read, not which
    "data.cache_dir",
    "data.pin_memory",
    "data.prefetch_factor",
    "trainer.compile",
    "model.pretrained",  # only the starting weights, which the checkpoint replaces
    "model.pretrained_sha256",
    "checkpoint.every_n_steps",
    "checkpoint.test_last",
    "logging.",
    "mae.vis_every_n_epochs",
    "mae.vis_num_images",
)


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
    # Whole epochs trained, and epochs begun: one more when it was saved inside an epoch.
    epochs_done: int = 0
    epochs_started: int = 0

    def limit_reached(self, recipe: Recipe) -> str | None:
        """The limit (`trainer.max_epochs=3`) this checkpoint already reached, so that a resume
        trains nothing and only tests and exports it (how a run stopped after training gets its
        export); None when there is training left."""
        t = recipe.trainer
        if t.max_steps >= 0 and self.global_step >= t.max_steps:
            return f"trainer.max_steps={t.max_steps}"
        if self.epochs_done >= t.max_epochs:
            return f"trainer.max_epochs={t.max_epochs}"
        return None


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
        **epoch_progress(content),
    )


def epoch_progress(content: dict[str, Any]) -> dict[str, int]:
    """Whole epochs done and epochs begun, from the fit loop's state as Lightning saved it.

    `epoch` alone cannot tell a finished epoch 2 (saved at its end) from one stopped inside
    epoch 2; Lightning's `processed` and `started` counts can. Without them (another writer),
    `epoch` counts as begun and not finished, which refuses what Lightning would refuse.
    """
    epoch = int(content.get("epoch", 0))
    try:
        current = content["loops"]["fit_loop"]["epoch_progress"]["current"]
        return {"epochs_done": int(current["processed"]), "epochs_started": int(current["started"])}
    except (KeyError, TypeError, ValueError):
        return {"epochs_done": epoch, "epochs_started": epoch + 1}


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
    check_limits_ahead(point, recipe)
    return point


def check_limits_ahead(point: ResumePoint, recipe: Recipe) -> None:
    """Refuse a checkpoint already past `trainer.max_epochs` or `trainer.max_steps`.

    Lightning finds out only inside `trainer.fit`, after the run folder, recipe.yaml and the
    CSV log were written: a traceback for epochs, and for a smaller limit that it does not
    check, an export as if the run had ended there. Reaching a limit exactly is no mistake:
    nothing is left to train, and the resume tests and exports (see `limit_reached`).
    """
    t, where = recipe.trainer, f"trainer.resume_from {point.path}"
    if t.max_steps >= 0 and point.global_step > t.max_steps:
        raise RecipeError(
            f"{where} is already at step {point.global_step}, past trainer.max_steps={t.max_steps};"
            f" set trainer.max_steps above {point.global_step} (or -1 for no step limit) to train on from it"
        )
    if point.epochs_started <= t.max_epochs:
        return
    if point.epochs_started > point.epochs_done:  # saved inside an epoch (a stop, every_n_steps)
        inside = point.epochs_started - 1
        raise RecipeError(
            f"{where} was saved inside epoch {inside} (epochs count from 0), past"
            f" trainer.max_epochs={t.max_epochs}; set trainer.max_epochs to {inside + 1} or more"
            " to finish that epoch"
        )
    raise RecipeError(
        f"{where} already finished epoch {point.epochs_done - 1} ({point.epochs_done} epochs),"
        f" more than trainer.max_epochs={t.max_epochs}; set trainer.max_epochs above"
        f" {point.epochs_done} to train on from it"
    )


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
