"""Run folders and resumes: user mistakes are one line with exit 2 and leave nothing half-made;
an inherited VITTUNE_RUN_DIR never sends a run into an existing folder; config.json is
checked before its model_kwargs reach timm; exports are readable by all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckpt_helpers import cli_env, one_line_error
from conftest import VITTUNE, make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe

from vittune.checkpointing import read_resume_point
from vittune.errors import RecipeError, WeightsError
from vittune.models.weights import resolve_weight_file
from vittune.run_folder import RUN_DIR_ENV, RUN_DIR_PARENT_ENV, prepare_run_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a finished one-epoch run, `runs/source`."""
    work = tmp_path_factory.mktemp("work")
    make_class_images(work / "data", {"a": 8, "b": 8}, size=32)
    write_recipe(work / "r.yaml", {"data": {"root": str(work / "data"), "batch_size": 4}})
    result = run_cli(
        "finetune", "r.yaml", *tiny("trainer.max_epochs=1", "logging.name=source"), cwd=work
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return work


def folders(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "runs").iterdir())


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("case", "overrides", "expected"),
    [
        ("text", [], "is not a checkpoint (not a torch file)"),
        (
            "last",
            ["model.kwargs={embed_dim: 64, depth: 1, num_heads: 2}"],
            "differs from the checkpoint's in model.kwargs.depth, which a resume cannot change",
        ),
        (
            "last",
            ["optim.name=sgd", "optim.lr=0.1"],
            "differs from the checkpoint's in optim.lr, optim.name, which a resume cannot change",
        ),
    ],
)
def test_resume_mistakes_are_one_line_and_leave_no_folder(
    source: Path, case: str, overrides: list[str], expected: str
) -> None:
    files = {
        "text": source / "notes.txt",
        "last": source / "runs" / "source" / "checkpoints" / "last.ckpt",
    }
    files["text"].write_text("not a checkpoint\n")
    before = fingerprint(source / "runs" / "source")
    result = run_cli(
        "finetune",
        "r.yaml",
        *tiny("trainer.max_epochs=2", *overrides),
        f"trainer.resume_from={files[case]}",
        "logging.name=resumed",
        cwd=source,
    )
    assert expected in one_line_error(result)
    assert folders(source) == ["source"]
    assert fingerprint(source / "runs" / "source") == before


def test_a_torch_file_without_training_state_is_not_resumable(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(RecipeError, match="is not a vittune training checkpoint"):
        read_resume_point(tmp_path / "weights.pt")


def test_resume_on_data_with_other_classes_is_refused_and_the_folder_removed(source: Path):
    make_class_images(source / "three", {"a": 4, "b": 4, "c": 4}, size=32)
    result = run_cli(
        "finetune",
        "r.yaml",
        *tiny("trainer.max_epochs=2", f"data.root={source / 'three'}"),
        f"trainer.resume_from={source / 'runs' / 'source' / 'checkpoints' / 'last.ckpt'}",
        "logging.name=resumed",
        cwd=source,
    )
    line = one_line_error(result)
    assert (
        "holds another model than this recipe builds (model.head.weight (2, 64) vs (3, 64)" in line
    )
    assert folders(source) == ["source"]  # made for the run, removed: nothing was trained


def test_broken_config_json_in_a_weights_folder_is_one_line(source: Path) -> None:
    broken = source / "runs" / "broken"
    shutil.copytree(source / "runs" / "source", broken)
    (broken / "config.json").write_text('{"architecture": "vit_tiny_patch16_224",')
    result = run_cli(
        "finetune", "r.yaml", *tiny(f"model.pretrained={broken}", "logging.name=t"), cwd=source
    )
    assert f"{broken / 'config.json'} is not valid JSON" in one_line_error(result)
    shutil.rmtree(broken)
    assert folders(source) == ["source"]


def test_config_json_kwargs_are_geometry_only(source: Path) -> None:
    run = source / "runs" / "source"
    config = json.loads((run / "config.json").read_text())
    assert resolve_weight_file(run).config == config  # what vittune writes passes
    folder = source / "tampered"
    shutil.copytree(run, folder)
    for bad in (
        {"model_kwargs": {"checkpoint_path": "/tmp/other.pth"}},
        {"model_kwargs": {"pretrained_cfg_overlay": {"file": "/tmp/other.pth"}}},
        {"model_kwargs": {"global_pool": "../../other.pth"}},
        {"model_kwargs": {"depth": 2, "embed_dim": "64; rm"}},
        {"loader": "pickle"},
    ):
        (folder / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(WeightsError) as caught:
            resolve_weight_file(folder)
        assert "config.json" in str(caught.value) and "\n" not in str(caught.value)
    shutil.rmtree(folder)


def read_only(folder: Path, command: list[str]) -> list[str]:
    """`command` run where `folder` cannot be written: mode 0555 for a normal user; root
    ignores modes, so it gets a read-only bind mount in a private mount namespace."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return command
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(folder), *command]


def test_read_only_run_dir_is_one_line(tmp_path: Path, source: Path) -> None:
    locked = tmp_path / "locked"
    args = [VITTUNE, "finetune", str(source / "r.yaml"), *tiny(f"logging.run_dir={locked}")]
    result = subprocess.run(
        read_only(locked, args), cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    line = one_line_error(result)
    assert f"cannot create run folder {locked}/r-" in line
    assert "point logging.run_dir at a writable folder" in line
    assert not any(locked.iterdir())


def test_inherited_run_dir_never_overwrites_and_exports_are_0644(source: Path) -> None:
    existing = source / "runs" / "source"
    before = fingerprint(existing)
    # As if inherited from a shell or a harness, even inside a torchrun-like environment.
    env = cli_env(**{RUN_DIR_ENV: str(existing), "LOCAL_RANK": "0"}, **ONE_THREAD)
    args = [VITTUNE, "finetune", "r.yaml", *tiny("trainer.max_epochs=1", "logging.name=source")]
    result = subprocess.run(args, cwd=source, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert fingerprint(existing) == before  # not a byte changed
    assert folders(source) == ["source", "source-2"]
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((source / "runs" / "source-2" / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))
    shutil.rmtree(source / "runs" / "source-2")


def test_same_name_at_once_gets_distinct_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv(RUN_DIR_PARENT_ENV, raising=False)
    with ThreadPoolExecutor(8) as pool:
        made = list(
            pool.map(lambda _: prepare_run_dir("same", str(tmp_path), "r", False), range(8))
        )
    assert all(f.created for f in made)
    assert sorted(f.path.name for f in made) == sorted(
        ["same", *(f"same-{k}" for k in range(2, 9))]
    )


def test_corrupt_image_mid_training_names_the_kept_folder(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data" / "train", {"a": 8, "b": 8}, size=32)
    make_class_images(tmp_path / "data" / "val", {"a": 2, "b": 2}, size=32)
    (tmp_path / "data" / "val" / "a" / "0000.png").write_bytes(b"not a png")
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    overrides = tiny("data.on_corrupt=error", "data.batch_size=4", "logging.name=corrupt")
    result = run_cli("finetune", str(recipe), *overrides, cwd=tmp_path, env=ONE_THREAD)
    # Lightning's own info lines may come first; the error is the last line, no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("vittune: error: cannot decode image") and "0000.png" in line
    assert line.endswith("(run folder runs/corrupt kept: it holds checkpoints/last.ckpt)")
    last = torch.load(
        tmp_path / "runs" / "corrupt" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert last["global_step"] == 4  # the epoch trained before validation met the file
