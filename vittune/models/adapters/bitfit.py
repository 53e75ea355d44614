"""BitFit (Ben Zaken et al. 2022): only the bias terms train. Nothing to add or merge: the
trained biases are the model's own, so a BitFit model is already plain timm weights."""

from __future__ import annotations

from torch import nn


def bitfit_trainable(name: str, module: nn.Module, norms: bool) -> bool:
    """Biases always; a norm's scale too when `peft.bitfit_norms` (a documented option)."""
    if name.endswith(".bias") or name == "bias":
        return True
    return norms and isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d)


def select_biases(model: nn.Module, norms: bool = False) -> nn.Module:
    """Freeze everything except the bias terms (and, with `norms`, the norms' weights)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(bitfit_trainable(name, module, norms))
    return model
