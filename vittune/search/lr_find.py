"""`vittune lr-find`: a learning-rate range test that keeps every group's ratio to optim.lr.

Lightning's `Tuner.lr_find` sets one lr on every parameter group, which erases layer-wise
decay (vittune's groups each carry `optim.lr x layer scale`). Here each step multiplies every
group's own starting lr by the same factor, so layer decay, the no-weight-decay groups and
frozen parts (no group at all) keep their ratios; the lrs each group stepped with are
recorded and shown. The model comes back as it was, and nothing is saved as a run.

Suggestion rule: the smoothed loss is an exponential moving average (beta 0.98, bias
corrected, as in fastai); the suggested `optim.lr` is where it falls fastest against log(lr)
(steepest descent, most negative d loss / d log lr), skipping the first 10 % of the steps.
The test stops early when the smoothed loss exceeds 4x its minimum or a loss is not finite.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from vittune.errors import RecipeError
from vittune.recipe.schema import Command, Recipe
from vittune.search.results import RangeTest

BETA = 0.98  # smoothing of the loss
DIVERGED = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum
SKIP_START = 0.1  # share of the first steps the suggestion ignores


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` values from min_lr to max_lr, evenly spaced in log(lr)."""
    return [float(v) for v in np.geomspace(min_lr, max_lr, steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average."""
    average, out = 0.0, []
    for k, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (k + 1)))
    return out


def steepest_descent(lrs: list[float], smoothed: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest against log(lr), first 10 % skipped."""
    skip = max(1, int(len(lrs) * SKIP_START))
    if len(lrs) - skip < 3:
        return None
    slopes = np.gradient(np.asarray(smoothed[skip:]), np.log(np.asarray(lrs[skip:])))
    return float(lrs[skip + int(np.argmin(slopes))])


class LrRangeTest(Callback):
    """Sets every group's lr to (its starting lr) x (this step's optim.lr / recipe optim.lr)
    before each step, and records the loss and the lrs the optimiser stepped with."""

    def __init__(self, lrs: list[float], recipe_lr: float) -> None:
        self.planned, self.recipe_lr = lrs, recipe_lr
        self.result = RangeTest()
        self.start: list[float] = []  # each group's lr at multiplier 1
        self.pending = 0.0  # loss of the micro-batches of this optimiser step

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        groups = trainer.optimizers[0].param_groups
        self.start = [g.get("initial_lr", g["lr"]) for g in groups]  # before any schedule
        self.result.group_names = [g.get("name", f"group_{i}") for i, g in enumerate(groups)]
        self.result.scales = [lr / self.recipe_lr for lr in self.start]

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        factor = self.planned[min(trainer.global_step, len(self.planned) - 1)] / self.recipe_lr
        for group, start in zip(trainer.optimizers[0].param_groups, self.start, strict=True):
            group["lr"] = start * factor

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: Any) -> None:
        self.pending += float(loss.detach())  # Lightning divides it by the accumulation

    def on_before_optimizer_step(
        self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any
    ) -> None:
        result = self.result
        result.lrs.append(self.planned[trainer.global_step])
        result.group_lrs.append([g["lr"] for g in optimizer.param_groups])
        result.losses.append(self.pending)
        self.pending = 0.0
        result.smoothed = smooth(result.losses)
        if not math.isfinite(result.losses[-1]):
            result.stopped = f"the loss was not finite at step {len(result.losses) - 1}"
        elif result.smoothed[-1] > DIVERGED * min(result.smoothed):
            result.stopped = (
                f"the smoothed loss exceeded {DIVERGED:g}x its minimum at step"
                f" {len(result.losses) - 1}"
            )
        if result.stopped:
            trainer.should_stop = True


def ratio_drift(result: RangeTest) -> float:
    """The largest relative change of any group's lr / optim.lr across the steps (0: kept)."""
    drift = 0.0
    for lr, step in zip(result.lrs, result.group_lrs, strict=True):
        for scale, group_lr in zip(result.scales, step, strict=True):
            drift = max(drift, abs(group_lr / lr - scale) / scale)
    return drift


def lr_range_test(
    task: Any, datamodule: Any, recipe: Recipe, lrs: list[float], recipe_lr: float
) -> RangeTest:
    """Run the range test on a built task; its weights and trainable flags are restored."""
    saved = copy.deepcopy(task.state_dict())
    trainable = {n: p.requires_grad for n, p in task.named_parameters()}
    probe = LrRangeTest(lrs, recipe_lr)
    t = recipe.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision or _default_precision(t.accelerator),
        max_steps=len(lrs),
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        task.load_state_dict(saved)
        for name, param in task.named_parameters():
            param.requires_grad_(trainable[name])
    result = probe.result
    result.stopped = result.stopped or f"all {len(result.losses)} steps ran"
    result.suggestion = steepest_descent(result.lrs, result.smoothed)
    return result


def _default_precision(accelerator: str) -> str:
    from vittune.training.trainer import default_precision

    return default_precision(accelerator)


def run_lr_find(
    recipe: Recipe,
    command: Command,
    steps: int,
    min_lr: float,
    max_lr: float,
    plot: str | Path,
    log: Callable[[str], None] = print,
) -> RangeTest:
    """Build the recipe's task as training would, run the range test, plot and suggest."""
    from vittune.search.lr_plot import write_plot
    from vittune.tasks.assembly import build
    from vittune.tasks.base import effective_lr

    if not 0 < min_lr < max_lr:
        raise RecipeError(
            f"lr-find needs 0 < --min-lr < --max-lr (got {min_lr:g} and {max_lr:g}); fix them"
        )
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    assembly = build(recipe, command)
    lrs = exponential_lrs(min_lr, max_lr, steps)
    # group lrs scale with optim.lr (x the linear batch scaling when the recipe asks for it)
    recipe_lr = recipe.optim.lr
    result = lr_range_test(assembly.task, assembly.datamodule, recipe, lrs, recipe_lr)
    if effective_lr(recipe, 1) != recipe_lr:
        log(f"  optim.lr_scaling: linear; groups start at {effective_lr(recipe, 1):.3g} x scale")
    csv_path = write_plot(result, Path(plot))
    log(
        f"vittune lr-find: {len(result.losses)} steps from optim.lr={lrs[0]:.2g} towards"
        f" {lrs[-1]:.2g}; {result.stopped}"
    )
    ratios = ", ".join(
        f"{n} {s:.4g}" for n, s in zip(result.group_names, result.scales, strict=True)
    )
    log(
        f"  group lr / optim.lr, as at the start: {ratios}; largest relative change over the"
        f" steps {ratio_drift(result):.1e}"
    )
    log(f"  plot: {plot} (numbers: {csv_path})")
    if result.suggestion is None:
        log("  no suggestion: too few steps before the loss diverged; lower --min-lr")
        return result
    log(
        "  suggestion: where the smoothed loss falls fastest against log(lr) (steepest"
        f" descent; first {SKIP_START:.0%} of the steps skipped)"
    )
    log(f"optim.lr={result.suggestion:.3g}")
    return result
