"""Reading a run folder's `config.json`: timm's hub layout, or vittune's format before it.

An export's `config.json` is what timm's `save_config_for_hf` writes (`architecture`,
`num_classes`, `label_names`, `model_args`, `pretrained_cfg`), so that
`timm.create_model("local-dir:RUN", pretrained=True)` rebuilds the model; vittune's own facts
sit under a `vittune` key that timm's loader ignores. Runs exported before that wrote one flat
dict (`classes`, `img_size`, `model_kwargs`, ...), which is still read.

Weights may come from anywhere, and `model_args` go back into `timm.create_model`, so the file
is checked here before anything uses it: only known keys, and architecture arguments limited
to geometry (sizes and switches), never a path or an argument that makes timm read a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vittune.errors import WeightsError
from vittune.models.geometry import geometry_problems

# timm's top-level keys (timm/models/_hub.py: save_config_for_hf) and vittune's own.
TIMM_KEYS = frozenset(
    {
        "architecture",
        "num_classes",
        "num_features",
        "global_pool",
        "label_names",
        "label_descriptions",
        "model_args",
        "pretrained_cfg",
    }
)
VITTUNE_KEY = "vittune"
VITTUNE_KEYS = frozenset({"version", "task", "classes", "patch_size", "grid", "peft", "ema"})
# The flat format vittune wrote before it followed timm's layout.
LEGACY_KEYS = frozenset(
    {
        "architecture",
        "task",
        "classes",
        "num_classes",
        "img_size",
        "patch_size",
        "in_chans",
        "mean",
        "std",
        "model_kwargs",
    }
)
# The input geometry timm records in `model_args`; the recipe sets these, not `model.kwargs`.
INPUT_ARGS = frozenset({"img_size", "patch_size", "in_chans", "num_classes"})
# Architecture arguments go back into timm.create_model, so only geometry (sizes and switches)
# is accepted: a path-taking argument (checkpoint_path, pretrained_cfg_overlay) would make timm
# load files that `pretrained_sha256` never checked.
GEOMETRY_KWARGS = frozenset(
    {
        "embed_dim",
        "embed_dims",
        "depth",
        "depths",
        "num_heads",
        "mlp_ratio",
        "mlp_ratios",
        "qkv_bias",
        "qk_norm",
        "class_token",
        "global_pool",
        "reg_tokens",
        "no_embed_class",
        "pos_embed",
        "pre_norm",
        "fc_norm",
        "init_values",
        "dynamic_img_size",
        "dynamic_img_pad",
        "window_size",
        "dims",
        "widths",
        "layers",
        "channels",
        "stem_width",
        "output_stride",
    }
)
_WORD = re.compile(r"[A-Za-z0-9_]{1,32}")  # "avg", "token", "learn": names, never paths
FIX = (
    "re-export the run, or point model.pretrained at the weight file and set the recipe's geometry"
)


@dataclass(frozen=True)
class RunConfig:
    """What a run folder's config.json says about the weights beside it.

    `model_kwargs` are the architecture arguments besides the input geometry (embed_dim, depth,
    ...), ready for `timm.create_model`; `None` fields were not recorded.
    """

    path: Path
    architecture: str | None = None
    task: str | None = None
    classes: list[str] = field(default_factory=list)
    num_classes: int | None = None
    img_size: tuple[int, int] | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    legacy: bool = False  # the flat format of runs exported before timm's layout

    @property
    def grid(self) -> tuple[int, int] | None:
        """The token grid the weights were trained at, when size and patch are known."""
        if self.img_size is None or not self.patch_size:
            return None
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


def _fail(config_file: Path, what: str) -> WeightsError:
    return WeightsError(f"{config_file}: {what}; {FIX}")


def _geometry_value(value: Any) -> bool:
    if isinstance(value, bool | int | float) or value is None:
        return True
    if isinstance(value, str):
        return _WORD.fullmatch(value) is not None
    if isinstance(value, list):
        return all(isinstance(v, bool | int | float) for v in value)
    return False


def _check_args(config_file: Path, name: str, args: Any, allowed: frozenset[str]) -> dict:
    if not isinstance(args, dict):
        raise _fail(config_file, f"{name} must be an object")
    refused = sorted(k for k, v in args.items() if k not in allowed or not _geometry_value(v))
    if refused:
        raise _fail(
            config_file,
            f"{name} {refused} are not architecture geometry (sizes and switches such as depth, embed_dim)",
        )
    _check_bounds(config_file, name, args)
    return args


def _check_bounds(config_file: Path, name: str, args: dict[str, Any]) -> None:
    # before anything is built: timm allocates the whole model from these numbers
    problems = geometry_problems(args)
    if problems:
        raise _fail(config_file, f"{name} out of range: {'; '.join(problems[:3])}")


def _names(config_file: Path, name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _fail(config_file, f"{name} must be a list of names")
    return list(value)


def _numbers(config_file: Path, name: str, value: Any, kind: type = float) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise _fail(config_file, f"{name} must be a list of numbers")
    return tuple(kind(v) for v in value)


def _size(config_file: Path, name: str, value: Any) -> tuple[int, int] | None:
    size = _numbers(config_file, name, value, int)
    if size is None:
        return None
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2:
        raise _fail(config_file, f"{name} must be [height, width]")
    return size


def _optional_int(config_file: Path, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # timm may record a square patch as [p, p]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(config_file, f"{name} must be an integer")
    return value


def _read_timm(config_file: Path, config: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(config) - TIMM_KEYS - {VITTUNE_KEY})
    if unknown:
        raise _fail(config_file, f"unknown keys {unknown}")
    args = _check_args(
        config_file, "model_args", config.get("model_args") or {}, GEOMETRY_KWARGS | INPUT_ARGS
    )
    own = config.get(VITTUNE_KEY) or {}
    if not isinstance(own, dict) or set(own) - VITTUNE_KEYS:
        raise _fail(
            config_file, f"{VITTUNE_KEY} must be an object with keys {sorted(VITTUNE_KEYS)}"
        )
    pretrained = config.get("pretrained_cfg") or {}
    if not isinstance(pretrained, dict):
        raise _fail(config_file, "pretrained_cfg must be an object")
    input_size = _numbers(
        config_file, "pretrained_cfg.input_size", pretrained.get("input_size"), int
    )
    if input_size is not None and len(input_size) != 3:
        raise _fail(config_file, "pretrained_cfg.input_size must be [channels, height, width]")
    _check_bounds(config_file, "config", {"num_classes": config.get("num_classes")})
    img_size = _size(config_file, "model_args.img_size", args.get("img_size"))
    patch = own.get("patch_size", args.get("patch_size"))
    in_chans = args.get("in_chans", input_size[0] if input_size else None)
    classes = _names(config_file, "label_names", config.get("label_names"))
    sizes = {"patch_size": patch, "in_chans": in_chans}
    _check_bounds(
        config_file,
        "config",
        {**sizes, "img_size": list(img_size or input_size or [])[-2:] or None},
    )
    return RunConfig(
        path=config_file,
        architecture=config.get("architecture"),
        task=own.get("task"),
        classes=classes or _names(config_file, "vittune.classes", own.get("classes")),
        num_classes=_optional_int(config_file, "num_classes", config.get("num_classes")),
        img_size=img_size or (tuple(input_size[1:]) if input_size else None),
        patch_size=_optional_int(config_file, "patch_size", patch),
        in_chans=_optional_int(config_file, "in_chans", in_chans),
        mean=_numbers(config_file, "pretrained_cfg.mean", pretrained.get("mean")),
        std=_numbers(config_file, "pretrained_cfg.std", pretrained.get("std")),
        model_kwargs={k: v for k, v in args.items() if k not in INPUT_ARGS},
    )


def _read_legacy(config_file: Path, config: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(config) - LEGACY_KEYS)
    if unknown:
        raise _fail(config_file, f"unknown keys {unknown}")
    kwargs = _check_args(
        config_file, "model_kwargs", config.get("model_kwargs") or {}, GEOMETRY_KWARGS
    )
    sizes = {k: config.get(k) for k in ("num_classes", "img_size", "patch_size", "in_chans")}
    _check_bounds(config_file, "config", sizes)
    return RunConfig(
        path=config_file,
        architecture=config.get("architecture"),
        task=config.get("task"),
        classes=_names(config_file, "classes", config.get("classes")),
        num_classes=_optional_int(config_file, "num_classes", config.get("num_classes")),
        img_size=_size(config_file, "img_size", config.get("img_size")),
        patch_size=_optional_int(config_file, "patch_size", config.get("patch_size")),
        in_chans=_optional_int(config_file, "in_chans", config.get("in_chans")),
        mean=_numbers(config_file, "mean", config.get("mean")),
        std=_numbers(config_file, "std", config.get("std")),
        model_kwargs=dict(kwargs),
        legacy=True,
    )


def read_run_config(config_file: Path) -> RunConfig:
    """A run's config.json, checked: it is read next to weights that may come from anywhere."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{config_file} is not valid JSON ({err}); {FIX}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{config_file} is not a JSON object; {FIX}")
    if "pretrained_cfg" in config or "model_args" in config:
        return _read_timm(config_file, config)
    return _read_legacy(config_file, config)
