"""Parameter-efficient transfer on a timm model: `apply_peft(model, cfg)` adds the adapters
of `peft.method` in place and leaves only them and the head trainable; `merged_model` folds
them back into plain timm weights for the export; `save_adapter` / `load_adapter` write and
re-apply the adapter alone (docs/peft.md).

| method          | lives in        | merges into plain timm weights             |
|-----------------|-----------------|--------------------------------------------|
| lora, dora, ia3 | peft            | yes (peft's merge)                         |
| ssf             | ssf.py          | yes (folded into the preceding layer)      |
| bitfit          | bitfit.py       | nothing to merge (the biases are timm's)   |
| vpt             | vpt.py          | yes on a plain timm ViT (register tokens)  |
| vpt_deep        | vpt.py          | no: prompts enter every block              |
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vittune.models.adapters import bitfit, peft_methods, ssf, vpt
from vittune.models.adapters.targets import head_names
from vittune.recipe.schema import PeftConfig

ADAPTER_JSON = "vittune_adapter.json"
ADAPTER_TENSORS = "adapter.safetensors"


def apply_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Add `cfg.method`'s adapters in place; only adapters and head(s) keep `requires_grad`."""
    if cfg.method == "none":
        return model
    heads = head_names(model)
    if cfg.method in peft_methods.PEFT_METHODS:
        peft_methods.inject(model, cfg)
    elif cfg.method in ("vpt", "vpt_deep"):
        vpt.add_prompts(model, cfg.prompt_tokens, deep=cfg.method == "vpt_deep")
    elif cfg.method == "ssf":
        ssf.add_ssf(model, cfg.targets)
    elif cfg.method == "bitfit":
        bitfit.select_biases(model, cfg.bitfit_norms)
    for name, param in model.named_parameters():
        if name in heads:
            param.requires_grad_(True)
    return model


def is_mergeable(model: nn.Module, cfg: PeftConfig) -> bool:
    """Whether `merged_model` gives plain timm weights (all but VPT-deep / VPT on DeiT)."""
    if cfg.method in ("vpt", "vpt_deep"):
        return vpt.mergeable(model, deep=cfg.method == "vpt_deep")
    return True


def merged_model(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """A copy of `model` as a plain timm module with the adapters folded in.

    Where they cannot fold (`is_mergeable` false) the copy keeps its prompts and hooks.
    """
    if cfg.method in peft_methods.PEFT_METHODS:
        return peft_methods.merge_in_place(copy.deepcopy(model))
    if cfg.method == "ssf":
        return _plain_copy(model, ssf.merge_state(model.state_dict()))
    if cfg.method in ("vpt", "vpt_deep") and is_mergeable(model, cfg):
        return _register_token_model(model, cfg.prompt_tokens)
    return copy.deepcopy(model)


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor], **changed: Any) -> nn.Module:
    """A new timm model of the same architecture (with `changed` constructor arguments)
    holding `state` (no hooks, no extras)."""
    import timm  # noqa: PLC0415

    args = {**model._model_args, **changed}
    plain = timm.create_model(model.pretrained_cfg["architecture"], **args)
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device).train(model.training)


def _register_token_model(model: nn.Module, tokens: int) -> nn.Module:
    """VPT's prompts as timm register tokens: a plain model with `tokens` more of them."""
    state = vpt.as_register_tokens(
        model.state_dict(), model.num_prefix_tokens, model.no_embed_class
    )
    return _plain_copy(model, state, reg_tokens=model._model_args.get("reg_tokens", 0) + tokens)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(model: nn.Module, cfg: PeftConfig, folder: Path, base: str) -> Path:
    """Write the adapter alone into `folder` (created): peft's `save_pretrained` layout for
    lora/dora/ia3, `adapter.safetensors` (the trainable tensors by timm name) otherwise, and
    `vittune_adapter.json` (the method, its settings and the base weights it applies to)."""
    folder.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "method": cfg.method,
        "peft": cfg.model_dump(mode="json"),
        "base": base,
        "architecture": model.pretrained_cfg.get("architecture"),
        "model_args": _jsonable(getattr(model, "_model_args", {})),
    }
    if cfg.method in peft_methods.PEFT_METHODS:
        info.update(peft_methods.save(model, cfg, folder))
    else:
        from safetensors.torch import save_file  # noqa: PLC0415

        params = dict(model.named_parameters())
        state = {n: params[n].detach().cpu().contiguous().clone() for n in trainable_names(model)}
        save_file(state, str(folder / ADAPTER_TENSORS), metadata={"format": "pt"})
        info["files"] = [ADAPTER_TENSORS]
    (folder / ADAPTER_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if isinstance(v, int | float | str | bool | list | tuple)}


def load_adapter(base: nn.Module, folder: str | Path) -> nn.Module:
    """`base` (a timm model with the weights the run started from and the run's head size)
    with the adapter in `folder` applied and merged (VPT-deep: applied, not merged).

    `base` itself receives the adapters (in place); pass a copy to keep it plain.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = Path(folder)
    info = json.loads((folder / ADAPTER_JSON).read_text())
    cfg = PeftConfig(**info["peft"])
    if cfg.method in peft_methods.PEFT_METHODS:
        from peft import PeftModel  # noqa: PLC0415

        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    model = apply_peft(base, cfg)
    missing, unexpected = model.load_state_dict(
        load_file(str(folder / ADAPTER_TENSORS)), strict=False
    )
    wanted = set(trainable_names(model))
    if unexpected or wanted & set(missing):
        raise ValueError(
            f"{folder} does not fit this model: missing {sorted(wanted & set(missing))[:4]}, unexpected {unexpected[:4]}"
        )
    return merged_model(model, cfg) if is_mergeable(model, cfg) else model
