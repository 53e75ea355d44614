"""Setting mistakes found before a run folder exists, each one line naming the key and a fix.

Lightning raised these from deep inside `Trainer(...)` or after a full epoch (a monitored
metric that is never logged), as tracebacks that left a folder holding only recipe.yaml.
The rules that need only the recipe run at load time (`check_trainer_settings`, in
recipe/checks.py's list); those that depend on this machine or its file system
(`check_machine`) and on the task's metrics (`check_monitor`) run in `fit` before the folder.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Lightning's short precision names ("16", "bf16", "32", "64") are still accepted by it.
PRECISION_ALIASES = ("16", "bf16", "32", "64")


def _precisions() -> tuple[str, ...]:
    from lightning.fabric.plugins.precision.precision import (  # noqa: PLC0415
        _PRECISION_INPUT_STR,
    )

    return (*typing.get_args(_PRECISION_INPUT_STR), *PRECISION_ALIASES)


def _strategies() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry  # noqa: PLC0415

    return ["auto", *StrategyRegistry.available_strategies()]


def _devices_problem(devices: object) -> str | None:
    if isinstance(devices, bool):
        return "a count, a list of ids, or auto"
    if isinstance(devices, int):
        return None if devices >= 1 or devices == -1 else "at least 1 (or -1 for all, or auto)"
    if isinstance(devices, list):
        ok = devices and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        )
        return None if ok else "a non-empty list of device ids (0, 1, ...)"
    text = str(devices).strip()
    if text == "auto" or text == "-1":
        return None
    parts = [p for p in text.split(",") if p.strip()]
    if text.isdigit():
        return None if int(text) >= 1 else "at least 1 (or -1 for all, or auto)"
    if parts and all(p.strip().isdigit() for p in parts) and "," in text:
        return None
    return "a count, a list of ids, or auto"


def check_trainer_settings(recipe: Recipe) -> None:
    """Trainer and loader values Lightning or the loaders would only refuse (or silently
    replace) later."""
    t = recipe.trainer
    if t.precision is not None and t.precision not in _precisions():
        choices = ", ".join(p for p in _precisions() if p not in PRECISION_ALIASES)
        raise RecipeError(f"trainer.precision {t.precision!r} is not one of {choices}")
    if t.accelerator not in ACCELERATORS:
        raise RecipeError(
            f"trainer.accelerator {t.accelerator!r} is not one of {', '.join(ACCELERATORS)}"
        )
    if t.strategy not in _strategies():
        raise RecipeError(
            f"trainer.strategy {t.strategy!r} is not a Lightning strategy; use auto, ddp,"
            " ddp_spawn, fsdp, deepspeed or another name Lightning registers"
        )
    if (why := _devices_problem(t.devices)) is not None:
        raise RecipeError(f"trainer.devices {t.devices!r} must be {why}")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = getattr(t, key)
        if value is None:
            continue
        if value < 0 or (isinstance(value, float) and value > 1):
            raise RecipeError(
                f"trainer.{key} {value} must be a batch count (1, 2, ...) or a fraction in (0, 1]"
            )
        if key == "limit_train_batches" and value == 0:
            raise RecipeError(
                "trainer.limit_train_batches 0 trains nothing; remove it or give a batch count"
                " or fraction above 0"
            )
    size = recipe.data.eval_batch_size
    if size is not None and size < 1:
        raise RecipeError(
            f"data.eval_batch_size {size} must be at least 1 (null: the training batch size)"
        )


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
