"""The options of `vittune export`, checked before any work: each mistake is one line."""

from __future__ import annotations

from pathlib import Path

from vittune.deploy.formats import FORMATS, SUFFIXES, max_opset, require_extra
from vittune.errors import RecipeError

QUANTIZE_CHOICES = ("int8",)
MIN_OPSET = 17  # LayerNormalization; older targets fail in onnx's version converter


def check_options(
    fmt: str,
    out: Path | None,
    opset: int | None,
    quantize: str | None,
    tolerance: float,
    check_limit: int | None,
) -> None:
    """Refuse a mistake in the options, or a missing ONNX package, before the run is read."""
    if fmt not in FORMATS:
        raise RecipeError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is not None:
        _check_out(out, fmt)
    if opset is not None and fmt != "onnx":
        raise RecipeError("--opset applies to --format onnx only")
    if opset is not None and opset < MIN_OPSET:
        raise RecipeError(
            f"--opset {opset} has no LayerNormalization, which a ViT needs; use {MIN_OPSET} or later"
        )
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise RecipeError(f"--quantize must be {' or '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if check_limit is not None and check_limit < 1:
        raise RecipeError(f"--check-images must be at least 1, got {check_limit}")
    if not tolerance > 0:
        raise RecipeError(f"--tolerance must be positive, got {tolerance}")
    if fmt == "onnx":
        require_extra()
        check_opset(opset)


def _check_out(out: Path, fmt: str) -> None:
    """`--out` names a file with the format's suffix (a loader picks the format by it)."""
    suffix = SUFFIXES[fmt]
    if out.is_dir():
        raise RecipeError(
            f"--out {out} is a folder; name a file in it, e.g. {out / 'model'}{suffix}"
        )
    if out.suffix.lower() != suffix:
        other = next((f for f, s in SUFFIXES.items() if s == out.suffix.lower()), None)
        renamed = out.with_suffix(suffix) if other else out.with_name(out.name + suffix)
        hint = f" or pass --format {other}" if other else ""
        raise RecipeError(f"--out {out} does not end in {suffix}; name it {renamed}{hint}")


def check_opset(opset: int | None) -> None:
    """An opset above what the installed exporter writes fails deep in onnx; say so at once."""
    if opset is not None and opset > (newest := max_opset()):
        raise RecipeError(
            f"--opset {opset} is above {newest}, the newest the installed exporter (torch.onnx"
            f" with onnxscript's converter) writes; use {MIN_OPSET} to {newest}"
        )
