"""`vittune finetune` end to end through the installed console script, on tiny models.

Each run is checked for what it leaves behind (recipe, checkpoints, export, config, metrics,
confusion matrix) and for learning that actually happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from conftest import make_class_images, run_cli, write_image
from helpers import ONE_THREAD, RECIPES, column, held_out, read_metrics, run_cli_unset, tiny
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from vittune.models.run_config import RunConfig, read_run_config
from vittune.recipe.load import load_recipe


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def reference_model(run_dir: Path) -> torch.nn.Module:
    """The trained network rebuilt from its best checkpoint (Lightning's file, read safely)."""
    config = json.loads((run_dir / "config.json").read_text())
    model = timm.create_model(config["architecture"], **config["model_args"])
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    state = {
        k.removeprefix("model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.")
    }
    model.load_state_dict(state)
    return model.eval()


def check_export_matches_best_checkpoint(run_dir: Path) -> RunConfig:
    """timm loads the run folder by itself and computes the trained model's logits; the model
    card names the best checkpoint's score and epoch."""
    config = json.loads((run_dir / "config.json").read_text())
    exported = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    images = torch.randn(3, *config["pretrained_cfg"]["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(exported(images), reference_model(run_dir)(images))
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    card = (run_dir / "README.md").read_text()
    assert re.search(rf"\*\*Best validation:\*\* val/\S+ = [0-9.]+ at epoch {best} ", card), card
    return read_run_config(run_dir / "config.json")


def check_run_folder(run_dir: Path, recipe_path: Path, overrides: list[str]) -> None:
    """Every artefact is there, and recipe.yaml is the resolved recipe of the command."""
    for name in (
        "recipe.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "model.safetensors",
        "config.json",
        "csv/metrics.csv",
    ):
        assert (run_dir / name).is_file(), name
    with Image.open(run_dir / "confusion_matrix.png") as figure:
        assert figure.format == "PNG" and min(figure.size) > 100
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(recipe_path, overrides)


def per_epoch(rows: list[dict], name: str) -> list[float]:
    return column([r for r in rows if r.get("epoch")], name)


@pytest.mark.slow
def test_quickstart_on_digits_learns_far_above_chance(tmp_path: Path, digits_root: Path) -> None:
    # The recipe's 6-block ViT cut to 2 blocks of width 64 with average pooling (which learns
    # faster than a class token at this size), 6 epochs instead of 15.
    overrides = tiny(
        "model.kwargs.global_pool=avg",
        "trainer.max_epochs=6",
        "optim.lr=3e-3",
        "data.batch_size=32",
    )
    recipe = RECIPES / "quickstart.yaml"
    stdout = ok(run_cli("finetune", str(recipe), *overrides, cwd=tmp_path, env=ONE_THREAD))
    run_dir = tmp_path / "runs" / "quickstart"
    assert f"run folder: {Path('runs') / 'quickstart'}" in stdout
    check_run_folder(run_dir, recipe, overrides)
    rows = read_metrics(run_dir)
    accuracy = per_epoch(rows, "val/acc1")
    assert len(accuracy) == 6
    assert max(accuracy) > 0.8, accuracy  # 10 classes: chance is 0.1
    assert f"best val/acc1 = {max(accuracy):.4f}" in stdout
    for metric in ("val/acc5", "val/f1", "val/auroc", "val/loss", "train/acc1"):
        assert len(per_epoch(rows, metric)) == 6, metric  # every epoch, top-5 as 10 > 5 classes
    assert per_epoch(rows, "val/auroc")[-1] > 0.95
    config = check_export_matches_best_checkpoint(run_dir)
    assert config.classes == [str(d) for d in range(10)]
    assert config.in_chans == 1 and config.img_size == (32, 32)
    # normalisation comes from the backbone's pretrained config, averaged for one channel
    resolved = timm.data.resolve_model_data_config(timm.create_model("vit_tiny_patch16_224"))
    assert config.mean == pytest.approx([np.mean(resolved["mean"])])
    assert config.std == pytest.approx([np.mean(resolved["std"])])


def make_dim_16bit_images(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """16-bit grey stripes whose whole range is 100 levels around 30,130 (of 65,535).

    Reduced to 8 bits every image would be one flat grey level: only a decoder that keeps
    all 16 bits (and the medical recipe's min-max scaling) lets a model see the classes.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
    for index, (name, count) in enumerate(counts.items()):
        angle = np.pi * index / len(counts)
        wave = np.cos(angle) * cols + np.sin(angle) * rows
        for k in range(count):
            stripes = 35 * np.sin(2 * np.pi * wave / 6.0 + rng.uniform(0, 2 * np.pi))
            image = 30130 + stripes + rng.normal(0, 6, size=(32, 32))
            pixels = np.clip(np.round(image), 30080, 30180).astype(np.uint16)
            write_image(root / name / f"{k:04d}.png", pixels)
    return root


@pytest.mark.slow
def test_medical_recipe_on_dim_16bit_grey_imbalanced_data(tmp_path: Path) -> None:
    counts = {"effusion": 12, "nodule": 24, "normal": 60}
    data = make_dim_16bit_images(tmp_path / "xray", counts)
    assert len(np.unique(np.asarray(Image.open(data / "normal" / "0000.png")) >> 8)) == 1
    overrides = tiny(
        "model.in_chans=1",
        f"data.root={data}",
        "data.batch_size=8",
        "optim.lr=0.1",  # x 8 / 256 by the recipe's linear scaling
        "schedule.warmup_epochs=1",
        "trainer.max_epochs=4",
        "logging.name=xray",
        drop=("logging.wandb",),  # the recipe's W&B stays on: with no key it must go offline
    )
    home = tmp_path / "home"  # no ~/.netrc: no W&B key anywhere
    home.mkdir()
    result = run_cli_unset(
        "finetune", str(RECIPES / "medical.yaml"), *overrides, cwd=tmp_path,
        unset=("WANDB_MODE", "WANDB_API_KEY"), env={"HOME": str(home), **ONE_THREAD},
    )  # fmt: skip
    stdout = ok(result)
    run_dir = tmp_path / "runs" / "xray"
    check_run_folder(run_dir, RECIPES / "medical.yaml", overrides)
    # W&B: offline without a key, and says how to sync later
    assert "W&B is logging offline (no W&B API key found" in stdout
    assert list((run_dir / "wandb").glob("offline-run-*"))
    rows = read_metrics(run_dir)
    auroc = per_epoch(rows, "val/auroc")
    assert "best val/auroc" in stdout and max(auroc) > 0.9, auroc
    assert not per_epoch(rows, "val/acc5")  # 3 classes: no top-5
    config = check_export_matches_best_checkpoint(run_dir)
    assert config.in_chans == 1 and config.classes == sorted(counts)
    # balanced class weights are scikit-learn's, computed on the training split
    train_counts = [n - held_out(n, 0.15) for n in (counts[c] for c in sorted(counts))]
    labels = np.repeat(np.arange(3), train_counts)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    np.testing.assert_allclose(state["train_loss.weight"].numpy(), expected, rtol=1e-6)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_folder_and_csv_runs_with_the_same_name_never_overwrite(tmp_path: Path) -> None:
    # Run 1: an image folder with train/ and val/ folders of 8-bit RGB JPEGs.
    folder = tmp_path / "folder"
    make_class_images(folder / "train", {"a": 8, "b": 8}, channels=3, suffix=".jpg")
    make_class_images(folder / "val", {"a": 2, "b": 2}, channels=3, suffix=".jpg", seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("augment: {preset: light}\ndata: {batch_size: 4}\nlogging: {name: shared}\n")
    first = tiny(f"data.root={folder}", "trainer.max_epochs=1")
    ok(run_cli("finetune", str(recipe), *first, cwd=tmp_path, env=ONE_THREAD))
    run_one = tmp_path / "runs" / "shared"
    check_run_folder(run_one, recipe, first)
    before = {p: digest(p) for p in run_one.rglob("*") if p.is_file()}
    assert len(per_epoch(read_metrics(run_one), "val/acc1")) == 1

    # Run 2: a CSV manifest (path,label,split) of 16-bit TIFFs and PNGs, same logging.name.
    images = tmp_path / "images"
    make_class_images(images / "tif", {"a": 6, "b": 6}, dtype=np.uint16, suffix=".tif")
    make_class_images(images / "png", {"a": 4, "b": 4}, dtype=np.uint16, seed=2)
    lines = ["path,label,split"]
    lines += [f"images/tif/{c}/{k:04d}.tif,{c},train" for c in "ab" for k in range(6)]
    lines += [f"images/png/{c}/{k:04d}.png,{c},val" for c in "ab" for k in range(4)]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    second = tiny(
        "data.csv=manifest.csv",
        "trainer.max_epochs=1",
        "augment.transforms=[{name: GaussianBlur, p: 0.5}, {name: VerticalFlip, p: 0.5}]",
        "data.mean=[0.2]",
        "data.std=[0.3]",
    )
    ok(run_cli("finetune", str(recipe), *second, cwd=tmp_path, env=ONE_THREAD))
    run_two = tmp_path / "runs" / "shared-2"
    check_run_folder(run_two, recipe, second)
    assert load_recipe(run_two / "recipe.yaml").data.csv == "manifest.csv"
    config = json.loads((run_two / "config.json").read_text())["pretrained_cfg"]
    assert config["mean"] == [0.2] * 3 and config["std"] == [0.3] * 3  # the recipe's, per channel
    assert not (run_one / "wandb").exists() and not (run_two / "wandb").exists()
    assert {p: digest(p) for p in run_one.rglob("*") if p.is_file()} == before  # untouched


def test_print_recipe_prints_the_resolved_recipe_and_trains_nothing(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {RECIPES / 'quickstart.yaml'}\noptim: {{lr: 2e-3}}\n")
    result = run_cli("finetune", str(child), "trainer.max_epochs=2", "--print-recipe", cwd=tmp_path)
    printed = tmp_path / "printed.yaml"
    printed.write_text(ok(result))
    resolved = load_recipe(printed)
    assert resolved == load_recipe(child, ["trainer.max_epochs=2"])
    assert resolved.optim.lr == 2e-3 and resolved.trainer.max_epochs == 2
    assert resolved.model.kwargs == {"depth": 6}  # inherited from the base
    assert not (tmp_path / "runs").exists()
    assert sorted(os.listdir(tmp_path)) == ["child.yaml", "printed.yaml"]
