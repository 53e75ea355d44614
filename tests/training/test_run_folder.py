"""Run folders and resumes: user mistakes are one line with exit 2 and leave nothing half-made;
an inherited VITTUNE_RUN_DIR never sends a run into an existing folder; config.json is
checked before its model_kwargs reach timm; exports are readable by all."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckpt_helpers import cli_env, fingerprint, one_line_error
from conftest import VITTUNE, make_class_images, run_cli
from helpers import ONE_THREAD, tiny, write_recipe

from vittune.errors import RecipeError, WeightsError
from vittune.models.weights import resolve_weight_file
from vittune.recipe.load import load_recipe
from vittune.tasks.assembly import build
from vittune.training.resume import check_model_fits, read_resume_point, resolve_resume
from vittune.training.run_folder import RUN_DIR_ENV, RUN_DIR_PARENT_ENV, prepare_run_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a finished one-epoch run, `runs/source`, started with an inherited
    VITTUNE_RUN_DIR that points at an earlier run, `runs/earlier`."""
    work = tmp_path_factory.mktemp("work")
    make_class_images(work / "data", {"a": 8, "b": 8}, size=32)
    write_recipe(work / "r.yaml", {"data": {"root": str(work / "data"), "batch_size": 4}})
    earlier = work / "runs" / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (earlier / "recipe.yaml").write_text("an earlier run's recipe\n")
    # As if inherited from a shell or a harness, even inside a torchrun-like environment.
    env = cli_env(**{RUN_DIR_ENV: str(earlier), "LOCAL_RANK": "0"}, **ONE_THREAD)
    args = [VITTUNE, "finetune", "r.yaml", *tiny("trainer.max_epochs=1", "logging.name=source")]
    result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return work


def folders(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "runs").iterdir())


def recipe_args(last: Path, *extra: str) -> list[str]:
    return tiny(f"trainer.resume_from={last}", *extra)


def test_resume_from_a_text_file_is_one_line_and_leaves_no_folder(source: Path) -> None:
    (source / "notes.txt").write_text("not a checkpoint\n")
    before = fingerprint(source / "runs")
    result = run_cli(
        "finetune",
        "r.yaml",
        *tiny("trainer.max_epochs=2", "trainer.resume_from=notes.txt", "logging.name=resumed"),
        cwd=source,
    )
    assert "trainer.resume_from notes.txt is not a checkpoint (not a torch file)" in one_line_error(
        result
    )
    assert fingerprint(source / "runs") == before  # nothing made, nothing changed


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.kwargs={embed_dim: 64, depth: 1, num_heads: 2}"],
            "differs from the checkpoint's in model.kwargs.depth, which a resume cannot change",
        ),
        (
            ["optim.name=sgd", "optim.lr=0.1"],
            "differs from the checkpoint's in optim.lr, optim.name, which a resume cannot change",
        ),
        (["schedule.name=linear", "data.batch_size=2"], "in data.batch_size, schedule.name,"),
    ],
)
def test_resume_refuses_recipe_changes_it_cannot_apply(
    source: Path, overrides: list[str], expected: str
) -> None:
    last = source / "runs" / "source" / "checkpoints" / "last.ckpt"
    allowed = ["trainer.max_epochs=5", "data.num_workers=1", "logging.name=other"]
    recipe = load_recipe(source / "r.yaml", recipe_args(last, *allowed))
    assert resolve_resume(recipe).global_step == 3  # what a resume may change is taken
    with pytest.raises(RecipeError) as caught:
        resolve_resume(load_recipe(source / "r.yaml", recipe_args(last, *allowed, *overrides)))
    assert expected in str(caught.value)


def test_resume_on_data_with_other_classes_is_refused(source: Path, tmp_path: Path) -> None:
    make_class_images(tmp_path / "three", {"a": 4, "b": 4, "c": 4}, size=32)
    last = source / "runs" / "source" / "checkpoints" / "last.ckpt"
    recipe = load_recipe(source / "r.yaml", recipe_args(last, f"data.root={tmp_path / 'three'}"))
    point = resolve_resume(recipe)  # data.root may change ...
    task = build(recipe, "finetune").task
    with pytest.raises(RecipeError) as caught:
        check_model_fits(point, task)  # ... but not into other classes
    assert (
        "holds another model than this recipe builds (model.head.weight (2, 64) vs (3, 64)"
        in str(caught.value)
    )


def test_a_torch_file_without_training_state_is_not_resumable(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(RecipeError, match="is not a vittune training checkpoint"):
        read_resume_point(tmp_path / "weights.pt")


def test_broken_config_json_in_a_weights_folder_is_one_line(source: Path) -> None:
    broken = source / "runs" / "broken"
    shutil.copytree(source / "runs" / "source", broken)
    (broken / "config.json").write_text('{"architecture": "vit_tiny_patch16_224",')
    result = run_cli(
        "finetune", "r.yaml", *tiny(f"model.pretrained={broken}", "logging.name=t"), cwd=source
    )
    assert f"{broken / 'config.json'} is not valid JSON" in one_line_error(result)
    shutil.rmtree(broken)
    assert folders(source) == ["earlier", "source"]  # the new run's folder was removed


def test_config_json_kwargs_are_geometry_only(source: Path) -> None:
    run = source / "runs" / "source"
    config = json.loads((run / "config.json").read_text())
    saved = resolve_weight_file(run).config  # what vittune writes passes
    assert saved.architecture == config["architecture"] and saved.classes == config["label_names"]
    folder = source / "tampered"
    shutil.copytree(run, folder)
    for bad in (
        {"model_args": {"checkpoint_path": "/tmp/other.pth"}},
        {"model_args": {"pretrained_cfg_overlay": {"file": "/tmp/other.pth"}}},
        {"model_args": {"global_pool": "../../other.pth"}},
        {"model_args": {"depth": 2, "embed_dim": "64; rm"}},
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
    earlier = source / "runs" / "earlier"
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"
    assert (earlier / "recipe.yaml").read_text() == "an earlier run's recipe\n"
    assert sorted(p.name for p in earlier.rglob("*")) == ["checkpoints", "last.ckpt", "recipe.yaml"]
    run = source / "runs" / "source"  # the run went to its own folder instead
    assert (run / "checkpoints" / "last.ckpt").is_file()
    for name in ("model.safetensors", "config.json", "README.md"):
        mode = stat.S_IMODE((run / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


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
    # Header intact, pixels cut: only decoding finds it, mid-run (a non-image is refused at setup).
    broken = tmp_path / "data" / "val" / "a" / "0000.png"
    broken.write_bytes(broken.read_bytes()[:-40])
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
