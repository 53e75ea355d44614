"""A run says where it is before the slow part of its start-up: the run folder line comes
before Lightning is imported, the images are scanned and the model is built (issue 17: the
first line came 10 s after the command on the digits folder; 2.5 s now, benchmarks/end_to_end.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_class_images
from helpers import run_fresh_python, tiny, write_recipe

# In a fresh interpreter, as the CLI runs it: what was imported when the first line came.
PROBE = """
import json, sys
from vittune.recipe.load import load_recipe
from vittune.training.run import fit
seen = []
def log(line):
    if not seen:
        # (not wandb: timm's own import brings it in, through timm.utils.summary)
        heavy = ("lightning", "torchmetrics", "matplotlib", "sklearn", "scipy")
        seen.append({"line": line, "imported": [m for m in heavy if m in sys.modules]})
recipe = load_recipe(sys.argv[1], sys.argv[2:], command="finetune")
fit(recipe, "finetune", sys.argv[1], log=log)
print(json.dumps(seen[0]))
"""


def test_the_run_folder_line_comes_before_lightning_and_the_data(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    overrides = tiny("trainer.max_epochs=1", "logging.name=first", "logging.wandb=true")
    first = run_fresh_python(PROBE, str(recipe), *overrides, cwd=tmp_path)
    assert first["line"] == f"vittune finetune: run folder {Path('runs') / 'first'}"
    assert first["imported"] == []  # none of them yet
    assert (tmp_path / "runs" / "first" / "model.safetensors").is_file()  # the run went on
