"""`vittune pretrain-mae` end to end: unlabelled folder -> encoder export -> fine-tune, and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_OVERRIDES, make_class_images, run_cli, write_image
from helpers import RECIPES
from safetensors.torch import load_file

from vittune.models.mae import sincos_pos_embed

# Each training subprocess runs single-threaded: tiny models gain nothing from more.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAE_OVERRIDES = [
    *TINY_OVERRIDES,
    "model.in_chans=1",
    "data.labelled=false",
    "data.batch_size=8",
    "mae.decoder_depth=1",
    "mae.decoder_dim=32",
    "mae.decoder_heads=2",
    "mae.vis_num_images=4",
    "mae.vis_every_n_epochs=1",
    "trainer.log_every_n_steps=1",
]


def make_unlabelled_folder(root: Path, count: int = 40) -> Path:
    """Loose PNGs in nested folders (no class structure): bright bars on noise."""
    rng = np.random.default_rng(0)
    for k in range(count):
        image = rng.uniform(0, 0.3, size=(32, 32))
        row = int(rng.integers(0, 28))
        image[row : row + 4] = 0.9
        write_image(root / f"batch{k % 3}" / f"{k:03d}.png", np.round(image * 255).astype(np.uint8))
    return root


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One two-epoch MAE run on an unlabelled folder; (work dir, run dir, stdout)."""
    work = tmp_path_factory.mktemp("mae")
    make_unlabelled_folder(work / "unlabelled")
    recipe = RECIPES / "mae.yaml"
    result = run_cli(
        "pretrain-mae",
        str(recipe),
        *MAE_OVERRIDES,
        f"data.root={work / 'unlabelled'}",
        "trainer.max_epochs=2",
        "logging.name=mae",
        "logging.wandb=true",  # offline (run_cli sets WANDB_MODE): the grid goes to W&B too
        cwd=work,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return work, work / "runs" / "mae", result.stdout


@pytest.mark.slow
def test_pretrain_writes_encoder_export_checkpoints_and_grids(mae_run):
    _, run, stdout = mae_run
    assert "best val/loss" in stdout
    for name in (
        "encoder.safetensors",
        "config.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    grids = sorted(p.name for p in (run / "reconstructions").glob("*.png"))
    assert grids == ["epoch_000.png", "epoch_001.png"]
    logged = list((run / "wandb").glob("offline-run-*/files/media/images/val/reconstruction_*.png"))
    assert len(logged) == 2
    config = json.loads((run / "config.json").read_text())
    assert config["vittune"]["task"] == "pretrain-mae" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert config["vittune"]["patch_size"] == 8
    # The export is the encoder alone, in timm names: a plain timm model misses only its head.
    state = load_file(str(run / "encoder.safetensors"))
    plain = timm.create_model("vit_tiny_patch16_224", **{**config["model_args"], "num_classes": 5})
    result = plain.load_state_dict(state, strict=False)
    assert (
        sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    )
    # The fixed sin-cos table travels with the export, untouched by training.
    torch.testing.assert_close(state["pos_embed"][0, 1:], sincos_pos_embed((4, 4), 64))
    losses = [float(r["train/loss_epoch"]) for r in metrics_rows(run) if r.get("train/loss_epoch")]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow
def test_finetune_from_the_mae_run_at_another_resolution(mae_run):
    work, run, _ = mae_run
    make_class_images(work / "labelled", {"a": 12, "b": 12})
    result = run_cli(
        "finetune",
        str(RECIPES / "quickstart.yaml"),
        *TINY_OVERRIDES,
        "model.kwargs={}",  # taken from the MAE run's config.json
        "model.in_chans=1",
        "model.img_size=48",
        f"model.pretrained={run}",
        "data.builtin=null",
        f"data.root={work / 'labelled'}",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "logging.name=finetune",
        cwd=work,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"weights: {run / 'encoder.safetensors'}" in result.stdout
    assert "pos_embed resampled 4x4 -> 6x6 tokens" in result.stdout
    exported = load_file(str(work / "runs" / "finetune" / "model.safetensors"))
    assert exported["pos_embed"].shape == (1, 1 + 36, 64)
    assert exported["head.weight"].shape == (2, 64)


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_with_the_decoder(mae_run):
    work, run, _ = mae_run
    last = run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    assert any(k.startswith("decoder.") for k in before["state_dict"])  # the full model is kept
    result = run_cli(
        "pretrain-mae",
        str(RECIPES / "mae.yaml"),
        *MAE_OVERRIDES,
        f"data.root={work / 'unlabelled'}",
        "trainer.max_epochs=3",
        f"trainer.resume_from={last}",
        "logging.name=resumed",
        cwd=work,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = work / "runs" / "resumed"
    after = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = before["global_step"] // 2
    assert after["global_step"] == before["global_step"] + steps_per_epoch
    epochs = {r["epoch"] for r in metrics_rows(resumed) if r.get("train/loss_epoch")}
    assert epochs == {"2"}  # only the third epoch ran
    weight = "decoder.pred.weight"
    assert not torch.equal(after["state_dict"][weight], before["state_dict"][weight])
