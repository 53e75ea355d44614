"""The input contract written beside an exported file (`<file>.json`).

A deployed model is only as right as the preprocessing in front of it, so the sidecar says
everything the eval transform does: decoding to [0, 1], channel handling, resize, and the
normalisation (expected from the caller, or baked into the graph).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vittune.deploy.formats import INPUT_NAME, OUTPUT_NAME
from vittune.files import atomic_write
from vittune.inference.trained_run import TrainedRun

INTENSITY = {
    "dtype": "divide by the integer type's maximum (uint8 /255, uint16 /65535); signed types"
    " map their whole range to [0, 1]; float images are clipped to [0, 1]",
    "minmax": "per image (x - min) / (max - min); a constant image becomes 0",
}


def channel_rule(in_chans: int) -> str:
    if in_chans == 1:
        return (
            "grey: colour images are converted with ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B)"
        )
    if in_chans == 3:
        return "RGB order (not OpenCV's BGR); grey images repeated to 3 channels, alpha dropped"
    return f"{in_chans} channels as stored; a grey image is repeated to {in_chans} channels"


def input_contract(
    run: TrainedRun,
    fmt: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    baked: bool,
    quantized: str | None,
) -> dict[str, Any]:
    """What a caller must feed the exported file, and what comes out."""
    chans, (height, width) = run.recipe.model.in_chans, run.recipe.model.img_size
    normalise = (
        "baked into the graph: feed [0, 1] pixels"
        if baked
        else "feed (pixels - mean) / std per channel, pixels in [0, 1]"
    )
    return {
        "format": fmt,
        "quantized": quantized,
        "architecture": run.recipe.model.name,
        "run": str(run.folder),
        "weights": str(run.weights),
        "input": {
            "name": INPUT_NAME,  # TorchScript: the first positional argument
            "shape": ["batch", chans, height, width],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": chans,
            "height": height,
            "width": width,
            "channel_rule": channel_rule(chans),
            "intensity_scaling": run.recipe.data.intensity,
            "intensity_rule": INTENSITY[run.recipe.data.intensity],
            "resize": "OpenCV INTER_LINEAR (bilinear) to height x width; no crop, aspect not kept",
            "normalisation": "baked" if baked else "expected",
            "normalisation_rule": normalise,
            "mean": list(mean),
            "std": list(std),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(run.classes)],
            "meaning": "logits; probabilities are "
            + ("sigmoid(logits) per class" if run.multi_label else "softmax(logits)"),
        },
        "multi_label": run.multi_label,
        "classes": list(run.classes),
    }


def write_sidecar(path: Path, contract: dict[str, Any]) -> Path:
    """`<file>.json` beside the exported file, written atomically."""
    sidecar = path.with_name(path.name + ".json")
    text = json.dumps(contract, indent=2) + "\n"
    atomic_write(sidecar, lambda temp: temp.write_text(text))
    return sidecar
