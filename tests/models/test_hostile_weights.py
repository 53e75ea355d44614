"""Hostile or damaged weight folders are refused by size checks before anything is allocated:
every `model_args` geometry value in a run folder's config.json is bounded, and a safetensors
file's header is checked against the file's real size (real files, tampered byte by byte)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_class_images, run_cli
from helpers import tiny, write_recipe
from safetensors.torch import save_file

from vittune.errors import WeightsError
from vittune.models.run_config import read_run_config
from vittune.models.weights import read_state_dict, resolve_weight_file

GOOD_ARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}


def config_with(folder: Path, **model_args) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 2,
        "label_names": ["a", "b"],
        "model_args": {**GOOD_ARGS, **model_args},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_the_geometry_of_a_real_export_is_accepted(tmp_path: Path) -> None:
    config = read_run_config(config_with(tmp_path))
    assert config.model_kwargs == {"embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ({"depth": 1_000_000_000}, "depth 1000000000"),
        ({"depth": -3}, "depth -3"),
        ({"depth": True}, "depth True"),
        ({"num_heads": 0}, "num_heads 0"),
        ({"embed_dim": 3e6}, "embed_dim 3000000.0"),
        ({"embed_dim": 64, "num_heads": 3}, "not a multiple of num_heads 3"),
        ({"embed_dim": 16384, "depth": 256}, "billion parameters"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio inf"),
        ({"mlp_ratio": 0}, "mlp_ratio 0"),
        ({"img_size": [10**9, 10**9]}, "img_size"),
        ({"depths": [2] * 1000}, "1000 entries"),
        ({"in_chans": 0}, "in_chans 0"),
    ],
)
def test_out_of_range_geometry_is_refused_in_one_line(tmp_path: Path, tamper, named) -> None:
    with pytest.raises(WeightsError) as caught:
        read_run_config(config_with(tmp_path, **tamper))
    message = str(caught.value)
    assert named in message and "out of range" in message and "\n" not in message


def test_a_huge_class_count_is_refused(tmp_path: Path) -> None:
    file = config_with(tmp_path)
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "num_classes": 10**12}))
    with pytest.raises(WeightsError, match="num_classes"):
        read_run_config(file)


def real_safetensors(path: Path) -> bytes:
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(path))
    return path.read_bytes()


def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def hostile_files(good: bytes) -> dict[str, bytes]:
    (length,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + length]), good[8 + length :]
    bad_offsets = {**header, "w": {**header["w"], "data_offsets": [0, 10**12]}}
    wrong_shape = {**header, "w": {**header["w"], "shape": [1000, 1000]}}
    return {
        "header-2^62": struct.pack("<Q", 2**62) + good[8:],
        "bad-offsets": with_header(bad_offsets, data),
        "shape-vs-bytes": with_header(wrong_shape, data),
        "bad-metadata": with_header({**header, "__metadata__": {"a": 1}}, data),
        "truncated": good[: len(good) - 5],
        "text": b"these are not weights\n" * 10,
        "pickle": pickle.dumps({"w": [1.0, 2.0]}),
        "empty": b"",
    }


@pytest.mark.parametrize(
    "name",
    [
        "header-2^62",
        "bad-offsets",
        "shape-vs-bytes",
        "bad-metadata",
        "truncated",
        "text",
        "pickle",
        "empty",
    ],
)
def test_hostile_safetensors_are_refused_from_the_header(tmp_path: Path, name: str) -> None:
    good = real_safetensors(tmp_path / "good.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(hostile_files(good)[name])
    with pytest.raises(WeightsError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a usable safetensors file") and "\n" not in message


def test_the_untouched_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    real_safetensors(path)
    state = read_state_dict(path)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.slow
def test_a_tampered_run_folder_as_pretrained_is_one_line_and_leaves_no_folder(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "tampered"
    config_with(weights, depth=1_000_000_000)
    real_safetensors(weights / "model.safetensors")
    with pytest.raises(WeightsError):
        resolve_weight_file(weights)
    make_class_images(tmp_path / "data", {"a": 4, "b": 4}, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    result = run_cli(
        "finetune", str(recipe), *tiny(f"model.pretrained={weights}"), cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "depth 1000000000" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
