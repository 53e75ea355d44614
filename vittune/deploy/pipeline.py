"""`vittune export RUN`: a trained run to a checked ONNX or TorchScript file (and int8 variant).

Order: build the run's classifier exactly as evaluate/predict do, export it, run the file on
the run's validation images and compare with PyTorch (a file that disagrees fails the
command), write the input contract beside it, optionally quantise, and measure accuracy, size
and latency into `RUN/export/report.json`. All of it is made in a staging folder and moved over
the earlier export only at the end, so a failed export keeps the earlier one as it was.
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
from vittune.deploy.export_options import check_options
from vittune.deploy.formats import (
    SUFFIXES,
    Normalised,
    export_onnx,
    export_torchscript,
    file_size,
    load_runner,
    onnx_opset,
    quantize_onnx,
    quantize_torchscript,
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
from vittune.files import (
    atomic_write,
    replace_files,
    signals_held,
    staging_folder,
    storage_errors,
)
from vittune.inference.trained_run import build_trained, load_trained_run
from vittune.models.backbone import tensor_bytes

LATENCY_BATCHES = (1, 32)


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


def _with_companions(path: Path) -> list[Path]:
    """An exported file with its external weights (written first) and its sidecar (last)."""
    return [path.with_name(path.name + ".data"), path, path.with_name(path.name + ".json")]


def int8_path(path: Path) -> Path:
    """`model.onnx` -> `model.int8.onnx`."""
    return path.with_name(f"{path.stem}.int8{path.suffix}")


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
    check_options(fmt, Path(out) if out else None, opset, quantize, tolerance, check_limit)
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
    report = run.folder / "export" / "report.json"
    for folder in {path.parent, report.parent}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecipeError(
                f"cannot create the folder {folder} ({err.strerror}); pass --out a file in a"
                " folder you can write to"
            ) from None
    # Everything is made under its final name in a staging folder beside `path` and moved
    # over the earlier export only once checked and measured: a failed check, an error or a
    # Ctrl-C before then leaves the earlier files and report.json as they were.
    with staging_folder(path) as staging, storage_errors(path, tensor_bytes(deployed.parameters())):
        made = staging / path.name
        if fmt == "onnx":
            export_onnx(deployed, feed[:2], made, opset)
        else:
            export_torchscript(deployed, feed[:2], made)
        runner = load_runner(made, fmt)
        result = agreement(reference, run_batched(runner, feed_np), check.targets)
        if not np.isfinite(result.max_abs_diff) or result.max_abs_diff > tolerance:
            kept = f"the previous {path} is kept" if path.exists() else f"nothing written to {path}"
            raise RecipeError(
                f"the {fmt} export differs from PyTorch by {result.max_abs_diff:.3g} in the"
                f" logits (tolerance {tolerance:g}, top-1 agreement {result.top1_agreement:.2%})"
                f" on {len(feed)} {check.source} images; {kept}"
            )
        shapes = {b: (b, *feed.shape[1:]) for b in LATENCY_BATCHES}

        def measured(name: str, file: Path | None, check_: Agreement, run_) -> Variant:
            """A variant's numbers; `file` is its final path, measured where it was made."""
            times = {b: latency_ms(run_, shape, latency_repeats) for b, shape in shapes.items()}
            size = file_size(staging / file.name) if file else None
            return Variant(name, file, size, check_, times)

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
            contract["opset"] = onnx_opset(made)
        write_sidecar(made, {**contract, "check": _check_doc(result, check, tolerance)})
        if quantize:
            variants.append(
                _quantized(fmt, deployed, feed, staging, path, reference, check, measured)
            )
            made_int8 = staging / int8_path(path).name
            contract = input_contract(run, fmt, mean, std, bake_normalisation, quantize)
            if fmt == "onnx":
                contract["opset"] = onnx_opset(made_int8)
            doc = _check_doc(variants[-1].check, check, None)
            write_sidecar(made_int8, {**contract, "check": doc})

        exported = ExportResult(
            path=path,
            sidecar=path.with_name(path.name + ".json"),
            report=report,
            fmt=fmt,
            source=check.source,
            note=check.note,
            num_images=len(feed),
            tolerance=tolerance,
            variants=variants,
        )
        document = report_document(exported, run.folder, str(run.weights))
        text = json.dumps(with_earlier_exports(report, document), indent=2) + "\n"
        _publish(staging, path, report, text)
    return exported


def _publish(staging: Path, path: Path, report: Path, text: str) -> None:
    """Move the made files over the earlier export's, then write report.json, then delete the
    earlier files that the new export did not replace; Ctrl-C waits until all three are done.

    Deleted: an int8 file (and its sidecar) when this export has none. It was derived from the
    `path` being replaced (other weights, opset or normalisation, perhaps), so its numbers and
    contract describe a model that is gone, and report.json, whose entry for `path` is now this
    export's, would no longer list it; `vittune serve --int8` would still pick it up. Also an
    external `.data` file the new export does not have. Deleted after report.json is written,
    so the report never lists a missing file, and only once the export succeeded.
    """
    family = [*_with_companions(path), *_with_companions(int8_path(path))]
    made = [f for f in family if (staging / f.name).is_file()]
    with signals_held():
        replace_files([(staging / f.name, f) for f in made])
        atomic_write(report, lambda temp: temp.write_text(text))
        for stale in set(family) - set(made):
            stale.unlink(missing_ok=True)


def _quantized(fmt, deployed, feed, staging, path, reference, check, measured) -> Variant:
    """The int8 variant of the fp32 file made in `staging`, made there too."""
    target = int8_path(path)
    made = staging / target.name
    if fmt == "onnx":
        quantize_onnx(staging / path.name, made)
    else:
        quantize_torchscript(deployed, feed[:2], made)
    runner = load_runner(made, fmt)
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
    kept = {file: _existing(doc) for file, doc in earlier.items() if Path(file).is_file()}
    kept[document["file"]] = document
    return {**document, "exports": kept}


def _existing(document: dict[str, Any]) -> dict[str, Any]:
    """An earlier export's document without the rows of files no longer on disk (an int8
    file deleted by hand), so that report.json never names a missing file."""
    variants = document.get("variants", [])
    kept = [v for v in variants if not v.get("path") or Path(v["path"]).is_file()]
    return {**document, "variants": kept}


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
