"""`vittune export` through the console script: a checked ONNX file and its int8 variant, and
exports that fail (a check, a bad option, Ctrl-C) in one line, with the earlier export kept."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VITTUNE, run_cli, subprocess_env
from helpers import ONE_THREAD

INT8_EXPORT = ("model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json")


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def int8_export(run_dir: Path) -> subprocess.CompletedProcess:
    """One good export with its int8 variant, which the failing exports below must keep."""
    return run_cli(
        "export", str(run_dir), "--quantize", "int8", "--opset", "17", cwd=run_dir, env=ONE_THREAD
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in the export folder, by name, with its bytes (hidden leftovers included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def listed_files(report: dict) -> set[str]:
    """Every file report.json names: the newest export's and each earlier one's variants."""
    documents = [report, *report["exports"].values()]
    return {v["path"] for doc in documents for v in doc["variants"] if v["path"]}


def test_export_onnx_int8_prints_the_check_and_the_table(
    run_dir: Path, int8_export: subprocess.CompletedProcess
) -> None:
    result = int8_export
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "export"
    assert f"vittune export: {folder / 'model.onnx'} matches PyTorch on 15 validation images" in (
        result.stdout
    )
    rows = {line.split()[0] + " " + line.split()[1] for line in result.stdout.splitlines()[3:6]}
    assert rows == {"pytorch fp32", "onnx fp32", "onnx int8"}
    for name in INT8_EXPORT:
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
    assert f"nothing written to {out}" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # no file, no sidecar, no leftover temp folder


@pytest.mark.parametrize(
    "options, message",
    [
        (("--tolerance", "1e-12"), "the onnx export differs from PyTorch by"),
        (("--opset", "28"), "--opset 28 is above"),
    ],
)
def test_a_failed_export_keeps_the_earlier_one_byte_for_byte(
    run_dir: Path, int8_export: subprocess.CompletedProcess, options: tuple, message: str
) -> None:
    """Before, the earlier model.onnx and model.int8.onnx were deleted before the new export
    was made, so a failing one left none, and report.json listed files no longer there."""
    assert int8_export.returncode == 0, int8_export.stderr[-3000:]
    folder = run_dir / "export"
    before = snapshot(folder)
    assert set(INT8_EXPORT) <= set(before)
    result = run_cli("export", str(run_dir), *options, cwd=run_dir, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vittune: error: {message}"), line
    if options[0] == "--tolerance":
        assert f"the previous {folder / 'model.onnx'} is kept" in line
    assert snapshot(folder) == before
    report = json.loads((folder / "report.json").read_text())
    assert all(Path(file).is_file() for file in listed_files(report))


def test_ctrl_c_while_exporting_keeps_the_earlier_export(
    run_dir: Path, int8_export: subprocess.CompletedProcess
) -> None:
    """SIGINT as soon as the export folder changes (the new export has begun), seconds before
    it could be complete: the earlier files and report.json are as they were."""
    assert int8_export.returncode == 0, int8_export.stderr[-3000:]
    folder = run_dir / "export"
    before = snapshot(folder)
    process = subprocess.Popen(
        [VITTUNE, "export", str(run_dir), "--opset", "18"],
        cwd=run_dir,
        env=subprocess_env(**ONE_THREAD),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job ignores SIGINT, and a child inherits that: not this one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while sorted(p.name for p in folder.iterdir()) == list(before):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]  # 128 + SIGINT, as a shell reports it
    assert snapshot(folder) == before


def test_a_plain_export_replaces_the_stale_int8_file(
    run_dir: Path, int8_export: subprocess.CompletedProcess
) -> None:
    """An int8 file is derived from the model.onnx beside it: once a new model.onnx replaces
    that one, the int8 file is stale and goes, and report.json lists only files still there."""
    assert int8_export.returncode == 0, int8_export.stderr[-3000:]
    folder = run_dir / "export"
    result = run_cli(
        "export", str(run_dir), "--opset", "18", "--check-images", "4", cwd=run_dir,
        env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((folder / "model.onnx.json").read_text())["opset"] == 18
    assert not (folder / "model.int8.onnx").exists()
    assert not (folder / "model.int8.onnx.json").exists()
    report = json.loads((folder / "report.json").read_text())
    assert listed_files(report) == {str(folder / "model.onnx")}
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
