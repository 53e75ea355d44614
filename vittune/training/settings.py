"""Settings checked in `fit` before the run folder exists: those that depend on this machine
or its file system (`check_machine`) and on the task's metrics (`check_monitor`, which
Lightning reported only after a full epoch). The recipe-only rules are in
recipe/trainer_settings.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe


def check_machine(recipe: Recipe) -> None:
    """Settings this machine cannot honour: a GPU that is not there, an unusable cache folder."""
    import torch  # noqa: PLC0415 (recipe checks stay light)

    accelerator = recipe.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(
            f"trainer.accelerator {accelerator} but this machine has no usable CUDA GPU"
            " (torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(
            "trainer.accelerator mps but this machine has no Apple GPU; use cpu or auto"
        )
    if recipe.data.cache == "disk" and recipe.data.cache_dir:
        _check_cache_dir(Path(recipe.data.cache_dir).expanduser())


def _check_cache_dir(folder: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(
            f"data.cache_dir {folder} cannot be made: {existing} is a file, not a folder;"
            " point data.cache_dir at a folder"
        )
    probe = existing
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecipeError(
            f"data.cache_dir {folder} is not writable ({probe} is read-only for this user);"
            " point data.cache_dir at a writable folder"
        )
    try:  # a read-only mount passes os.access for root: try a real file
        probe_file = probe / f".vittune-write-test-{os.getpid()}"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as err:
        raise RecipeError(
            f"data.cache_dir {folder} is not writable ({err.strerror});"
            " point data.cache_dir at a writable folder"
        ) from None


def check_monitor(monitor: str, logged: set[str] | None) -> None:
    """`checkpoint.monitor` must be a metric the task logs at validation (when it is known)."""
    if logged and monitor not in logged:
        raise RecipeError(
            f"checkpoint.monitor {monitor} is never logged; choose one of {', '.join(sorted(logged))}"
        )


def validation_metrics(task: object) -> set[str] | None:
    """The `val/*` names a task logs, when it can tell (classification, distillation, MAE)."""
    metrics = getattr(task, "val_metrics", None)
    if metrics is not None and hasattr(metrics, "metrics"):
        names = {*metrics.metrics.keys(), f"{metrics.stage}/loss"}
        if metrics.extra is not None:
            names |= set(metrics.extra.keys())
        return names
    from vittune.tasks.mae import MaeTask  # noqa: PLC0415

    return {"val/loss"} if isinstance(task, MaeTask) else None
