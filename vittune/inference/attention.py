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
    for path in expand_inputs(inputs):
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
                out / f"{path.stem}_attention.png",
                title,
            )
        )
    if not written:
        raise DataError(f"no input image could be read; the first: {failed[0]}")
    return written, failed
