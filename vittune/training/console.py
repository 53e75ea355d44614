"""What a training run prints: Lightning's progress bar on a terminal, one line per epoch in a file.

Piped to a file (nohup, SLURM, CI), a live progress bar is one frame rewritten in place: the file
gets nothing per epoch, then one wrapped frame full of ANSI codes. `EpochLines` takes the bar's
place there and writes a plain line at the end of each epoch:

    epoch 3/9  train/loss 0.412  val/loss 0.380  val/acc1 0.912  val/f1 0.905  lr 4.1e-04  12.3 s

Epochs count from 0, as in metrics.csv, W&B and the checkpoint names; `3/9` is this epoch and
the last one, as Lightning's own bar shows them. The seconds are the epoch's, validation
included; after a resume inside an epoch, that epoch's line times only the part trained in this
process and says `(part after the resume)`. The validation values are those the task logs
with `prog_bar=True` (its main metrics). What other libraries print is trimmed in noise.py.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count


def format_value(name: str, value: float) -> str:
    if name == "lr":
        return f"{value:.1e}"
    return f"{value:.3f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.3g}"


class EpochLines(ProgressBar):
    """The progress bar for a stream that is not a terminal: one plain line per epoch, rank 0 only.

    Lightning's bars redraw one line in place (TQDM with carriage returns, rich with cursor
    codes), which a file keeps as a single frame; neither has a line-per-epoch mode, hence this.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.enabled = True
        self.started = time.monotonic()
        self.resumed_part = False  # this epoch began in an earlier process (a mid-epoch resume)
        self.validation: dict[str, float] = {}  # this epoch's values, empty if it had none

    @property
    def is_enabled(self) -> bool:  # LightningModule.print asks before printing through the bar
        return self.enabled

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args: object, **kwargs: object) -> None:
        """`LightningModule.print` (rank 0 only), on the same stream as the epoch lines."""
        self.write(" ".join(str(a) for a in args))

    def write(self, line: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()  # a file is block-buffered: `tail -f` should see each epoch as it ends

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume inside an epoch skips on_train_epoch_start for that epoch: its line times
        # the part trained in this process, from here, and says so.
        self.started = time.monotonic()
        self.resumed_part = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.monotonic()
        self.resumed_part = False
        self.validation = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # progress_bar_metrics keeps the last value of every key, so an epoch that skips
        # validation (check_val_every_n_epoch > 1) would repeat old numbers: take them now.
        self.validation = {
            k: float(v) for k, v in trainer.progress_bar_metrics.items() if k.startswith("val/")
        }

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Called before the LightningModule's hook, but the epoch means of what training_step
        # logged (train/loss_epoch) are already final: the batch loop has ended. Every process
        # builds the line, though Lightning disables this "progress bar" beyond rank 0: reading
        # the metrics computes those means, and train/loss is logged with sync_dist, an
        # all-reduce that rank 0 alone would wait on forever under DDP.
        line = self.epoch_line(trainer)
        if self.enabled and trainer.is_global_zero:
            self.write(line)

    def epoch_line(self, trainer: L.Trainer) -> str:
        epoch, last = trainer.current_epoch, trainer.max_epochs
        parts = [f"epoch {epoch}/{last - 1}" if last and last > 0 else f"epoch {epoch}"]
        shown = trainer.progress_bar_metrics
        train = shown.get("train/loss_epoch", shown.get("train/loss"))
        values = {"train/loss": float(train)} if train is not None else {}
        values.update(self.validation)
        if trainer.optimizers:
            # the largest group lr: with layer decay, the head's (the recipe's optim.lr schedule)
            values["lr"] = max(g["lr"] for g in trainer.optimizers[0].param_groups)
        parts += [f"{name} {format_value(name, value)}" for name, value in values.items()]
        seconds = f"{time.monotonic() - self.started:.1f} s"
        parts.append(f"{seconds} (part after the resume)" if self.resumed_part else seconds)
        return "  ".join(parts)


class ParameterCount(ModelSummary):
    """One line instead of Lightning's model table: parameters, trainable ones, size.

    The table lists the LightningModule's children (the ViT as one row, then losses and metric
    collections with 0 parameters) and a FLOPs total that is 0 unless measured; what a
    fine-tuning log needs is whether freezing took effect. `vittune inspect` shows the groups.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(max_depth=1)
        self.stream = stream
        self.ema: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.ema = getattr(pl_module, "ema", None)
        super().on_fit_start(trainer, pl_module)

    def summarize(  # type: ignore[override]  # Lightning calls it on the instance
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        **kwargs: Any,
    ) -> None:
        stream = self.stream or sys.stdout
        # an `ema:` average (tasks/ema.py) is a copy of the model, not more model
        averaged = sum(p.numel() for p in self.ema.parameters()) if self.ema is not None else 0
        total_parameters -= averaged
        share = 100.0 * trainable_parameters / max(total_parameters, 1)
        total = get_human_readable_count(total_parameters).strip()
        trainable = get_human_readable_count(trainable_parameters).strip()
        ema = ", plus its EMA copy" if averaged else ""
        stream.write(
            f"  model: {total} parameters, {trainable} trainable ({share:.1f}%;"
            f" {model_size:.1f} MB{ema})\n"
        )
        stream.flush()


def console_callbacks(stream: TextIO | None = None) -> list[Callback]:
    """The progress display for `stream` (stdout): Lightning's default bar (rich or TQDM) on a
    terminal, `EpochLines` otherwise; and the one-line parameter count."""
    stream = stream or sys.stdout
    bar: list[Callback] = [] if stream.isatty() else [EpochLines()]
    return [*bar, ParameterCount()]
