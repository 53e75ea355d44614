"""The model behind `vittune serve`: a run loaded back, in PyTorch, ONNX or int8, with predict's
preprocessing.

`ServeOptions` is what travels to each LitServe worker process (plain values, picklable);
`ServedModel` is built there, once per worker. Preprocessing is `vittune.inference.predict.image_tensor`,
the same function `vittune predict` runs per file, and probabilities are the task's own
softmax/sigmoid, so a served answer equals predict's for the same file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vittune.deploy.pipeline import int8_path
from vittune.errors import RecipeError
from vittune.inference.predict import image_tensor
from vittune.inference.trained_run import TrainedRun, build_trained, load_trained_run

SERVE_FORMATS = ("torch", "onnx")


@dataclass(frozen=True)
class ServeOptions:
    """Everything a worker needs to build the served model (picklable: spawned processes)."""

    folder: str
    weights: str = "best"
    fmt: str = "torch"
    int8: bool = False
    top_k: int = 3
    threshold: float = 0.5


def onnx_file(folder: Path, int8: bool) -> Path:
    """Where `vittune export` writes the run's ONNX file (`export/model.onnx`, or its int8 twin)."""
    path = folder / "export" / "model.onnx"
    return int8_path(path) if int8 else path


def check_onnx_file(path: Path, run: TrainedRun) -> None:
    """Refuse an ONNX file whose contract does not match what serve feeds it."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        raise RecipeError(f"{sidecar} is missing; re-run vittune export {run.folder}")
    contract = json.loads(sidecar.read_text())
    if contract.get("input", {}).get("normalisation") == "baked":
        raise RecipeError(
            f"{path} was exported with --bake-normalisation, but serve feeds normalised images;"
            f" re-run vittune export {run.folder} without it"
        )
    if Path(contract.get("weights", "")).name != run.weights.name:
        raise RecipeError(
            f"{path} was exported from {contract.get('weights')}, not the served weights"
            f" {run.weights}; re-run vittune export {run.folder} --weights ..."
        )


def version_of(path: Path) -> str:
    """The first 12 hex digits of the weights file's sha256: which weights answered."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def quantized_int8(model: nn.Module) -> nn.Module:
    """torch.ao dynamic quantisation of every nn.Linear (int8 weights), as `vittune export`'s
    TorchScript int8 variant; CPU only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in torch 2.14
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


class ServedModel:
    """The run's classifier and preprocessing in one worker: bytes in, probabilities out."""

    def __init__(self, options: ServeOptions, device: str = "cpu") -> None:
        self.options = options
        run = load_trained_run(options.folder, [], options.weights)
        assembly = build_trained(run)
        self.run, self.classes, self.multi_label = run, run.classes, run.multi_label
        self.transform, self.dicom = assembly.datamodule.eval_transform, assembly.datamodule.dicom
        data = run.recipe.data
        self.in_chans, self.intensity, self.limit = (
            run.recipe.model.in_chans,
            data.intensity,
            data.max_image_pixels,
        )
        self.device = torch.device("cpu") if options.int8 else torch.device(device)
        self.task = assembly.task.to(self.device).eval()
        self.runner = None
        if options.fmt == "onnx":
            from vittune.deploy.formats import load_runner  # noqa: PLC0415 (onnxruntime)

            self.runner = load_runner(onnx_file(run.folder, options.int8), "onnx")
        elif options.int8:
            self.task.model = quantized_int8(self.task.model)

    def preprocess(self, data: bytes, name: str) -> torch.Tensor:
        """[C, H, W]: predict's decoding and eval transform; `DataError` for a bad image."""
        return image_tensor(
            data, name, self.transform, self.in_chans, self.intensity, self.limit, self.dicom
        )

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """[B, C, H, W] -> [B, K] float32, as predict computes them."""
        if self.runner is not None:
            logits = torch.from_numpy(self.runner(np.ascontiguousarray(images.numpy())))
        else:
            logits = self.task(images.to(self.device))  # [B, K]
        return self.task.probabilities(logits).float().cpu().numpy()
