"""The weights a PEFT or EMA run exports: read from its best checkpoint, the EMA's average
when there is one, with the adapters folded into plain timm weights (`merged_model`)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vittune.files import is_write_failure, storage_error
from vittune.models.adapters import is_mergeable, merged_model, save_adapter
from vittune.models.backbone import tensor_bytes
from vittune.models.weights import LIGHTNING_PREFIX, read_state_dict
from vittune.recipe.schema import PeftConfig

EMA_PREFIX = "ema.module."  # tasks/ema.py: the task's `ema` child, timm's ModelEmaV3


@dataclass
class ExportedWeights:
    module: nn.Module  # the plain timm model (or, unmergeable, the prompted one)
    state: dict[str, torch.Tensor]  # its weights, in timm key names
    adapted: nn.Module  # the trained model with its adapters, for adapter/
    merged: bool  # whether `state` is plain timm weights


def checkpoint_weights(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The backbone's tensors in a vittune checkpoint: the EMA's average if asked and present."""
    return read_state_dict(path, (EMA_PREFIX, LIGHTNING_PREFIX) if ema else (LIGHTNING_PREFIX,))


def exported_weights(
    model: nn.Module, cfg: PeftConfig, state: dict[str, torch.Tensor]
) -> ExportedWeights:
    """`state` (the adapted model's keys) loaded into a copy of `model`, then merged."""
    adapted = copy.deepcopy(model).cpu()
    adapted.load_state_dict(state, strict=True)
    mergeable = is_mergeable(adapted, cfg)
    module = merged_model(adapted, cfg) if cfg.method != "none" else adapted
    return ExportedWeights(module, module.state_dict(), adapted, mergeable)


def write_adapter(weights: ExportedWeights, cfg: PeftConfig, run_dir: Path, base: str) -> Path:
    """`adapter/` beside the export, replaced whole (written aside first, then renamed); a
    write the storage refuses is one StorageError line, and the earlier `adapter/` is kept."""
    final, scratch = run_dir / "adapter", run_dir / ".adapter.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        save_adapter(weights.adapted, cfg, scratch, base)
    except BaseException as err:
        shutil.rmtree(scratch, ignore_errors=True)
        if is_write_failure(err):
            trained = (p for p in weights.adapted.parameters() if p.requires_grad)
            raise storage_error(final, tensor_bytes(trained), err) from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    return final
