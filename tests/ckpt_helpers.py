"""Helpers for the checkpoint, preemption and run-folder tests: a `vittune` subprocess that
can be signalled or killed mid-run, and what its checkpoints hold."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import VITTUNE, subprocess_env
from helpers import ONE_THREAD


def cli_env(**extra: str) -> dict[str, str]:
    """conftest's `subprocess_env` with one torch thread, then `extra`."""
    return subprocess_env(**{**ONE_THREAD, **extra})


def start_cli(*args: str, cwd: Path, log: Path, env: dict[str, str] | None = None):
    """Start `vittune ...` in the background; stdout and stderr go to files (a full pipe would
    block the child)."""
    out, err = log.with_suffix(".out").open("w"), log.with_suffix(".err").open("w")
    return subprocess.Popen(
        [VITTUNE, *args], cwd=cwd, env=env or cli_env(), stdout=out, stderr=err, text=True
    )


def stderr_of(log: Path) -> str:
    return log.with_suffix(".err").read_text()


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120):
    """Poll `condition` while `process` runs; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (code {process.returncode}) too early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder under `folder`: equal before and after a refused
    command when it changed, added and removed nothing (an empty new folder included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        for p in sorted(folder.rglob("*"))
    }


def load(path: Path) -> dict:
    """A checkpoint as any user would open it: `weights_only=True`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def step_of(path: Path) -> int:
    """The global step of a checkpoint, or -1 while there is none (it is replaced atomically,
    so a reader never sees a partial file)."""
    try:
        return int(load(path)["global_step"])
    except FileNotFoundError:
        return -1


def best_score(checkpoint: dict) -> float | None:
    """The best monitored score the checkpoint's ModelCheckpoint state remembers."""
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    score = states[0]["best_model_score"]
    return None if score is None else float(score)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, a single `vittune: error:` line, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vittune: error: ")
    return lines[0]
