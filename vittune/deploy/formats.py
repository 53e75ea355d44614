"""Writing, quantising and running the two deployment formats: ONNX and TorchScript.

Everything here is a thin layer over the libraries: timm's `onnx_export` (torch.onnx's
dynamo exporter with a dynamic batch axis and the ONNX checker), onnxruntime and its
quantisation tools, `torch.jit.trace` and `torch.ao` dynamic quantisation.
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vittune.errors import RecipeError

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
# What torch.onnx's dynamo exporter (the default since torch 2.9) and onnxruntime need.
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")

Runner = Callable[[np.ndarray], np.ndarray]  # [B, C, H, W] float32 -> [B, K] logits


def require_extra(modules: tuple[str, ...] = EXPORT_EXTRA) -> None:
    """Import the optional export packages, or say in one line how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise RecipeError(
                f"ONNX export needs the package {name!r} ({err.msg}); install it with"
                " pip install 'vittune[export]'"
            ) from None


class Normalised(nn.Module):
    """The classifier behind its own normalisation: takes [0, 1] pixels (`--bake-normalisation`).

    Written here because timm has no such wrapper; it is two constants and one line of maths,
    so the exported graph holds exactly the eval transform's `(x - mean) / std`.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)  # [B, C, H, W] -> [B, K]


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension of size 1, so trace at batch 2 to keep it dynamic.
    return example[:2] if len(example) >= 2 else torch.cat([example, example])


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    """ONNX through torch.onnx's dynamo exporter, batch axis dynamic, checked by onnx.checker."""
    from timm.utils.onnx import onnx_export  # noqa: PLC0415 (imports onnx)

    onnx_export(
        model.eval(),
        str(path),
        example_input=_batch_of_two(example),
        opset=opset,
        use_dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        check=True,
    )


@torch.no_grad()
def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript by tracing (a ViT's forward has no data-dependent control flow).

    torch 2.14 marks torch.jit as deprecated but keeps it working; the warning is silenced
    here and stated in docs/deploy.md. Shapes are read from the input at run time, so a
    trace at one batch size runs at any other (tested).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), _batch_of_two(example), check_trace=False)
        # Saved to memory, then written by Python: torch.jit.save writing to a file that the
        # disk refuses (full, or a file-size limit) aborts the whole process (its zip
        # writer's destructor throws again: std::terminate), where Python's write raises.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    path.write_bytes(buffer.getbuffer())


def quantize_onnx(source: Path, target: Path) -> None:
    """int8 weights, activations quantised on the fly (onnxruntime dynamic quantisation).

    `quant_pre_process` (shape inference and graph optimisation) first, as onnxruntime
    recommends: the dynamo exporter's graph lacks some shape information the quantiser uses.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    prepared = target.with_name(target.name + ".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


@torch.no_grad()
def quantize_torchscript(model: nn.Module, example: torch.Tensor, target: Path) -> None:
    """torch.ao dynamic quantisation of every nn.Linear (int8 weights), then traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in torch 2.14
        quantized = torch.ao.quantization.quantize_dynamic(
            model.eval(), {nn.Linear}, dtype=torch.qint8
        )
    export_torchscript(quantized, example, target)


def load_runner(path: Path, fmt: str) -> Runner:
    """A function that runs the exported file on a batch, as a deployment would."""
    if fmt == "onnx":
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        # As many threads as torch uses (OMP_NUM_THREADS), so latencies compare like with like.
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return lambda images: session.run(None, {INPUT_NAME: images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images)).numpy()

    return run


def onnx_opset(path: Path) -> int:
    """The default-domain opset an ONNX file was written for (read without its weights)."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def max_opset() -> int:
    """The newest ONNX opset this installation exports a ViT to (for `--opset`'s check).

    torch.onnx's dynamo exporter writes the graph at its own opset and converts it to the one
    asked for with onnxscript's version converter, which goes up to its
    SUPPORTED_MAX_ONNX_OPSET (25 in onnxscript 0.7); above it onnx's C converter is tried,
    fails on a ViT's Gelu and leaves a graph onnx.checker rejects (a traceback, not a file).
    onnx itself knows no opset past `onnx_opset_version()`. Tested: the bound exports and runs.
    """
    import onnx  # noqa: PLC0415

    newest = onnx.defs.onnx_opset_version()
    try:  # a private module: without it, onnx's own bound is the one known
        from onnxscript.version_converter._version_converter import (  # noqa: PLC0415
            SUPPORTED_MAX_ONNX_OPSET,
        )
    except ImportError:
        return newest
    return min(newest, SUPPORTED_MAX_ONNX_OPSET)


def file_size(path: Path) -> int:
    """Bytes on disk, with ONNX external weight data (models over 2 GB) counted."""
    external = path.with_name(path.name + ".data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)
