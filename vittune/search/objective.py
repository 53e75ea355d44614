"""One trial: the trial's recipe trained by the ordinary run path into `<sweep>/trial-007/`.

Its objective is the best value of `checkpoint.monitor` (the number the run's best checkpoint
holds). A trial that fails for its own reasons (a combination the recipe refuses, a NaN loss,
out of memory) is recorded as failed with its one-line reason and the sweep goes on; anything
else is a bug and stops the sweep with its traceback.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vittune.errors import VittuneError
from vittune.recipe.schema import Command, Recipe
from vittune.search.space import shown_value, suggest, trial_recipe
from vittune.search.study import FAIL_REASON, heartbeat

if TYPE_CHECKING:
    import optuna


class TrialFailed(Exception):
    """A trial that cannot give an objective for reasons of its own values."""


class ReportEpochs(Callback):
    """Reports the monitor to the Optuna trial after every validation and prunes on request.

    optuna-integration's PyTorchLightningPruningCallback would do the reporting, but it is a
    separate package pinned to Lightning versions, and vittune also wants a NaN loss to end the
    trial: this is the same dozen lines with that check added. The loss check keeps a flag on
    the device (no sync per step) and reads it once per validation.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.finite: torch.Tensor | None = None
        self.epochs = 0  # validations reported

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            ok = torch.isfinite(loss.detach()).all()
            self.finite = ok if self.finite is None else self.finite & ok

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import optuna

        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if self.finite is not None and not bool(self.finite):
            raise TrialFailed(f"the training loss became NaN or infinite in epoch {epoch}")
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            raise TrialFailed(f"{self.monitor} is {value} in epoch {epoch}")
        self.trial.report(value, step=epoch)
        self.epochs += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.monitor} {value:.4g})")


def out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate" in text)
    )


def finish_wandb() -> None:
    """Close the trial's W&B run: Lightning's logger leaves it open, and the next trial's
    logger would log into it instead of starting its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run_trial(
    trial: optuna.Trial,
    recipe: Recipe,
    command: Command,
    recipe_path: str | Path,
    sweep_dir: Path,
    monitor: str,
    log: Callable[[str], None],
) -> float:
    """Train one trial; its best monitor value. Failures raise TrialFailed with the reason
    recorded on the trial; pruning raises optuna.TrialPruned."""
    from vittune.training.run import fit

    name = f"trial-{trial.number:03d}"
    values = suggest(trial, recipe.sweep.space)
    shown = "  ".join(f"{k}={shown_value(v)}" for k, v in values.items())
    log(f"vittune sweep: trial {trial.number}: {shown}")
    reporter = ReportEpochs(trial, monitor)
    start = time.monotonic()
    try:
        with heartbeat(trial, recipe.sweep.heartbeat_s):
            chosen = trial_recipe(recipe, command, values, sweep_dir, name, sweep_dir.name)
            trial.set_user_attr("run_folder", str(sweep_dir / name))
            result = fit(chosen, command, recipe_path, log=log, callbacks=[reporter])
            trial.set_user_attr("run_folder", str(result.run_dir))  # `trial-007-2` if taken
    except VittuneError as err:
        raise _failed(trial, str(err).strip()) from None
    except TrialFailed as err:
        raise _failed(trial, str(err)) from None
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not out_of_memory(err):
            raise
        raise _failed(trial, f"out of memory: {str(err).splitlines()[0]}") from None
    finally:
        trial.set_user_attr("wall_s", round(time.monotonic() - start, 3))
        trial.set_user_attr("epochs", reporter.epochs)
        finish_wandb()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if result.best_score is None or not math.isfinite(result.best_score):
        raise _failed(trial, f"no finite {monitor} was recorded (got {result.best_score})")
    return result.best_score


def _failed(trial: optuna.Trial, reason: str) -> TrialFailed:
    trial.set_user_attr(FAIL_REASON, reason)
    return TrialFailed(reason)
