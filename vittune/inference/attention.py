"""`vittune attention RUN IMAGES... --out DIR`: one attention figure per image of a trained run.

Per image one PNG: the input, the last block's class-token attention (the mean over heads
and each head), and the attention rollout, upsampled over the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vittune.data.decode import read_image
from vittune.errors import DataError
from vittune.evaluation.attention_figures import display_image, save_attention_figure
from vittune.evaluation.inputs import expand_inputs
from vittune.inference.trained_run import build_trained, load_trained_run
from vittune.models.attention import attention_maps


def attention_for_files(
    run_folder: str | Path,
    inputs: list[str],
    out: str | Path,
    weights: str = "best",
    fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> tuple[list[Path], list[str]]:
    """(PNGs written to `out`, one per readable image; "path: why" for unreadable ones)."""
    run = load_trained_run(run_folder, [], weights)
    assembly = build_trained(run)
    model, transform = assembly.task.model, assembly.datamodule.eval_transform
    cfg = run.recipe.data
    out = Path(out)
    written, failed = [], []
    paths = expand_inputs(inputs)
    for path, name in zip(paths, figure_names(paths), strict=True):
        try:
            pixels = read_image(
                path,
                run.recipe.model.in_chans,
                cfg.intensity,
                cfg.max_image_pixels,
                assembly.datamodule.dicom,
            )
        except DataError as err:
            failed.append(f"{path}: {err}")
            continue
        image = transform(image=pixels)["image"].unsqueeze(0)  # [1, C, H, W]
        with torch.no_grad():
            probs = assembly.task.probabilities(assembly.task(image))[0]
        heads, rollout = attention_maps(model, image, fusion, discard_ratio)
        best = int(probs.argmax())
        title = f"{path.name}: {run.classes[best]} ({float(probs[best]):.2f})"
        written.append(
            save_attention_figure(
                display_image(image[0], assembly.mean, assembly.std),
                heads[0].numpy(),
                rollout[0].numpy(),
                out / f"{name}_attention.png",
                title,
            )
        )
    if not written:
        raise DataError(f"no input image could be read; the first: {failed[0]}")
    return written, failed


def figure_names(paths: list[Path]) -> list[str]:
    """One name per input, never two alike: the file's stem, preceded by as many of its
    folders as it takes to tell apart inputs that share a stem (class folders that each hold
    a 0.png: `a_0`, `b_0`). The same file given twice gets `-2`."""
    parts = [(*p.parent.parts, p.stem) for p in paths]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        names = ["_".join(p[-depth:]).lstrip("/_") or "image" for p in parts]
        if len(set(names)) == len(names):
            return names
    seen: dict[str, int] = {}
    unique = []
    for name in (p[-1] for p in parts):
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique
