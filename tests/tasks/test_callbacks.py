"""GradualUnfreeze across a resume: the optimiser state must land on the parameters it
belongs to, so a run stopped after an unfreeze and resumed ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_class_images
from helpers import tiny, write_recipe

from vittune.recipe.load import load_recipe
from vittune.training.run import fit

# Full-batch epochs without augmentation or dropout make both runs see the same numbers in the
# same order; only the resume differs. A mis-mapped Adam state moves weights by ~lr per step.
DETERMINISTIC = (
    "data.batch_size=32",
    "augment.preset=none",
    "model.drop_path_rate=0.0",
    "schedule.name=constant",
    "optim.lr=1e-3",
    "freeze.frozen_blocks=1",
    "freeze.unfreeze_schedule={1: 0}",
)


def train(root: Path, recipe_path: Path, *overrides: str) -> Path:
    recipe = load_recipe(
        recipe_path,
        [*tiny(*DETERMINISTIC), f"logging.run_dir={root / 'runs'}", *overrides],
        command="finetune",
    )
    return fit(recipe, "finetune", root, log=lambda _: None).run_dir


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_resume_after_an_unfreeze_continues_as_the_uninterrupted_run(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    recipe_path = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.25}}
    )
    straight = train(tmp_path, recipe_path, "logging.name=straight", "trainer.max_epochs=3")
    # Stopped after epoch 1, whose start unfroze block 0 and added it to the optimiser...
    train(tmp_path, recipe_path, "logging.name=stopped", "trainer.max_epochs=2")
    # ...and resumed: the optimiser is rebuilt frozen as at epoch 0, then must be unfrozen
    # again before the saved state (which has block 0's moments) is loaded into it.
    resumed = train(
        tmp_path,
        recipe_path,
        "logging.name=stopped",
        "trainer.max_epochs=3",
        "trainer.resume_from=auto",
    )
    expected, got = final_state(straight), final_state(resumed)
    assert list(got) == list(expected)
    block0 = [k for k in expected if k.startswith("model.blocks.0.")]
    assert block0
    for key in expected:
        # Measured: within 1e-8, except the attention q/k bias (up to 2e-6): its true gradient
        # is zero, so Adam turns rounding noise into steps (see tests/tasks/test_compile.py).
        atol = 1e-5 if key.endswith("attn.qkv.bias") else 1e-7
        assert torch.allclose(got[key], expected[key], atol=atol), key
