"""What a training run prints says what happened, without Lightning's notes a user cannot act on."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from conftest import make_class_images
from helpers import RECIPES, tiny

from vittune.recipe.load import load_recipe
from vittune.training.noise import KNOWN_NOISE
from vittune.training.run import fit

QUICKSTART = RECIPES / "quickstart.yaml"
# Lightning's notes in these runs (issue 17), each something vittune handles itself
NOTES = (
    "is smaller than the logging interval",  # 2 batches per epoch, log_every_n_steps 10
    "exists and is not empty",  # resuming in the run's own folder
    "could not find the monitored key",  # trainer.max_steps ends before any validation
)


def fit_recording(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The lines a run logs and every Python warning it raises (none filtered)."""
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(load_recipe(QUICKSTART, overrides), "finetune", QUICKSTART, lines.append)
    return lines, [str(w.message) for w in caught]


def silenced(message: str) -> bool:
    """Whether the CLI's warning filters drop `message` (as `warnings` matches them)."""
    return any(re.compile(pattern, re.I).match(message) for pattern, _ in KNOWN_NOISE)


def test_a_resumed_run_says_its_weights_and_lightnings_notes_are_dropped(tmp_path: Path) -> None:
    make_class_images(tmp_path / "data", {"a": 10, "b": 10})
    common = tiny(
        "data.builtin=null",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=8",
        f"logging.run_dir={tmp_path / 'runs'}",
        "logging.name=resumed",
        "trainer.resume_from=auto",
    )
    first, raised = fit_recording([*common, "trainer.max_steps=1"])  # stops before validating
    assert "  weights: random init" in first
    assert "  test" not in "".join(first)  # no test split here
    again, raised_again = fit_recording([*common, "trainer.max_epochs=2"])
    resumed = [line for line in again if line.startswith("  resuming ")]
    assert len(resumed) == 1 and resumed[0].endswith("weights, optimiser and schedule from it")
    assert not any(line.startswith("  weights: ") for line in again), again
    for note in NOTES:
        shown = [m for m in raised + raised_again if note in m]
        assert shown, (
            f"Lightning no longer says {note!r}: drop its filter from vittune/training/noise.py"
        )
        assert all(silenced(m) for m in shown), shown
