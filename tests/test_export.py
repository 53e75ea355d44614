"""Exports: timm key names in safetensors that timm itself loads, plus a readable config.json."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from conftest import TINY_VIT
from safetensors import safe_open

from vittune.export import export_config, write_export

GEOMETRY = dict(img_size=32, patch_size=8, in_chans=1, **TINY_VIT["kwargs"])


def test_timm_loads_the_export_and_gives_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = timm.create_model(TINY_VIT["name"], num_classes=3, **GEOMETRY).eval()
    config = export_config(
        TINY_VIT["name"], trained, ["cat", "dog", "fox"], 32, 1, (0.5,), (0.5,),
        dict(TINY_VIT["kwargs"]), "finetune",
    )  # fmt: skip
    path = write_export(trained.state_dict(), config, tmp_path)
    assert path == tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == set(trained.state_dict())  # timm names, no `model.` prefix
        assert handle.metadata()["architecture"] == TINY_VIT["name"]
    # timm drops a checkpoint's head unless the overlay says how many classes it was saved with
    loaded = timm.create_model(
        TINY_VIT["name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=3),
        num_classes=3,
        **GEOMETRY,
    ).eval()
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images), rtol=0, atol=0)


def test_config_json_describes_how_to_rebuild_the_model(tmp_path: Path) -> None:
    model = timm.create_model(TINY_VIT["name"], num_classes=2, **GEOMETRY)
    config = export_config(
        TINY_VIT["name"], model, ["a", "b"], (32, 48), 1, (0.4,), (0.2,), {"depth": 2}, "finetune"
    )
    write_export(model.state_dict(), config, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == {
        "architecture": TINY_VIT["name"],
        "task": "finetune",
        "classes": ["a", "b"],
        "num_classes": 2,
        "img_size": [32, 48],
        "patch_size": 8,
        "in_chans": 1,
        "mean": [0.4],
        "std": [0.2],
        "model_kwargs": {"depth": 2},
    }


def test_shared_and_strided_tensors_are_written_as_plain_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "strided": base.t()}  # safetensors refuses these as they are
    config = {"architecture": "none"}
    path = write_export(state, config, tmp_path)
    with safe_open(str(path), "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("tied"), base)
        torch.testing.assert_close(handle.get_tensor("strided"), base.t())
