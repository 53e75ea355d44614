"""The same shape for every command (positional overrides), and mistakes said at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_images
from helpers import write_recipe
from typer.testing import CliRunner

from vittune.cli import app
from vittune.errors import RecipeError
from vittune.inference.trained_run import load_trained_run

LIGHT = """
import sys
from vittune.cli import main
sys.argv = ["vittune", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    print("exit", stop.code, "torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", ["evaluate", "predict", "attention", "export"])
def test_a_missing_run_folder_is_said_before_the_heavy_imports(
    command: str, tmp_path: Path
) -> None:
    args = [command, "runs/typo"] + (["x.png"] if command in ("predict", "attention") else [])
    done = subprocess.run(
        [sys.executable, "-c", LIGHT, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.strip() == "exit 2 torch loaded: False", done.stdout + done.stderr
    assert done.stderr.strip().startswith("vittune: error: runs/typo does not exist;")


def test_prepare_data_takes_positional_overrides_like_every_command(tmp_path: Path) -> None:
    pytest.importorskip("litdata")
    make_class_images(tmp_path / "data", dict.fromkeys("ab", 3))
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": "elsewhere", "num_workers": 0}})
    runner = CliRunner()
    given = [str(recipe), str(tmp_path / "shards"), f"data.root={tmp_path / 'data'}"]
    ctrl_c = signal.getsignal(signal.SIGINT)
    result = runner.invoke(app, ["prepare-data", *given, "data.val_fraction=0.5"])
    assert result.exit_code == 0, result.output
    # litdata's own Ctrl-C handler (stop its workers, exit 0) is not left behind in-process
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    written = json.loads((tmp_path / "shards" / "vittune.json").read_text())
    assert written["splits"] == {"train": 2, "val": 4}  # 1 + 2 of 3 per class: 0.5 held out
    # --override keeps working, and the positional one wins (it comes later)
    again = [str(recipe), str(tmp_path / "again"), "--override", "data.root=nowhere"]
    result = runner.invoke(app, ["prepare-data", *again, f"data.root={tmp_path / 'data'}"])
    assert result.exit_code == 0, result.output


def test_missing_weights_name_what_the_run_holds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_recipe(run / "recipe.yaml", {"data": {"root": "data"}})
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    # stopped before the export: no config.json, no model.safetensors, a last.ckpt
    with pytest.raises(RecipeError) as caught:
        load_trained_run(run, weights="best")
    message = str(caught.value)
    assert "--weights best" not in message and str(run / "checkpoints" / "last.ckpt") in message
    assert f"trainer.resume_from=auto logging.run_dir={tmp_path} logging.name=run" in message
    # an exported run asked for last.ckpt it no longer has: the export is named
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "model.safetensors").write_bytes(b"")
    (run / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"this run holds --weights best \("):
        load_trained_run(run, weights="last")
