"""Every user mistake in issue 2's list: one line on stderr saying what and how, exit code 2.

Recipe mistakes are caught before anything heavy is imported; data mistakes after the run
starts. The first case of each kind runs the real console script in a subprocess; the other
cases of the same path run the same typer app in this process (`run_in_process`), which
saves a Python start-up and the Lightning imports per case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_class_images, run_cli
from helpers import run_in_process, tiny, write_recipe


def one_line_error(result) -> str:
    """The run failed as a user error: exit 2, a single `vittune: error:` line, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vittune: error: ")
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_class_images(tmp_path / "data", {"a": 4, "b": 4}, size=8)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=0.1"], "unknown recipe key `optim.lrr`; did you mean `optim.lr`?"),
        (["trainr.max_epochs=1"], "unknown recipe key `trainr`; did you mean `trainer`?"),
        (["optim.lr=fast"], "recipe key `optim.lr`: Input should be a valid number"),
        (["trainer.max_epochs=[1]"], "recipe key `trainer.max_epochs`"),
        (["model.img_size=36", "model.patch_size=8"], "not divisible by model.patch_size 8"),
        (["optim"], "not of the form section.key=value"),
        (["logging.name=../escaped"], "`logging.name`: Value error, holds a path separator"),
        (["logging.name=.."], "`logging.name`: Value error, is not a folder name"),
    ],
)
def test_recipe_mistakes(tmp_path: Path, folder: Path, overrides: list[str], expected: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(folder)}})
    run = run_cli if overrides == ["optim.lrr=0.1"] else run_in_process
    line = one_line_error(run("finetune", str(recipe), *tiny(*overrides), cwd=tmp_path))
    assert expected in line
    assert not (tmp_path / "runs").exists()  # nothing was started
    assert not (tmp_path / "escaped").exists()


def test_python_object_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    line = one_line_error(run_in_process("finetune", str(recipe), cwd=tmp_path))
    assert "not valid YAML" in line and "python/object/apply:os.mkdir" in line
    assert not marker.exists()


def test_missing_recipe_file(tmp_path: Path) -> None:
    line = one_line_error(run_cli("finetune", "nowhere.yaml", cwd=tmp_path))
    assert "recipe file not found: nowhere.yaml" in line


def test_image_size_not_divisible_by_the_models_own_patch(tmp_path: Path, folder: Path) -> None:
    # No model.patch_size: the size is checked against the backbone's patch (16 here).
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(folder)}})
    overrides = tiny("model.img_size=40", drop=("model.patch_size",))
    line = one_line_error(run_in_process("finetune", str(recipe), *overrides, cwd=tmp_path))
    assert "model.img_size (40, 40) is not divisible by the patch size (16, 16)" in line


def bad_data(tmp_path: Path, case: str) -> str:
    """The data override for one mistake (a missing folder, an empty class, CSV rows that
    point nowhere)."""
    if case == "missing_root":
        return "data.root=does/not/exist"
    if case == "empty_class":
        root = make_class_images(tmp_path / "data", {"a": 3, "b": 3}, size=8)
        (root / "c").mkdir()
        return f"data.root={root}"
    make_class_images(tmp_path / "img", {"a": 3, "b": 3}, size=8)
    rows = [f"img/{c}/000{k}.png,{c},train" for c in "ab" for k in range(2)]
    rows.append("img/a/0009.png,a,val" if case == "csv_missing_image" else "img/b/0002.png,c,val")
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(["path,label,split", *rows]) + "\n")
    return f"data.csv={path}"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "missing_root",
            "data.root does/not/exist does not exist or is not a folder; fix the path",
        ),
        ("empty_class", "has no images"),
        ("csv_missing_image", "line 6: image 'img/a/0009.png' not found"),
        ("csv_unseen_label", "labels ['c'] in split 'val' never appear in train"),
    ],
)
def test_data_mistakes(tmp_path: Path, case: str, expected: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", {"logging": {"name": "bad"}})
    run = run_cli if case == "missing_root" else run_in_process
    result = run("finetune", str(recipe), *tiny(bad_data(tmp_path, case)), cwd=tmp_path)
    assert expected in one_line_error(result)
