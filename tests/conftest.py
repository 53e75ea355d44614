"""Shared test helpers: generated images, tiny models, and the real `vittune` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A tiny ViT (img 32, patch 8 -> 4x4 tokens, 64 wide, 2 blocks) for fast CPU tests.
TINY_VIT = dict(
    name="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    kwargs=dict(embed_dim=64, depth=2, num_heads=2),
)
TINY_OVERRIDES = [
    "model.name=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.img_size=32",
    "model.patch_size=8",
    "model.kwargs={embed_dim: 64, depth: 2, num_heads: 2}",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "logging.wandb=false",
]

VITTUNE = shutil.which("vittune", path=str(Path(sys.executable).parent)) or "vittune"


def subprocess_env(*, unset: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment of a `vittune` subprocess: this one's, with W&B offline and warnings
    off, less what this pytest process set for its own in-process runs: the run folder it
    shares with DDP children (VITTUNE_RUN_DIR and its parent's pid) and its wandb-core service
    (WANDB_SERVICE, see no_inherited_wandb_service below). `unset` removes more variables
    (removed, not emptied: wandb refuses an empty WANDB_MODE); `extra` is set last."""
    dropped = {"VITTUNE_RUN_DIR", "VITTUNE_RUN_DIR_PARENT", "WANDB_SERVICE", *unset}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    defaults = {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return {**env, **{k: v for k, v in defaults.items() if k not in unset}, **extra}


def run_cli(
    *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `vittune` console script in a subprocess, as a user would."""
    return subprocess.run(
        [VITTUNE, *args],
        cwd=cwd,
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3 and pixels.shape[2] >= 3:
        order = [2, 1, 0, 3] if pixels.shape[2] == 4 else [2, 1, 0]
        pixels = pixels[:, :, order]  # OpenCV writes BGR(A)
    assert cv2.imwrite(str(path), pixels), path
    return path


def make_class_images(
    root: Path,
    counts: dict[str, int],
    size: int = 32,
    dtype: type = np.uint8,
    channels: int = 1,
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """A learnable image folder: class i shows stripes at its own angle, with random phase and noise.

    Every patch carries the class signal, so even a tiny ViT (whose token pooling ignores
    where a patch sits until it has learned position embeddings) separates classes quickly,
    and per-image min-max scaling keeps the signal.
    """
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    for index, (name, count) in enumerate(counts.items()):
        angle = np.pi * index / max(1, len(counts))
        wave = np.cos(angle) * cols + np.sin(angle) * rows
        for k in range(count):
            stripes = 0.5 + 0.35 * np.sin(2 * np.pi * wave / 6.0 + rng.uniform(0, 2 * np.pi))
            image = np.clip(stripes + rng.normal(0, 0.08, size=(size, size)), 0, 1)
            pixels = np.round(image * top).astype(dtype)
            if channels > 1:
                pixels = np.repeat(pixels[:, :, None], channels, axis=2)
            write_image(root / name / f"{k:04d}{suffix}", pixels)
    return root


@pytest.fixture(scope="session")
def vittune_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the bundled digits, shared by every test in the session."""
    cache = tmp_path_factory.mktemp("vittune-cache")
    os.environ["VITTUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def digits_root(vittune_cache: Path) -> Path:
    from vittune.data.builtin import export_digits

    return export_digits()


TRAINED_RUN_CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-class grey run on data with train/val/test folders (test scored at the end).

    Shared by every test that needs a trained run (evaluate, predict, attention, export): one
    tiny training for the session instead of one per module. Tests may add files beside it
    (eval/, export/) but must not change what training wrote.
    """
    root = tmp_path_factory.mktemp("evaluate")
    for split, count, seed in [("train", 16, 0), ("val", 5, 1), ("test", 7, 2)]:
        make_class_images(
            root / "data" / split, dict.fromkeys(TRAINED_RUN_CLASSES, count), seed=seed
        )
    recipe = root / "r.yaml"
    recipe.write_text(f"data:\n  root: {root / 'data'}\n")
    overrides = (
        *TINY_OVERRIDES,
        "trainer.max_epochs=3",
        "data.batch_size=8",
        "model.in_chans=1",
        "checkpoint.test_last=true",
        "logging.attention_every_n_epochs=3",
        "logging.name=run",
    )
    result = run_cli("finetune", str(recipe), *overrides, cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test (best weights): " in result.stdout and "test_last (last weights)" in result.stdout
    return root / "runs" / "run"


@pytest.fixture(autouse=True)
def no_inherited_wandb_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wandb-core service that an in-process test started (its address in WANDB_SERVICE) must
    not be inherited by the `vittune` subprocesses of later tests: they would log into that
    process's service, which writes nothing into their own run folder. Under pytest-xdist the
    order of tests in a worker differs from a serial run, so this showed up only there.
    Module- and session-scoped fixtures run before this one: `subprocess_env` drops it too."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
