"""Exports: a run folder in timm's hub layout that plain timm loads (head, class names and
preprocessing included), the model card, and vittune reading new and old config.json files."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_OVERRIDES, TINY_VIT, make_class_images, write_image
from helpers import RECIPES, ROOT
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from vittune.data.decode import read_image
from vittune.deploy.timm_folder import export_best, export_config, model_card, write_export
from vittune.errors import WeightsError
from vittune.models.backbone import create_backbone
from vittune.models.weights import resolve_weight_file
from vittune.recipe.load import load_recipe
from vittune.recipe.schema import ModelConfig, Recipe
from vittune.tasks.assembly import Assembly, build

# A grey, non-square run with its own statistics: every default timm would guess is wrong.
SIZE, MEAN, STD = (32, 48), (0.3,), (0.25,)
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Assembly, Recipe, Path]:
    """A tiny fine-tune, assembled in-process and exported (no training: the weights are the
    random init, which tests the export as well as trained ones would)."""
    work = tmp_path_factory.mktemp("export")
    make_class_images(work / "data", {c: 5 for c in CLASSES}, size=40)
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [
            *TINY_OVERRIDES,
            f"model.img_size=[{SIZE[0]}, {SIZE[1]}]",
            "model.in_chans=1",
            "data.builtin=null",
            f"data.root={work / 'data'}",
            f"data.mean=[{MEAN[0]}]",
            f"data.std=[{STD[0]}]",
        ],
    )
    torch.manual_seed(0)
    assembly = build(recipe, "finetune")
    assembly.task.model.eval()
    folder = work / "runs" / "tiny"
    folder.mkdir(parents=True)
    export_best(assembly, recipe, "finetune", None, folder, metrics={"test/acc1": 0.625})
    return assembly, recipe, folder


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_timm_loads_the_run_folder_with_its_trained_head(run) -> None:
    assembly, _, folder = run
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert loaded.num_classes == len(CLASSES)
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    images = torch.randn(4, 1, *SIZE)
    torch.testing.assert_close(
        logits(loaded, images), logits(assembly.task.model, images), rtol=0, atol=0
    )
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(assembly.task.model.state_dict())  # timm names


def test_timm_resolves_the_runs_preprocessing(run, tmp_path: Path) -> None:
    assembly, recipe, folder = run
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    config = timm.data.resolve_model_data_config(loaded)
    assert tuple(config["input_size"]) == (recipe.model.in_chans, *recipe.model.img_size)
    assert tuple(config["mean"]) == assembly.mean == MEAN
    assert tuple(config["std"]) == assembly.std == STD
    assert (config["interpolation"], config["crop_pct"]) == ("bilinear", 1.0)
    # timm's eval transform gives the tensor vittune's evaluation gives (an image already at
    # the input size, so no resampling method can differ).
    path = write_image(
        tmp_path / "x.png", np.random.default_rng(0).integers(0, 256, SIZE, np.uint8)
    )
    ours = assembly.datamodule.eval_transform(image=read_image(path, in_chans=1))["image"]
    theirs = timm.data.create_transform(**config)(Image.open(path).convert("L"))
    torch.testing.assert_close(theirs, ours)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_snippet_runs_as_written(run, tmp_path: Path, monkeypatch, capsys) -> None:
    assembly, _, folder = run
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The export loads in plain timm") :]
    code = python_blocks(section)[0]
    assert code.count('"local-dir:runs/quickstart"') == 1
    code = code.replace("runs/quickstart", str(folder))  # the only change
    image = np.random.default_rng(1).integers(0, 256, SIZE, np.uint8)
    write_image(tmp_path / "image.png", image)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = torch.randn(2, 1, *SIZE)
    torch.testing.assert_close(
        logits(scope["model"], images), logits(assembly.task.model, images), rtol=0, atol=0
    )
    pixels = read_image(tmp_path / "image.png", in_chans=1)
    ours = logits(
        assembly.task.model, assembly.datamodule.eval_transform(image=pixels)["image"][None]
    )
    torch.testing.assert_close(scope["probabilities"], ours.softmax(-1))
    assert capsys.readouterr().out.strip() == CLASSES[int(ours.argmax())]


def test_the_model_cards_snippets_load_the_same_model(run) -> None:
    assembly, _, folder = run
    blocks = python_blocks((folder / "README.md").read_text())
    assert len(blocks) == 2  # local-dir, then the weight file with a pretrained_cfg overlay
    images = torch.randn(2, 1, *SIZE)
    for code in blocks:
        scope: dict = {"timm": timm}
        exec(compile(code, "model card", "exec"), scope)
        torch.testing.assert_close(
            logits(scope["model"], images), logits(assembly.task.model, images), rtol=0, atol=0
        )


def test_config_json_is_timms_layout_with_vittunes_facts(run) -> None:
    _, _, folder = run
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == TINY_VIT["name"]
    assert config["num_classes"] == 3 and config["label_names"] == CLASSES
    assert config["model_args"] == {
        "num_classes": 3,
        "in_chans": 1,
        "img_size": list(SIZE),
        "patch_size": 8,
        **TINY_VIT["kwargs"],
        "global_pool": "token",
    }
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [1, *SIZE]
    assert (pretrained["mean"], pretrained["std"]) == (list(MEAN), list(STD))
    assert config["vittune"]["task"] == "finetune"
    assert (config["vittune"]["patch_size"], config["vittune"]["grid"]) == (8, [4, 6])
    saved = resolve_weight_file(folder).config
    assert (saved.classes, saved.img_size, saved.patch_size, saved.grid) == (
        CLASSES,
        SIZE,
        8,
        (4, 6),
    )
    assert (saved.in_chans, saved.mean, saved.std, saved.legacy) == (1, MEAN, STD, False)


def test_a_run_folder_loads_back_into_vittune_with_its_head(run) -> None:
    assembly, _, folder = run
    cfg = ModelConfig(
        name=TINY_VIT["name"],
        pretrained=str(folder),
        img_size=SIZE,
        patch_size=8,
        in_chans=1,
        keep_head=True,
    )
    model, report = create_backbone(cfg, num_classes=3)  # model.kwargs come from config.json
    assert report.reinitialised == [] and report.grid_before == (4, 6)
    images = torch.randn(2, 1, *SIZE)
    torch.testing.assert_close(logits(model, images), logits(assembly.task.model, images))


def test_an_old_format_config_json_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = timm.create_model(
        TINY_VIT["name"],
        num_classes=2,
        img_size=SIZE,
        patch_size=8,
        in_chans=1,
        **TINY_VIT["kwargs"],
    )
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    legacy = {  # what vittune exported before it followed timm's layout
        "architecture": TINY_VIT["name"],
        "task": "finetune",
        "classes": ["a", "b"],
        "num_classes": 2,
        "img_size": list(SIZE),
        "patch_size": 8,
        "in_chans": 1,
        "mean": [0.4],
        "std": [0.2],
        "model_kwargs": TINY_VIT["kwargs"],
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    saved = resolve_weight_file(tmp_path).config
    assert saved.legacy and saved.classes == ["a", "b"] and saved.grid == (4, 6)
    assert (saved.mean, saved.std, saved.model_kwargs) == ((0.4,), (0.2,), TINY_VIT["kwargs"])
    cfg = ModelConfig(
        name=TINY_VIT["name"],
        pretrained=str(tmp_path),
        img_size=SIZE,
        patch_size=8,
        in_chans=1,
        keep_head=True,
    )
    model, report = create_backbone(cfg, num_classes=2)
    assert report.reinitialised == []
    images = torch.randn(2, 1, *SIZE)
    torch.testing.assert_close(logits(model, images), logits(trained, images))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["model_args"].update(checkpoint_path="/tmp/other.pth"),
        lambda c: c["model_args"].update(pretrained_cfg_overlay={"file": "/tmp/other.pth"}),
        lambda c: c["model_args"].update(global_pool="../../other.pth"),
        lambda c: c["model_args"].update(embed_dim="64; rm"),
        lambda c: c.update(loader="pickle"),
        lambda c: c["vittune"].update(weights="/tmp/other.pth"),
    ],
    ids=["checkpoint_path", "overlay", "path", "not-a-number", "unknown-key", "vittune-key"],
)
def test_a_tampered_config_json_is_refused_in_one_line(run, tmp_path: Path, tamper) -> None:
    _, _, folder = run
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    tamper(config)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as caught:
        resolve_weight_file(copy)
    message = str(caught.value)
    assert str(copy / "config.json") in message and "\n" not in message


def test_the_model_card_names_classes_metrics_and_data(run) -> None:
    _, _, folder = run
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    assert all(f"  - {c}\n" in card for c in CLASSES)
    assert "test/acc1: 0.6250" in card
    assert "  - train: 12\n" in card and "  - val: 3\n" in card
    assert "[recipe.yaml](recipe.yaml)" in card
    assert "**Best validation:** not recorded" in card  # no checkpoint in this run


def test_model_card_is_a_pure_function_of_its_facts() -> None:
    facts = {
        "name": "xray",
        "run_dir": "runs/xray",
        "weights": "model.safetensors",
        "architecture": "vit_small_patch16_224",
        "task": "finetune",
        "source": "timm hub (timm/vit_small_patch16_224.augreg_in21k)",
        "classes": ["normal", "pneumonia"],
        "num_classes": 2,
        "splits": {"train": 80, "val": 20, "test": 10},
        "input_size": [1, 224, 224],
        "mean": [0.5],
        "std": [0.25],
        "interpolation": "bilinear",
        "model_args": {"num_classes": 2, "in_chans": 1},
        "best": {"monitor": "val/auroc", "score": 0.91234, "epoch": 7, "step": 560},
        "metrics": {"test/auroc": 0.9},
        "recipe": "recipe.yaml",
    }
    card = model_card(facts)
    assert card == model_card(dict(facts))
    assert "**Best validation:** val/auroc = 0.9123 at epoch 7 (step 560)" in card
    assert "  - pneumonia\n" in card and "test/auroc: 0.9000" in card
    assert 'timm.create_model("local-dir:runs/xray", pretrained=True)' in card
    assert 'file="runs/xray/model.safetensors", num_classes=2' in card


def test_exported_files_are_readable_by_all(run) -> None:
    _, _, folder = run
    for name in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name


def test_an_mae_encoder_export_loads_headless_in_timm(tmp_path: Path) -> None:
    """MAE runs export encoder.safetensors; timm's local-dir loader takes the folder's only
    safetensors file, and a new head can be asked for."""
    geometry = dict(img_size=SIZE, patch_size=8, in_chans=1, **TINY_VIT["kwargs"])
    encoder = timm.create_model(TINY_VIT["name"], num_classes=0, **geometry).eval()
    config = export_config(encoder, CLASSES, SIZE, 1, MEAN, STD, "pretrain-mae")
    assert config["num_classes"] == 0 and "label_names" not in config
    assert config["vittune"]["classes"] == CLASSES
    write_export(encoder.state_dict(), config, tmp_path, "encoder.safetensors")
    images = torch.randn(2, 1, *SIZE)
    headless = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torch.testing.assert_close(logits(headless, images), logits(encoder, images), rtol=0, atol=0)
    tuned = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5)
    torch.testing.assert_close(
        tuned.forward_head(tuned.forward_features(images), True), logits(encoder, images)
    )
    assert resolve_weight_file(tmp_path).config.num_classes == 0


def test_shared_and_strided_tensors_are_written_as_plain_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "strided": base.t()}  # safetensors refuses these as they are
    config = {"architecture": "none"}
    path = write_export(state, config, tmp_path)
    with safe_open(str(path), "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("tied"), base)
        torch.testing.assert_close(handle.get_tensor("strided"), base.t())


def test_a_from_scratch_run_claims_no_hub_provenance(run) -> None:
    """timm copies the architecture's default tag and license into config.json; a run that
    never saw those weights drops them, and timm then reports no tag for it."""
    assembly, _, folder = run
    config = json.loads((folder / "config.json").read_text())
    assert not {"tag", "license", "hf_hub_id", "url"} & set(config["pretrained_cfg"])
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert not loaded.pretrained_cfg.get("tag") and not loaded.pretrained_cfg.get("license")
    # started from the hub weights, the provenance is true and stays
    hub = export_config(assembly.task.model, CLASSES, SIZE, 1, MEAN, STD, "finetune", True)
    default = timm.create_model(TINY_VIT["name"], pretrained=False).pretrained_cfg
    assert (hub["pretrained_cfg"]["tag"], hub["pretrained_cfg"]["license"]) == (
        default["tag"],
        default["license"],
    )
