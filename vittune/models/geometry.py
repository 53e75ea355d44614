"""Bounds on the architecture geometry a run folder's `config.json` may ask for.

`model_args` go into `timm.create_model`, and the model is allocated before any weight is
read: `depth: 1000000000` grew a process to 6 GB in 22 s and kept growing, and a negative
depth, `num_heads: 0` or `embed_dim: 3e6` ended in timm tracebacks. Every value is checked
here, before anything is built, against ranges wider than any released ViT-family model
(the largest, ViT-22B, is 6144 wide and 48 deep), and the whole model's size is estimated.
"""

from __future__ import annotations

import math
from typing import Any

# name -> (lowest, highest) for integer values (or lists of them)
INT_RANGES: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16384),
    "embed_dims": (1, 16384),
    "dims": (1, 16384),
    "widths": (1, 16384),
    "channels": (1, 16384),
    "stem_width": (1, 16384),
    "depth": (1, 256),
    "depths": (0, 256),
    "layers": (0, 256),
    "num_heads": (1, 1024),
    "reg_tokens": (0, 256),
    "window_size": (1, 1024),
    "output_stride": (1, 64),
    "img_size": (1, 8192),
    "patch_size": (1, 1024),
    "in_chans": (1, 1024),
    "num_classes": (0, 1_000_000),
}
# name -> (lowest, highest) for real values; the lowest is excluded when it is 0
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "mlp_ratio": (0.0, 64.0),
    "mlp_ratios": (0.0, 64.0),
    "init_values": (0.0, 100.0),
}
MAX_LIST = 16  # stages of a hierarchical model; img_size / patch_size lists hold 2
MAX_PARAMETERS = 10_000_000_000  # 40 GB in float32: beyond anything this toolkit trains


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _out_of_range(name: str, value: Any) -> str | None:
    """Why `value` is not an acceptable `name`, or None when it is."""
    if value is None or (name not in INT_RANGES and name not in FLOAT_RANGES):
        return None  # switches and short names are checked by run_config
    if isinstance(value, bool | str):
        return f"{name} {value!r} (a number)"
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_LIST:
        return f"{name} has {len(items)} entries (at most {MAX_LIST})"
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        if not all(_int(v) and low <= v <= high for v in items):
            return f"{name} {value!r} (whole numbers {low}..{high})"
    elif name in FLOAT_RANGES:
        low, high = FLOAT_RANGES[name]
        ok = all(
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (low < v if low == 0 and name != "init_values" else low <= v)
            and v <= high
            for v in items
        )
        if not ok:
            return f"{name} {value!r} (numbers in {low}..{high})"
    return None


def geometry_problems(args: dict[str, Any]) -> list[str]:
    """What is out of range in architecture arguments (empty when all is well)."""
    problems = [p for name, v in args.items() if (p := _out_of_range(name, v))]
    if problems:
        return problems
    dim, heads = args.get("embed_dim"), args.get("num_heads")
    if _int(dim) and _int(heads) and dim % heads:
        problems.append(f"embed_dim {dim} is not a multiple of num_heads {heads}")
    depth, ratio = args.get("depth"), args.get("mlp_ratio", 4.0)
    if _int(dim) and _int(depth) and isinstance(ratio, int | float):
        # a transformer block: qkv + proj (4 d^2) and the MLP (2 r d^2)
        parameters = depth * dim * dim * (4 + 2 * ratio)
        if parameters > MAX_PARAMETERS:
            problems.append(
                f"depth {depth} x embed_dim {dim} makes about {parameters / 1e9:.0f} billion"
                f" parameters (at most {MAX_PARAMETERS / 1e9:.0f} billion)"
            )
    return problems
