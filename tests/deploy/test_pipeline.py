"""`vittune.deploy`: exported ONNX / TorchScript files against the PyTorch model they came from.

Every check runs the exported file itself (onnxruntime, torch.jit.load) and compares it with
the eval-mode timm model on the same inputs; the run-level tests use a tiny trained run with
3 channels at a non-square 32x48 input.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe

from vittune.data.datamodule import scan_sources
from vittune.deploy.formats import (
    Normalised,
    export_onnx,
    export_torchscript,
    load_runner,
    max_opset,
    onnx_opset,
    require_extra,
)
from vittune.deploy.pipeline import export_run
from vittune.errors import RecipeError
from vittune.inference.trained_run import build_trained, load_trained_run
from vittune.models.heads import split_heads
from vittune.recipe.load import load_recipe

TOLERANCE = 1e-4  # fp32 export vs PyTorch, largest absolute logit difference
INT8_AGREEMENT = 0.9  # int8 variant vs fp32: share of validation images with the same top-1
CLASSES = ["a", "b", "c"]


def tiny_model(name: str = "vit_tiny_patch16_224", in_chans: int = 3, size=(32, 48)):
    torch.manual_seed(0)
    return timm.create_model(
        name,
        num_classes=4,
        img_size=size,
        patch_size=8,
        in_chans=in_chans,
        embed_dim=64,
        depth=2,
        num_heads=2,
    ).eval()


def exported_runner(model: torch.nn.Module, fmt: str, example: torch.Tensor, path: Path):
    if fmt == "onnx":
        export_onnx(model, example, path, opset=None)
    else:
        export_torchscript(model, example, path)
    return load_runner(path, fmt)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_export_matches_pytorch_at_any_batch_size(fmt: str, in_chans: int, tmp_path: Path) -> None:
    model = tiny_model(in_chans=in_chans)
    images = torch.randn(5, in_chans, 32, 48)  # non-square: 4x6 tokens
    runner = exported_runner(model, fmt, images[:2], tmp_path / f"m.{fmt}")
    with torch.no_grad():
        reference = model(images).numpy()  # [5, 4]
    # traced at batch 2; batch 1 and 5 must run too (the batch axis is dynamic)
    for batch in (1, 5):
        out = runner(images[:batch].numpy())
        assert out.shape == (batch, 4)
        np.testing.assert_allclose(out, reference[:batch], atol=TOLERANCE, rtol=0)


def test_distilled_deit_exports_the_average_of_its_two_heads(tmp_path: Path) -> None:
    model = tiny_model("deit_tiny_distilled_patch16_224", in_chans=1, size=(32, 32))
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        cls_logits, dist_logits = split_heads(model, images)  # read from the two tokens
        averaged = ((cls_logits + dist_logits) / 2).numpy()
        assert not torch.allclose(cls_logits, dist_logits)  # two different heads
        np.testing.assert_allclose(model(images).numpy(), averaged, atol=1e-6)  # eval: averaged
    runner = exported_runner(model, "onnx", images, tmp_path / "deit.onnx")
    np.testing.assert_allclose(runner(images.numpy()), averaged, atol=TOLERANCE, rtol=0)


def test_missing_export_extra_names_the_pip_command() -> None:
    require_extra()  # installed for the test suite (make test installs .[dev,export])
    with pytest.raises(RecipeError, match=r"pip install 'vittune\[export\]'") as caught:
        require_extra(("onnx", "vittune_module_that_is_not_installed"))
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 3-class run: RGB images, a 32x48 input (non-square), 30 validation images."""
    root = tmp_path_factory.mktemp("deploy")
    make_class_images(root / "data", dict.fromkeys(CLASSES, 20), channels=3)
    recipe = write_recipe(root / "r.yaml", {"data": {"root": str(root / "data")}})
    overrides = tiny(
        "model.img_size=[32, 48]",
        "model.in_chans=3",
        "trainer.max_epochs=4",
        "data.batch_size=8",
        "data.val_fraction=0.5",
        "optim.lr=2e-3",
        "logging.name=run",
    )
    result = run_cli("finetune", str(recipe), *overrides, cwd=root, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "run"


def contract_preprocess(path: Path, contract: dict) -> np.ndarray:
    """One image prepared from the sidecar alone: OpenCV decode, the stated rules, NCHW."""
    spec = contract["input"]
    assert spec["intensity_scaling"] == "dtype" and spec["channels"] == 3
    pixels = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    pixels = pixels.astype(np.float32) / 255.0  # uint8: divide by the type's maximum
    pixels = cv2.resize(pixels, (spec["width"], spec["height"]), interpolation=cv2.INTER_LINEAR)
    if spec["normalisation"] == "expected":
        pixels = (pixels - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return pixels.transpose(2, 0, 1)  # [C, H, W]


@pytest.mark.parametrize("fmt, bake", [("onnx", False), ("torchscript", True)])
def test_sidecar_describes_the_input(run_dir: Path, fmt: str, bake: bool, tmp_path: Path) -> None:
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    result = export_run(
        run_dir, fmt, out, bake_normalisation=bake, check_limit=8, latency_repeats=1
    )
    contract = json.loads(result.sidecar.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert result.sidecar == out.with_name(out.name + ".json")
    assert contract["input"]["shape"] == ["batch", 3, 32, 48]
    assert contract["input"]["normalisation"] == ("baked" if bake else "expected")
    # config.json: vittune's flat layout, or timm's hub layout (pretrained_cfg, label_names)
    preprocessing = config.get("pretrained_cfg", config)
    assert contract["input"]["mean"] == pytest.approx(preprocessing["mean"])
    assert contract["input"]["std"] == pytest.approx(preprocessing["std"])
    assert contract["classes"] == (config.get("label_names") or config["classes"]) == CLASSES
    assert contract["output"]["shape"] == ["batch", 3]
    assert contract.get("opset", 17) >= 17  # ONNX only: the opset the file was written for
    # Following the contract by hand gives what PyTorch gives through vittune's own pipeline.
    run = load_trained_run(run_dir)
    found = scan_sources(run.recipe.data)
    assembly = build_trained(run, found)
    paths = [s.path for s in found.splits["val"][:6]]
    dataset = assembly.datamodule.dataset("val")
    with torch.no_grad():
        reference = assembly.task(torch.stack([dataset[i][0] for i in range(6)])).numpy()
    batch = np.stack([contract_preprocess(p, contract) for p in paths])  # [6, 3, 32, 48]
    out_logits = load_runner(out, fmt)(np.ascontiguousarray(batch))
    np.testing.assert_allclose(out_logits, reference, atol=1e-4, rtol=0)


def test_int8_keeps_top1_and_report_holds_the_numbers(run_dir: Path) -> None:
    result = export_run(run_dir, "onnx", quantize="int8", latency_repeats=2)
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert result.source == "validation" and result.num_images == report["num_images"] == 30
    pytorch, fp32, int8 = report["variants"]
    assert [v["name"] for v in report["variants"]] == ["pytorch fp32", "onnx fp32", "onnx int8"]
    assert fp32["check"]["max_abs_diff"] <= TOLERANCE and fp32["check"]["top1_agreement"] == 1.0
    assert int8["check"]["top1_agreement"] >= INT8_AGREEMENT
    assert 0 < int8["size_bytes"] < fp32["size_bytes"]
    assert Path(int8["path"]).is_file() and Path(int8["path"] + ".json").is_file()
    # The PyTorch accuracy on the validation split is the one training logged for these weights.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert pytorch["check"]["accuracy"] == pytest.approx(metrics["best_val"]["val/acc1"], abs=1e-6)
    assert fp32["check"]["accuracy"] == pytorch["check"]["accuracy"]
    for variant in report["variants"]:
        assert set(variant["latency_ms_per_image"]) == {"batch_1", "batch_32"}
        assert all(t > 0 for t in variant["latency_ms_per_image"].values())


def test_random_inputs_stand_in_when_the_data_is_not_here(run_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("config.json", "model.safetensors"):
        (moved / name).write_bytes((run_dir / name).read_bytes())
    recipe = load_recipe(run_dir / "recipe.yaml", [], command=None)
    text = (run_dir / "recipe.yaml").read_text().replace(recipe.data.root, str(tmp_path / "gone"))
    (moved / "recipe.yaml").write_text(text)
    notes: list[str] = []
    result = export_run(moved, "torchscript", check_limit=4, latency_repeats=1, log=notes.append)
    assert result.source == "random" and result.num_images == 4
    assert len(notes) == 1 and "random inputs" in notes[0]
    assert json.loads(result.sidecar.read_text())["check"]["images"] == "random"


def test_baked_normalisation_is_the_eval_transform_step() -> None:
    model = tiny_model(in_chans=3)
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    pixels = torch.rand(2, 3, 32, 48)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(Normalised(model, mean, std)(pixels), model(normalised))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(fmt="tflite"), "--format must be one of onnx, torchscript, got 'tflite'"),
        (dict(fmt="torchscript", opset=18), "--opset applies to --format onnx only"),
        (dict(opset=13), "--opset 13 has no LayerNormalization"),
        (dict(quantize="int4"), "--quantize must be int8, got 'int4'"),
        (dict(opset=99), r"--opset 99 is above .*; use 17 to \d+"),
        (dict(out="x.pt"), "--out x.pt does not end in .onnx; name it x.onnx or pass --format"),
        (dict(fmt="torchscript", out="y.onnx"), "--out y.onnx does not end in .pt; name it y.pt"),
        (dict(out="model"), "--out model does not end in .onnx; name it model.onnx"),
    ],
)
def test_option_mistakes_are_one_line_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")) as caught:
        export_run("/nonexistent/run", **options)  # refused before the run is even read
    assert "\n" not in str(caught.value)


def test_out_naming_a_folder_is_one_line_before_any_work(tmp_path: Path) -> None:
    """Before, the export ran and then failed writing: IsADirectoryError, with a traceback."""
    with pytest.raises(RecipeError, match=f"--out {tmp_path} is a folder; name a file in it"):
        export_run("/nonexistent/run", out=tmp_path)


def test_out_in_a_folder_that_cannot_be_made_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    """Before, mkdir's FileExistsError came out as a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RecipeError, match=f"cannot create the folder {blocker} \\(File exists"):
        export_run(run_dir, out=blocker / "model.onnx", check_limit=4, latency_repeats=1)
    assert blocker.read_text() == ""


def test_the_highest_opset_allowed_exports_and_runs_and_the_next_is_refused(
    tmp_path: Path,
) -> None:
    """The bound said in the --opset error is real: the installed exporter writes a file at
    that opset which onnxruntime runs, and one above it is refused before any work."""
    top = max_opset()
    model, example = tiny_model(in_chans=1, size=(32, 32)), torch.rand(2, 1, 32, 32)
    export_onnx(model, example, tmp_path / "top.onnx", opset=top)
    assert onnx_opset(tmp_path / "top.onnx") == top
    with torch.no_grad():
        expected = model(example).numpy()
    outputs = load_runner(tmp_path / "top.onnx", "onnx")(example.numpy())
    np.testing.assert_allclose(outputs, expected, atol=1e-4, rtol=0)
    with pytest.raises(RecipeError, match=f"--opset {top + 1} is above"):
        export_run("/nonexistent/run", opset=top + 1)


def test_a_later_export_keeps_the_earlier_exports_rows(run_dir: Path) -> None:
    """report.json is the newest export's, and `exports` keeps one entry per exported file:
    the ONNX int8 rows are still there after a TorchScript export."""
    onnx = export_run(run_dir, "onnx", quantize="int8", check_limit=4, latency_repeats=1)
    script = export_run(run_dir, "torchscript", check_limit=4, latency_repeats=1)
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert report["format"] == "torchscript" and report["file"] == str(script.path)
    assert set(report["exports"]) >= {str(onnx.path), str(script.path)}
    names = [v["name"] for v in report["exports"][str(onnx.path)]["variants"]]
    assert names == ["pytorch fp32", "onnx fp32", "onnx int8"]
