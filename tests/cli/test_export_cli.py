"""`vittune export` through the console script: a checked ONNX file and its int8 variant, and
a check that fails (one line, exit 2, the file removed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from helpers import ONE_THREAD


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def test_export_onnx_int8_prints_the_check_and_the_table(run_dir: Path) -> None:
    result = run_cli(
        "export", str(run_dir), "--quantize", "int8", "--opset", "17", cwd=run_dir, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "export"
    assert f"vittune export: {folder / 'model.onnx'} matches PyTorch on 15 validation images" in (
        result.stdout
    )
    rows = {line.split()[0] + " " + line.split()[1] for line in result.stdout.splitlines()[3:6]}
    assert rows == {"pytorch fp32", "onnx fp32", "onnx int8"}
    for name in ("model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json"):
        assert (folder / name).is_file(), name
    contract = json.loads((folder / "model.onnx.json").read_text())
    assert contract["opset"] == 17 and contract["input"]["shape"] == ["batch", 1, 32, 32]
    report = json.loads((folder / "report.json").read_text())
    assert report["check_images"] == "validation" and len(report["variants"]) == 3


def test_a_failed_check_is_one_line_and_leaves_no_file(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict.onnx"
    result = run_cli(
        "export", str(run_dir), "--out", str(out), "--tolerance", "1e-12", cwd=tmp_path,
        env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("vittune: error: the onnx export differs from PyTorch by")
    assert f"removed {out}" in lines[-1]
    assert not out.exists() and not out.with_name("strict.onnx.json").exists()
