"""Finding, verifying and reading weight files safely (`weights_only=True`, safetensors)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vittune.errors import WeightsError
from vittune.models.run_config import RunConfig, read_run_config
from vittune.models.safetensors_check import check_safetensors
from vittune.netprobe import PROBE_TIMEOUT_S, endpoint_reachable

WEIGHT_FILES = ("model.safetensors", "encoder.safetensors")
LIGHTNING_PREFIX = "model."  # every vittune task keeps its timm backbone as `self.model`


@dataclass
class WeightSource:
    """A weight file and what vittune knows about it (from a `config.json` beside it)."""

    path: Path
    config: RunConfig | None = None  # None: no config.json beside the weights


def resolve_weight_file(spec: str | Path) -> WeightSource:
    """Accept a weight file, or a vittune run folder (its export, else its last checkpoint)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_FILES] + [path / "checkpoints" / "last.ckpt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise WeightsError(
                f"{path} holds no {', '.join(WEIGHT_FILES)} or checkpoints/last.ckpt; point pretrained at a weight file"
            )
        path = found
    elif not path.is_file():
        raise WeightsError(
            f"pretrained weights {path} not found; give a .safetensors/.pth/.bin/.ckpt file, a run folder, or true for hub weights"
        )
    config_file = path.parent / "config.json"
    if not config_file.is_file() and path.parent.name == "checkpoints":
        config_file = path.parent.parent / "config.json"
    config = read_run_config(config_file) if config_file.is_file() else None
    return WeightSource(path, config)


def verify_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise WeightsError(
            f"{path} has sha256 {digest.hexdigest()}, not the expected {expected}; the file is corrupt or not the one you meant"
        )


def read_state_dict(
    path: Path, prefixes: tuple[str, ...] = (LIGHTNING_PREFIX,)
) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from torch pickles loaded with `weights_only=True`.

    Lightning checkpoints are unwrapped to the backbone: the tensors under the first of
    `prefixes` that the checkpoint has (`model.`; an EMA export asks for `ema.module.` first),
    that prefix stripped.
    """
    if path.suffix == ".safetensors":
        check_safetensors(path)  # sizes against the file's, before the library allocates
        try:
            return load_file(str(path))
        except SafetensorError as err:  # what the header check cannot see
            raise WeightsError(f"{path} cannot be read as safetensors: {err}") from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles that need arbitrary code are refused here
        raise WeightsError(
            f"cannot load {path} safely (weights_only=True): {str(err).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict):
        raise WeightsError(f"{path} holds no state dict")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in content)), None)
    if prefix is not None:
        content = {k[len(prefix) :]: v for k, v in content.items() if k.startswith(prefix)}
    return {k.removeprefix("module."): v for k, v in content.items() if isinstance(v, torch.Tensor)}


DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The hub huggingface_hub downloads from: `HF_ENDPOINT` (a mirror) or the public one."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hub_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A bounded probe so that an offline machine fails fast instead of waiting on retries."""
    return endpoint_reachable(url or hub_endpoint(), timeout)


def prepare_hub_access() -> None:
    """Switch huggingface_hub to its offline cache when the hub (`HF_ENDPOINT`) does not answer.

    Honours a user's HF_HUB_OFFLINE; never waits longer than the probe's deadline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        except (ImportError, AttributeError):
            pass
