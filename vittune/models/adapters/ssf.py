"""SSF (Lian et al. 2022, "Scaling & Shifting Your Features"): a learned per-channel scale
and shift after chosen layers of every block; neither timm nor peft has it, so it is written
here as a parameter pair on the layer plus a forward hook.

Following the paper's reference code, the factors follow the attention's qkv and proj, the
MLP's fc1 and fc2 and both LayerNorms of each block; scales start at N(1, 0.02), shifts at
N(0, 0.02). Because `y * s + t` after a linear or LayerNorm is again a linear or LayerNorm,
the trained factors fold into the preceding layer (`merge_state`), leaving plain timm weights.
"""

from __future__ import annotations

import torch
from torch import nn

from vittune.errors import RecipeError
from vittune.models.adapters.targets import target_names

SCALE, SHIFT = "ssf_scale", "ssf_shift"
NORMS = ("norm1", "norm2")


def _ssf_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, SCALE) + getattr(module, SHIFT)  # [..., C] * [C] + [C]


def ssf_layer_names(model: nn.Module, targets: list[str]) -> list[str]:
    """The layers SSF follows: the recipe's targets and both norms of every block."""
    return target_names(model, [*targets, *(n for n in NORMS if n not in targets)])


def add_ssf(model: nn.Module, targets: list[str]) -> nn.Module:
    """Add scale/shift after each chosen layer in place; the rest of the model is frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in ssf_layer_names(model, targets):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear | nn.LayerNorm):
            raise RecipeError(
                f"SSF follows linear layers and LayerNorms; {name} is a {type(layer).__name__}:"
                " drop it from peft.targets"
            )
        if layer.bias is None:  # checked now, not at the export after training
            raise RecipeError(
                f"SSF folds into the layer it follows, and {name} has no bias (e.g. a model"
                " built with qkv_bias=False); drop it from peft.targets"
            )
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.weight.shape[0]
        weight = layer.weight
        scale = nn.Parameter(torch.empty(channels, device=weight.device, dtype=weight.dtype))
        shift = nn.Parameter(torch.empty(channels, device=weight.device, dtype=weight.dtype))
        nn.init.normal_(scale, mean=1.0, std=0.02)
        nn.init.normal_(shift, std=0.02)
        layer.register_parameter(SCALE, scale)
        layer.register_parameter(SHIFT, shift)
        layer.register_forward_hook(_ssf_hook)
    return model


def merge_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold every `X.ssf_scale` / `X.ssf_shift` into `X.weight` / `X.bias` (a pure function).

    Linear: y = (W x + b) * s + t = (diag(s) W) x + (s b + t).
    LayerNorm: y = (w n + b) * s + t = (s w) n + (s b + t), n the normalised input.
    """
    merged = {k: v for k, v in state.items() if not k.endswith((SCALE, SHIFT))}
    for key in state:
        if not key.endswith(SCALE):
            continue
        prefix = key[: -len(SCALE)]
        scale, shift = state[key].float(), state[prefix + SHIFT].float()  # [C], [C]
        weight = state[prefix + "weight"]  # linear [C, D_in]; norm [C]
        bias = state.get(prefix + "bias")
        if bias is None:
            raise RecipeError(
                f"SSF cannot fold into {prefix[:-1]}: it has no bias; drop it from peft.targets"
            )
        factor = scale[:, None] if weight.ndim == 2 else scale
        merged[prefix + "weight"] = (weight.float() * factor).to(weight.dtype)
        merged[prefix + "bias"] = (bias.float() * scale + shift).to(bias.dtype)
    return merged
