"""LoRA, DoRA and IA3 through Hugging Face peft, injected into the timm model in place.

`inject_adapter_in_model` keeps the model a timm module (no `PeftModel` wrapper), so
parameter names stay timm's plus the adapter's (`blocks.3.attn.qkv.lora_A.default.weight`):
timm's `group_matcher` still puts each adapter in its block for layer-wise lr decay, and
the head keeps its name for export. peft is imported here only, when a run asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vittune.models.adapters.targets import head_names, target_names
from vittune.recipe.schema import PeftConfig

PEFT_METHODS = ("lora", "dora", "ia3")
# peft's save_pretrained prefixes every key with the PeftModel's path to the base model.
PEFT_PREFIX = "base_model.model."


def peft_config(model: nn.Module, cfg: PeftConfig, modules_to_save: list[str] | None = None):
    """The peft config for `cfg.method` with full target names (see targets.py)."""
    from peft import IA3Config, LoraConfig  # noqa: PLC0415

    names = target_names(model, cfg.targets)
    if cfg.method == "ia3":
        # IA3 scales a feed-forward layer's input and any other layer's output (Liu et al.
        # 2022: keys, values and the MLP's inner activations): fc2's input is fc1's output.
        feedforward = [n for n in names if n.endswith("mlp.fc2")]
        return IA3Config(
            target_modules=names, feedforward_modules=feedforward, modules_to_save=modules_to_save
        )
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=names,
        use_dora=cfg.method == "dora",
        modules_to_save=modules_to_save,
    )


def inject(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Add the adapters in place; everything but the adapters frozen (`apply_peft` then
    trains the head(s) too, as for every method)."""
    from peft import inject_adapter_in_model  # noqa: PLC0415

    inject_adapter_in_model(peft_config(model, cfg), model)
    return model


def is_adapter_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    return isinstance(module, BaseTunerLayer)


def merge_in_place(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (timm names again)."""
    wrapped = [(name, m) for name, m in model.named_modules() if is_adapter_layer(m)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and head tensors in peft's `save_pretrained` key layout."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415

    state = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model).items()}
    heads = head_names(model)
    for name, tensor in model.state_dict().items():
        if name in heads:
            state[PEFT_PREFIX + name] = tensor
    return state


def save(model: nn.Module, cfg: PeftConfig, folder: Path) -> dict[str, Any]:
    """adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes
    them: `PeftModel.from_pretrained(base_timm_model, folder)` loads them (heads included,
    via `modules_to_save`)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    heads = sorted({n.rsplit(".", 1)[0] for n in head_names(model)})
    config = peft_config(model, cfg, modules_to_save=heads)
    config.save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"files": ["adapter_config.json", "adapter_model.safetensors"]}
