"""Helpers for the foundation tests: an independent PNG writer, CLI argument lists, run outputs.

tests/conftest.py holds the shared fixtures; this module adds what several test files need
without changing it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import yaml
from conftest import TINY_OVERRIDES, VITTUNE, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


# Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine
# OpenMP threads spin-wait for each other (8x the CPU time measured): one thread per run.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """TINY_OVERRIDES (minus keys in `drop`) followed by `extra` overrides."""
    kept = [o for o in TINY_OVERRIDES if o.split("=", 1)[0] not in drop]
    return [*kept, *extra]


def run_cli_unset(
    *args: str,
    cwd: Path,
    unset: tuple[str, ...],
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """conftest's `run_cli` with variables removed from the environment (not just emptied:
    wandb refuses an empty WANDB_MODE), e.g. to act as a machine where W&B was never set up."""
    return subprocess.run(
        [VITTUNE, *args],
        cwd=cwd,
        env=subprocess_env(unset=unset, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_recipe(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Encode a PNG by hand (grey, RGB or RGBA; 8 or 16 bit), independently of OpenCV and PIL.

    Used as the reference writer for 16-bit colour images, which PIL cannot write, so that
    a decoder test does not compare OpenCV with itself.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    depth = 16 if pixels.dtype == np.uint16 else 8
    samples = pixels.astype(">u2" if depth == 16 else "u1")  # PNG stores big-endian samples
    rows = b"".join(b"\x00" + samples[r].tobytes() for r in range(height))  # filter type 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics file."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The non-empty values of one metrics column, in logging order."""
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def expected_lr(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.0) -> float:
    """Linear warmup then half-cosine decay, written from the formula (Loshchilov & Hutter)."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    t = (step - warmup) / (total - warmup)
    return base * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2)


def held_out(count: int, fraction: float) -> int:
    """How many images of a class the stratified split holds out: round(n * f), at least 1,
    and never the last one (the documented rule)."""
    if count < 2:
        return 0
    return min(count - 1, max(1, round(count * fraction)))


def run_fresh_python(code: str, *args: str, cwd: Path) -> dict:
    """`python -c code args` in a fresh interpreter (imports and start-up as the command has
    them), as a `vittune` subprocess runs; the JSON object its last line of output prints."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=subprocess_env(**ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `vittune` command run inside this test process through typer's runner: the same
    app, error handling and exit codes as the console script, without paying for a Python
    start-up and the imports each time. One test per path still runs the real script
    (`run_cli`); this serves the many cases of the same path. The environment and the working
    folder are restored afterwards."""
    from typer.testing import CliRunner

    from vittune.cli import app

    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), prog_name="vittune")
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["vittune", *args], result.exit_code, result.stdout, result.stderr
    )
