"""The garbage collector is held off while a command imports torch, timm and Lightning, and
on again, with the imported objects frozen, before the work starts (training/collector.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import lightning  # noqa: F401  (imported, as in every command that has started its work)
import pytest
from conftest import make_class_images
from helpers import run_fresh_python, tiny, write_recipe

from vittune.training import collector


def test_nothing_changes_once_lightning_is_imported() -> None:
    # a second command in one process, or this test session: freezing now would keep for
    # good whatever garbage exists, and the imports are done
    frozen = gc.get_freeze_count()
    with collector.paused():
        assert gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


WINDOW = """
import gc, json, sys
from vittune.training import collector
out = {}
collector.pause()
out["off while paused"] = not gc.isenabled()
import torch, timm, lightning
alive = len(gc.get_objects())
collector.resume()
out["on after"] = gc.isenabled()
out["frozen covers the imports"] = gc.get_freeze_count() >= alive
collector.resume()  # a second resume changes nothing
out["frozen once"] = gc.get_freeze_count()
try:
    with collector.paused():  # Lightning is imported now: no pause
        out["paused again"] = not gc.isenabled()
        raise KeyError("x")
except KeyError:
    pass
out["on after the error"] = gc.isenabled()
print(json.dumps(out))
"""


def test_pause_holds_collection_off_until_resume_which_freezes_the_imports(
    tmp_path: Path,
) -> None:
    out = run_fresh_python(WINDOW, cwd=tmp_path)
    assert out["off while paused"] and out["on after"] and out["frozen covers the imports"]
    assert out["frozen once"] > 0 and not out["paused again"] and out["on after the error"]


def test_a_caller_that_turned_collection_off_keeps_it_off(tmp_path: Path) -> None:
    code = (
        "import gc, json; from vittune.training import collector; gc.disable();"
        " collector.pause(); import lightning; collector.resume();"
        " print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))"
    )
    assert run_fresh_python(code, cwd=tmp_path) == [False, 0]


# `vittune finetune` as the console script runs it, with every collection recorded: whether
# torch was imported by then, and whether the imports had been frozen.
CLI = """
import gc, json, sys
seen = []
def record(phase, info):
    if phase == "start":
        seen.append(["torch" in sys.modules, gc.get_freeze_count() > 0])
gc.callbacks.append(record)
from vittune.cli import main
sys.argv = ["vittune", "finetune", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    assert not stop.code, stop.code
gc.callbacks.remove(record)
print(json.dumps({"collections": seen, "on at the end": gc.isenabled()}))
"""


@pytest.mark.parametrize("print_recipe", [False, True], ids=["run", "print-recipe"])
def test_finetune_collects_nothing_while_importing_and_collects_while_training(
    tmp_path: Path, print_recipe: bool
) -> None:
    make_class_images(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    args = [str(recipe), *tiny("trainer.max_epochs=1")]
    out = run_fresh_python(CLI, *args, *(["--print-recipe"] if print_recipe else []), cwd=tmp_path)
    collections = out["collections"]
    # between the pause (before torch comes in) and the resume, freezing: no collection
    assert not [c for c in collections if c[0] and not c[1]]
    assert out["on at the end"]
    if not print_recipe:
        assert (tmp_path / "runs").is_dir()
        after = [c for c in collections if c[1]]
        assert len(after) > 10  # training made garbage, and the collector took it
