"""A finished run, loaded back for `evaluate` and `predict`: its recipe, weights and classes.

The model is built through `assembly.build` from the run's own resolved recipe, so scoring
and prediction use exactly the architecture and preprocessing (size, channels, intensity
scaling, mean/std) that training used; only the weights come from the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vittune.data.datasets import Sample, SplitSamples
from vittune.errors import DataError, RecipeError
from vittune.inference.run_check import require_run_folder
from vittune.models.adapters.loading import recipe_for_weights
from vittune.models.run_config import read_run_config
from vittune.models.weights import read_state_dict
from vittune.recipe.load import load_recipe
from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import Assembly, build

WEIGHT_CHOICES = ("best", "last")


@dataclass
class TrainedRun:
    folder: Path
    recipe: Recipe
    classes: list[str]
    weights: Path
    load_after_build: bool = False  # weights that keep their adapters (models/adapters/loading)

    @property
    def multi_label(self) -> bool:
        return self.recipe.data.multi_label


def _run_classes(folder: Path) -> list[str]:
    """The class names the run's head predicts, in head order (from its checked config.json)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"{config_file} is missing; the run did not finish its export")
    classes = read_run_config(config_file).classes
    if not classes:
        raise RecipeError(f"{config_file} names no classes; is this a classification run?")
    return list(classes)


def _weights_file(folder: Path, weights: str, command: str) -> Path:
    if weights == "best":
        path = folder / "model.safetensors"
    elif weights == "last":
        path = folder / "checkpoints" / "last.ckpt"
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise RecipeError(f"weights {path} not found; {_weights_hint(folder, path, command)}")
    return path


def _weights_hint(folder: Path, missing: Path, command: str) -> str:
    """Name the weights the folder does hold, never the option that just failed."""
    last = folder / "checkpoints" / "last.ckpt"
    if not (folder / "config.json").is_file() and last.is_file():
        # stopped before its export: the classes (config.json) are written with it
        return (
            f"the run stopped before its export, and {last} holds its last step; finish it with"
            f" `vittune {command} {folder / 'recipe.yaml'} trainer.resume_from=auto"
            f" logging.run_dir={folder.parent} logging.name={folder.name}`"
        )
    held = {
        "best": folder / "model.safetensors",
        "last": folder / "checkpoints" / "last.ckpt",
    }
    there = [
        f"--weights {name} ({path})"
        for name, path in held.items()
        if path != missing and path.is_file()
    ]
    if there:
        return "this run holds " + ", ".join(there) + "; use that, or --weights FILE"
    return "this run holds no weights yet (it has no export and no last.ckpt); give --weights FILE"


def load_trained_run(
    folder: str | Path, overrides: list[str] | None = None, weights: str = "best"
) -> TrainedRun:
    """Read a run folder (`recipe.yaml`, `config.json`, weights); overrides apply to its recipe."""
    folder = require_run_folder(folder)
    recipe = load_recipe(folder / "recipe.yaml", overrides or [], command=None)
    if (recipe.task or "finetune") == "pretrain-mae" or recipe.mae is not None:
        raise RecipeError(
            f"{folder} is an MAE pretraining run: it has no classifier; fine-tune it first"
            f" (model.pretrained: {folder})"
        )
    path = _weights_file(folder, weights, recipe.task or "finetune")
    model = recipe.model.model_copy(update={"pretrained": str(path), "keep_head": True})
    # `task` goes: a distilled student is scored as the classifier it is (its two heads
    # averaged, which is what timm's distilled DeiT returns in eval mode). Class weights go
    # too: they weigh the training loss only (scoring uses the unweighted loss), and
    # `balanced` would count a train split that inference neither has nor needs.
    loss = recipe.loss.model_copy(update={"class_weights": "none"})
    recipe = recipe.model_copy(update={"model": model, "task": None, "distill": None, "loss": loss})
    classes = _run_classes(folder)  # config.json is there and checked
    config = json.loads((folder / "config.json").read_text())
    recipe, after = recipe_for_weights(recipe, path, config)
    return TrainedRun(folder, recipe, classes, path, after)


def align_to_run(found: SplitSamples, run_classes: list[str]) -> SplitSamples:
    """Re-index the data's labels into the run's class order; unknown class names are an error.

    A folder of images to score may hold only some of the classes (its class list is read
    from its sub-folders), so labels are matched by name, never by position.
    """
    unknown = sorted(set(found.classes) - set(run_classes))
    if unknown:
        raise DataError(
            f"the data has classes {unknown[:8]} that the run never learned (it knows"
            f" {run_classes[:8]}{'...' if len(run_classes) > 8 else ''}); score data with the run's classes"
        )
    index = [run_classes.index(name) for name in found.classes]
    aligned = SplitSamples(classes=list(run_classes), refused=found.refused)
    for split, samples in found.splits.items():
        aligned.splits[split] = [
            Sample(s.path, tuple(index[label] for label in s.labels), s.group) for s in samples
        ]
    return aligned


def build_trained(run: TrainedRun, found: SplitSamples | None = None) -> Assembly:
    """The run's classifier with its trained head, and a data module over `found`."""
    stand_in = SplitSamples.classes_only(run.classes)
    assembly = build(run.recipe, "finetune", found=found or stand_in)
    if run.load_after_build:
        assembly.task.model.load_state_dict(read_state_dict(run.weights), strict=True)
    if assembly.report.reinitialised:
        raise RecipeError(
            f"{run.weights} holds no trained head for the run's {len(run.classes)} classes"
            f" ({', '.join(assembly.report.reinitialised)}); point --weights at this run's weights"
        )
    assembly.task.eval()
    return assembly
