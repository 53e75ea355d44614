"""Trainer settings checked at load time, each mistake one line naming the key and a fix.

Lightning raised these from deep inside `Trainer(...)`, as tracebacks that left a folder
holding only recipe.yaml. These rules need only the recipe (recipe/checks.py runs them); those
that depend on this machine or the task's metrics are in training/settings.py.
"""

from __future__ import annotations

import typing

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Lightning's short precision names ("16", "bf16", "32", "64") are still accepted by it.
PRECISION_ALIASES = ("16", "bf16", "32", "64")
# Names every Lightning 2.x accepts, so that the usual recipe is checked without importing
# Lightning (2 s on a CPU machine, before the run folder is named). Any other value is asked
# of Lightning's own lists; tests/training/test_settings.py keeps these in them.
COMMON_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
COMMON_STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "single_device")


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


def requested_devices(devices: int | str | list[int]) -> int | None:
    """How many devices a valid `trainer.devices` asks for, read as Lightning reads it (2,
    "2", [0, 1] and "0,1" are two; "1," is device 1); -1 for all of them, None for auto."""
    if isinstance(devices, list):
        return len(devices)
    text = str(devices).strip()
    if text == "auto":
        return None
    if "," in text:
        return len([p for p in text.split(",") if p.strip()])
    return int(text)


def check_trainer_settings(recipe: Recipe) -> None:
    """Trainer and loader values Lightning or the loaders would only refuse (or silently
    replace) later."""
    t = recipe.trainer
    known = (*COMMON_PRECISIONS, *PRECISION_ALIASES)
    if t.precision is not None and t.precision not in known and t.precision not in _precisions():
        choices = ", ".join(p for p in _precisions() if p not in PRECISION_ALIASES)
        raise RecipeError(f"trainer.precision {t.precision!r} is not one of {choices}")
    if t.accelerator not in ACCELERATORS:
        raise RecipeError(
            f"trainer.accelerator {t.accelerator!r} is not one of {', '.join(ACCELERATORS)}"
        )
    if t.strategy not in COMMON_STRATEGIES and t.strategy not in _strategies():
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
