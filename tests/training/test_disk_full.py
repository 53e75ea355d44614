"""A full disk and a file-size limit, caused for real (a small tmpfs mounted for the test; a
child process under RLIMIT_FSIZE with SIGXFSZ ignored): one line naming the file, the free
space and the space needed; the previous checkpoint is whole and loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ckpt_helpers import load
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, read_metrics, tiny, write_recipe

WRITE_UNDER_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from vittune.errors import StorageError
from vittune.training.run_folder import atomic_write
path, writer = Path(sys.argv[1]), sys.argv[2]
def save(tensors, temp):
    if writer == "torch":
        torch.save(tensors, temp)
    else:  # an export: safetensors reports the failed write as a Rust io error
        save_file(tensors, str(temp))
atomic_write(path, lambda t: save({"w": torch.zeros(1000)}, t))  # 4 kB: fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    big = {"w": torch.zeros(1_000_000)}  # 4 MB
    atomic_write(path, lambda t: save(big, t), size=4_000_000 if writer != "torch" else 0)
except StorageError as err:
    print(err)
"""


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_file_size_limit_is_one_line_and_keeps_the_previous_file(
    tmp_path: Path, writer: str
) -> None:
    path = tmp_path / ("last.ckpt" if writer == "torch" else "model.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_LIMIT, str(path), writer],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith(f"cannot write {path}: the write was refused with space free"), line
    assert "(a quota or a file-size limit, ulimit -f);" in line
    # torch's temp file holds what it wrote up to the limit; safetensors is told the size
    needed = "0.1" if writer == "torch" else "4.0"
    assert f"MB free there, about {needed} MB needed (the previous file is kept, whole);" in line
    assert load_file(path)["w"].shape == (1000,)  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs: room for two tiny-model checkpoints (1.4 MB each), not a third."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the file-size-limit test still runs)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    make_class_images(tmp_path / "data", {"a": 10, "b": 10}, size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.2}}
    )
    result = run_cli(
        "finetune",
        str(recipe),
        *tiny("trainer.max_epochs=4", "trainer.log_every_n_steps=1"),
        f"logging.run_dir={small_disk}",
        "logging.name=x",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vittune:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    run_dir = small_disk / "x"
    # Which write meets the full disk (a checkpoint, or the export at the end) depends on the
    # sizes; each must say so in the same line.
    assert re.match(
        rf"vittune: error: cannot write {re.escape(str(run_dir))}/(checkpoints/\w+\.ckpt"
        r"|model\.safetensors): no space left on device; [\d.]+ MB free there, about"
        r" [\d.]+ MB needed",
        errors[0],
    ), errors[0]
    assert f"run folder {run_dir} kept: it holds checkpoints/" in errors[0]
    last = load(run_dir / "checkpoints" / "last.ckpt")  # whole, loadable
    assert last["global_step"] >= 1
    assert max(int(r["step"]) for r in read_metrics(run_dir)) + 1 >= last["global_step"]
    assert not list(run_dir.rglob("*.tmp"))


WRITE_ADAPTER_UNDER_LIMIT = """
import resource, signal, sys, timm, torch
from pathlib import Path
from vittune.errors import StorageError
from vittune.models.adapters import apply_peft
from vittune.models.adapters.export_weights import exported_weights, write_adapter
from vittune.recipe.schema import PeftConfig
run_dir, method = Path(sys.argv[1]), sys.argv[2]
model = timm.create_model(
    "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
    num_classes=3,
)
cfg = PeftConfig(method=method)
apply_peft(model, cfg)
weights = exported_weights(model, cfg, model.state_dict())
write_adapter(weights, cfg, run_dir, "test")  # fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000, 1_000))
try:
    write_adapter(weights, cfg, run_dir, "test")
except StorageError as err:
    print(err)
"""


@pytest.mark.parametrize("method", ["lora", "ssf"])  # peft's save_pretrained, our safetensors
def test_a_refused_adapter_write_is_one_line_and_keeps_the_previous_adapter(
    tmp_path: Path, method: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WRITE_ADAPTER_UNDER_LIMIT, str(tmp_path), method],
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith(f"cannot write {tmp_path / 'adapter'}: the write was refused"), line
    assert "(the previous file is kept, whole)" in line
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no partial folder left
    tensors = [p for p in (tmp_path / "adapter").iterdir() if p.suffix == ".safetensors"]
    assert len(tensors) == 1 and safetensors.torch.load_file(str(tensors[0]))  # whole, loads


EXPORT_UNDER_LIMIT = """
import resource, signal, sys
from vittune.deploy.pipeline import export_run
from vittune.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # the model is ~0.5 MB
try:
    export_run(sys.argv[1], sys.argv[2], out=sys.argv[3], check_limit=8, latency_repeats=1)
except StorageError as err:
    print(err)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_refused_export_write_is_one_line_and_keeps_the_earlier_file(
    trained_run: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    out.write_bytes(b"an earlier export")
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_UNDER_LIMIT, str(trained_run), fmt, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"cannot write {out}: the write was refused with space free"), line
    assert "(the previous file is kept, whole)" in line
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging folder left
