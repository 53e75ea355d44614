"""`vittune export RUN`: a trained run to a checked ONNX or TorchScript file (and int8 variant).

Order: build the run's classifier exactly as evaluate/predict do, export it, run the file on
the run's validation images and compare with PyTorch (a file that disagrees is removed and
the command fails), write the input contract beside it, optionally quantise, and measure
accuracy, size and latency into `RUN/export/report.json`.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vittune.deploy.contract import input_contract, write_sidecar
from vittune.deploy.formats import (
    FORMATS,
    SUFFIXES,
    Normalised,
    export_onnx,
    export_torchscript,
    file_size,
    load_runner,
    onnx_opset,
    quantize_onnx,
    quantize_torchscript,
    require_extra,
)
from vittune.deploy.measure import (
    Agreement,
    agreement,
    check_images,
    latency_ms,
    run_batched,
    torch_logits,
    validation_samples,
)
from vittune.errors import RecipeError
from vittune.files import atomic_write
from vittune.inference.trained_run import build_trained, load_trained_run

QUANTIZE_CHOICES = ("int8",)
LATENCY_BATCHES = (1, 32)
MIN_OPSET = 17  # LayerNormalization; older targets fail in onnx's version converter


@dataclass
class Variant:
    """One model measured on the check images: PyTorch itself, the export, its int8 variant."""

    name: str  # "pytorch fp32", "onnx fp32", "onnx int8", ...
    path: Path | None
    size_bytes: int | None
    check: Agreement  # against the PyTorch fp32 logits
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms per image


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    report: Path
    fmt: str
    source: str  # check images: "validation" or "random"
    note: str | None  # why random inputs stood in
    num_images: int
    tolerance: float
    variants: list[Variant]


def _removed(path: Path) -> None:
    for stale in (path, path.with_name(path.name + ".data"), path.with_name(path.name + ".json")):
        stale.unlink(missing_ok=True)


def int8_path(path: Path) -> Path:
    """`model.onnx` -> `model.int8.onnx`."""
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def _check_options(
    fmt: str, opset: int | None, quantize: str | None, tolerance: float, check_limit: int | None
) -> None:
    if fmt not in FORMATS:
        raise RecipeError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
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


def export_run(
    run_folder: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    opset: int | None = None,
    weights: str = "best",
    bake_normalisation: bool = False,
    quantize: str | None = None,
    tolerance: float = 1e-4,
    check_limit: int | None = 1000,
    latency_repeats: int = 20,
    log: Callable[[str], None] = lambda line: None,
) -> ExportResult:
    """Export a finetune or distill run, check it against PyTorch, and write its report.

    `check_limit` caps the validation images used (evenly spaced; None: all of them), which
    the accuracies are measured on too; `latency_repeats`
    is how many timed runs each median is taken over.
    """
    _check_options(fmt, opset, quantize, tolerance, check_limit)
    if fmt == "onnx":
        require_extra()
    run = load_trained_run(run_folder, [], weights)
    samples, note = validation_samples(run)
    assembly = build_trained(run, samples)
    model = assembly.task.model.cpu().eval()  # a distilled DeiT averages its heads in eval
    mean, std = assembly.mean, assembly.std
    deployed = Normalised(model, mean, std).eval() if bake_normalisation else model

    check = check_images(run, assembly, check_limit, note)
    if check.note:
        log(f"  note: {check.note}; checking on {len(check.images)} random inputs instead")
    reference = torch_logits(model, check.images)  # [N, K]
    feed = check.images
    if bake_normalisation:  # the baked graph takes [0, 1] pixels: undo the eval transform's step
        feed = feed * deployed.std + deployed.mean  # [N, C, H, W]
    feed_np = np.ascontiguousarray(feed.numpy(), dtype=np.float32)

    path = Path(out) if out else run.folder / "export" / f"model{SUFFIXES[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # An earlier export's files (its int8 variant too) must not outlive or describe this one.
    _removed(path)
    _removed(int8_path(path))
    try:
        if fmt == "onnx":
            export_onnx(deployed, feed[:2], path, opset)
        else:
            export_torchscript(deployed, feed[:2], path)
        runner = load_runner(path, fmt)
        result = agreement(reference, run_batched(runner, feed_np), check.targets)
    except BaseException:
        _removed(path)
        raise
    if not np.isfinite(result.max_abs_diff) or result.max_abs_diff > tolerance:
        _removed(path)
        raise RecipeError(
            f"the {fmt} export differs from PyTorch by {result.max_abs_diff:.3g} in the logits"
            f" (tolerance {tolerance:g}, top-1 agreement {result.top1_agreement:.2%}) on"
            f" {len(feed)} {check.source} images; removed {path}"
        )
    shapes = {b: (b, *feed.shape[1:]) for b in LATENCY_BATCHES}

    def measured(name: str, file: Path | None, check_: Agreement, run_) -> Variant:
        times = {b: latency_ms(run_, shape, latency_repeats) for b, shape in shapes.items()}
        return Variant(name, file, file_size(file) if file else None, check_, times)

    variants = [
        measured(
            "pytorch fp32",
            None,
            agreement(reference, reference, check.targets),
            lambda images: torch_logits(deployed, torch.from_numpy(images), len(images)),
        ),
        measured(f"{fmt} fp32", path, result, runner),
    ]
    contract = input_contract(run, fmt, mean, std, bake_normalisation, None)
    if fmt == "onnx":
        contract["opset"] = onnx_opset(path)
    sidecar = write_sidecar(path, {**contract, "check": _check_doc(result, check, tolerance)})
    if quantize:
        variants.append(_quantized(fmt, deployed, feed, path, reference, check, measured))
        contract = input_contract(run, fmt, mean, std, bake_normalisation, quantize)
        if fmt == "onnx":
            contract["opset"] = onnx_opset(variants[-1].path)
        doc = _check_doc(variants[-1].check, check, None)
        write_sidecar(variants[-1].path, {**contract, "check": doc})

    exported = ExportResult(
        path=path,
        sidecar=sidecar,
        report=run.folder / "export" / "report.json",
        fmt=fmt,
        source=check.source,
        note=check.note,
        num_images=len(feed),
        tolerance=tolerance,
        variants=variants,
    )
    document = report_document(exported, run.folder, str(run.weights))
    text = json.dumps(with_earlier_exports(exported.report, document), indent=2) + "\n"
    atomic_write(exported.report, lambda temp: temp.write_text(text))
    return exported


def _quantized(fmt, deployed, feed, path, reference, check, measured) -> Variant:
    target = int8_path(path)
    if fmt == "onnx":
        quantize_onnx(path, target)
    else:
        quantize_torchscript(deployed, feed[:2], target)
    runner = load_runner(target, fmt)
    outputs = run_batched(runner, np.ascontiguousarray(feed.numpy(), dtype=np.float32))
    return measured(f"{fmt} int8", target, agreement(reference, outputs, check.targets), runner)


def _check_doc(result: Agreement, check, tolerance: float | None) -> dict[str, Any]:
    return {
        "images": check.source,
        "num_images": len(check.images),
        "max_abs_logit_diff": result.max_abs_diff,
        "top1_agreement": result.top1_agreement,
        "tolerance": tolerance,
    }


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_document(result: ExportResult, run_folder: Path, weights: str) -> dict[str, Any]:
    """report.json: the check and, per variant, size, agreement, accuracy and latency."""
    return {
        "run": str(run_folder),
        "weights": weights,
        "format": result.fmt,
        "file": str(result.path),
        "check_images": result.source,
        "check_note": result.note,
        "num_images": result.num_images,
        "tolerance": result.tolerance,
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),  # torch and onnxruntime alike
        },
        "variants": [
            {
                **{k: v for k, v in asdict(variant).items() if k not in ("path", "latency_ms")},
                "path": str(variant.path) if variant.path else None,
                "latency_ms_per_image": {f"batch_{b}": t for b, t in variant.latency_ms.items()},
            }
            for variant in result.variants
        ],
    }


def with_earlier_exports(report: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The newest export's document, plus `exports`: one document per exported file still on
    disk (the newest included), so an ONNX export's rows survive a later TorchScript one."""
    try:
        earlier = json.loads(report.read_text()).get("exports", {}) if report.is_file() else {}
    except (OSError, ValueError, AttributeError):
        earlier = {}  # an unreadable old report only loses the older rows
    kept = {file: doc for file, doc in earlier.items() if Path(file).is_file()}
    kept[document["file"]] = document
    return {**document, "exports": kept}


def format_table(result: ExportResult) -> str:
    """The variants side by side, as printed by `vittune export`."""
    header = (
        f"{'model':<18}{'size':>10}{'max|dlogit|':>13}{'top1 agree':>12}{'val acc':>9}"
        + "".join(f"{f'ms/img b{b}':>12}" for b in LATENCY_BATCHES)
    )
    lines = [header, "-" * len(header)]
    for v in result.variants:
        size = f"{v.size_bytes / 1e6:.2f} MB" if v.size_bytes is not None else "-"
        acc = f"{v.check.accuracy:.4f}" if v.check.accuracy is not None else "-"
        lines.append(
            f"{v.name:<18}{size:>10}{v.check.max_abs_diff:>13.2e}{v.check.top1_agreement:>12.4f}"
            f"{acc:>9}" + "".join(f"{v.latency_ms[b]:>12.3f}" for b in LATENCY_BATCHES)
        )
    return "\n".join(lines)
