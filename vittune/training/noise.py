"""What other libraries print on vittune's console that a user cannot act on, and its removal.

Only the CLI calls `quiet_third_party` (in `main`), so a program that imports vittune keeps its
own logging and warnings configuration. Standard library only: `vittune --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
import warnings

# Warnings from lightning, torch and timm that say nothing a vittune user can change, each seen
# in a vittune run (message regex, category). Add one only with the run that shows it.
KNOWN_NOISE: list[tuple[str, type[Warning]]] = [
    # Lightning's own pytree helper calls a torch API deprecated in torch 2.9 (lightning 2.5)
    (r".*isinstance\(treespec, LeafSpec\)", Warning),
    # every `data.format: litdata` run: Lightning warns that an IterableDataset's length may be
    # wrong across workers; litdata's StreamingDataset shares its chunks out per worker itself
    (r"Your `IterableDataset` has `__len__` defined", Warning),
    # every training run since the task normalises integer batches in on_after_batch_transfer:
    # Lightning notes that the module's hook is used when a data module is passed, as intended
    (r"You have overridden `on_after_batch_transfer` in `LightningModule`", Warning),
    # an epoch of fewer batches than trainer.log_every_n_steps (small data, large batches):
    # train/loss_epoch and the epoch line still report every epoch
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
    # every distill run: the frozen teacher is in eval mode on purpose (models/teacher.py)
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # every resumed run: it continues in its own folder, whose checkpoints/ holds last.ckpt
    (r"Checkpoint directory .* exists and is not empty", Warning),
    # a trainer.max_steps run that ends before its first validation: there is no score to
    # rank yet; vittune says "no best checkpoint" itself and tests and exports the last weights
    (r"`ModelCheckpoint\(monitor=.*\)` could not find the monitored key", Warning),
]


def quiet_third_party() -> None:
    """Keep the console of a vittune command to vittune's lines, warnings and errors.

    Lightning prints GPU/TPU availability, litlogger tips, "Loading `train_dataloader`..." and
    its stop reason through `logging` at INFO. Its import sets the `lightning.pytorch` and
    `lightning.fabric` loggers to INFO and, unless the root logger has a handler, gives them an
    INFO stream handler; the `lightning` logger above them always gets one. Setting their level
    here would not hold (the CLI imports Lightning later, when a command needs it). So: one
    stderr handler at WARNING on the root logger (Lightning then adds none of its own) and on
    the two Lightning loggers, which stop propagating to `lightning`'s INFO handler. Warnings
    of every library still print, once each.

    Python warnings: vittune's own (an undefined metric, a corrupt file) stay; the known noise
    above is dropped.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.set_name("vittune")
    root = logging.getLogger()
    if any(h.get_name() == "vittune" for h in root.handlers):
        return  # already done in this process
    root.addHandler(handler)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    ignore_known_noise()


def ignore_known_noise() -> None:
    """Drop the Python warnings in KNOWN_NOISE (the rest of `quiet_third_party`'s job)."""
    for message, category in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
