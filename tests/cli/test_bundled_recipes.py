"""Every recipe in recipes/, as shipped, through training, the test report, evaluate and export.

Only the model is made tiny (and the epochs few); the data is one generated folder with
train/val/test splits, shared by all recipes. Chained recipes (the DeiT students, the MAE
fine-tune) take the run folder of the recipe before them, as their comments say. Training,
evaluate and export run in this process (the code paths the CLI calls); the medical recipe,
whose crash this module was written for, also runs through the `vittune` console script.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, make_class_images, run_cli
from helpers import ONE_THREAD, RECIPES, ROOT
from wandb_log import wandb_records

from vittune.errors import RecipeError
from vittune.inference.evaluate import evaluate_run
from vittune.recipe.load import load_recipe
from vittune.training.noise import ignore_known_noise
from vittune.training.run import fit

pytestmark = pytest.mark.slow

TEST_IMAGES = {"a": 6, "b": 4, "c": 6}
TINY_MAE_DECODER = ("mae.decoder_depth=1", "mae.decoder_dim=32", "mae.decoder_heads=2")
BUDGET = ("trainer.max_epochs=1",)
LIGHTNING_NOTES = ("in eval mode at the start", "smaller than the logging interval")

# What each recipe needs beyond the shared tiny overrides: the run it builds on, and model
# settings that replace its own (a distilled DeiT stays a distilled DeiT; the CNN teacher is
# timm's 0.37M-parameter test_resnet already, so only its name is kept).
KEEP_MODEL = ("model.name", "model.kwargs", "model.img_size", "model.patch_size")
NEEDS: dict[str, dict] = {
    "quickstart": {},
    "lora": {"after": "quickstart", "as": "model.pretrained"},
    "medical": {},
    "mae": {"extra": TINY_MAE_DECODER},
    "mae_digits_pretrain": {"extra": TINY_MAE_DECODER},
    "mae_digits_finetune": {"after": "mae_digits_pretrain", "as": "model.pretrained"},
    "digits_teacher_cnn": {"keep": KEEP_MODEL},
    "digits_deit": {"after": "digits_teacher_cnn", "as": "distill.teacher.pretrained"},
    "deit": {
        "after": "digits_teacher_cnn",
        "as": "distill.teacher.pretrained",
        "extra": ("distill.teacher.name=test_resnet",),
    },
}


def test_every_bundled_recipe_is_covered() -> None:
    """A new recipe in recipes/ must be added here, so it runs through the suite too."""
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(NEEDS)


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (one rarer, so balanced class weights differ from 1) in train/val/test."""
    root = tmp_path_factory.mktemp("bundled-data")
    for seed, (split, scale) in enumerate({"train": 3, "val": 1, "test": 1}.items()):
        make_class_images(root / split, {k: v * scale for k, v in TEST_IMAGES.items()}, seed=seed)
    return root


def overrides_for(name: str, data: Path, runs: Path, earlier: Path | None) -> list[str]:
    need = NEEDS[name]
    drop = set(need.get("keep", ())) | ({"model.name"} if "deit" in name else set())
    if need.get("as") == "model.pretrained":
        drop.add("model.pretrained")
    shared = [o for o in [*TINY_OVERRIDES] if o.split("=", 1)[0] not in drop]
    chained = [f"{need['as']}={earlier}"] if earlier is not None else []
    return [
        *shared,
        *need.get("extra", ()),
        *chained,
        *BUDGET,
        "data.builtin=null",
        f"data.root={data}",
        f"logging.run_dir={runs}",
        f"logging.name={name}",
    ]


@pytest.fixture(scope="session")
def trained(
    split_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, list[str]]]:
    """Train a bundled recipe once per session (and first the run it builds on); its run
    folder and the lines it logged."""
    runs = tmp_path_factory.mktemp("bundled-runs")
    done: dict[str, tuple[Path, list[str]]] = {}

    def train(name: str) -> tuple[Path, list[str]]:
        if name not in done:
            after = NEEDS[name].get("after")
            earlier = train(after)[0] if after else None
            path = RECIPES / f"{name}.yaml"
            recipe = load_recipe(path, overrides_for(name, split_folder, runs, earlier), None)
            command = recipe.task or "finetune"
            lines: list[str] = []
            with warnings.catch_warnings(record=True) as caught:  # as the CLI filters them
                warnings.simplefilter("always")
                ignore_known_noise()
                run_dir = fit(recipe, command, path, log=lines.append).run_dir
            lines += [f"warning: {w.message}" for w in caught]
            done[name] = run_dir, lines
        return done[name]

    return train


def documented_metrics(doc: str, start: str, end: str) -> set[str]:
    """The metric names (`train/...`, `val/...`) a doc page lists between two phrases."""
    text = (ROOT / "docs" / doc).read_text()
    passage = text.split(start, 1)[1].split(end, 1)[0]
    return set(re.findall(r"`((?:train|val)/\w+)`", passage))


def logged_metrics(run_dir: Path) -> set[str]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return set(next(csv.reader(handle)))


def check_classifier_run(run_dir: Path) -> None:
    """The test report was written, and `evaluate` and `export` work on the run."""
    from vittune.deploy.pipeline import export_run

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"test/acc1", "test/loss"}, metrics
    report = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    assert report["num_samples"] == sum(TEST_IMAGES.values())
    assert set(report["roc"]) == set(TEST_IMAGES)  # one-vs-rest curves of the 3 classes
    assert (run_dir / "eval" / "test" / "roc.png").is_file()
    # evaluate scores the test split again with the exported weights: the same top-1
    scored = evaluate_run(run_dir, device="cpu")
    assert scored.split == "test" and scored.report.num_samples == sum(TEST_IMAGES.values())
    np.testing.assert_allclose(
        scored.report.overall["acc1"], metrics["test"]["test/acc1"], atol=1e-6
    )
    exported = export_run(run_dir, "onnx", check_limit=8, latency_repeats=1)
    assert exported.path.is_file() and exported.variants[1].check.max_abs_diff < 1e-4


def check_wandb_records(run_dir: Path, printed_lr: str) -> None:
    """What the offline W&B run recorded, read from its transaction log (wandb's protobufs)."""
    records = wandb_records(run_dir)
    kinds = {kind: [r for r in records if r.WhichOneof("record_type") == kind] for kind in
             ("config", "history", "artifact", "summary")}  # fmt: skip
    config = {item.key for r in kinds["config"] for item in r.config.update}
    assert {"model", "data", "optim", "loss"} <= config and "recipe" not in config, config
    logged = {
        item.key or "/".join(item.nested_key) for r in kinds["history"] for item in r.history.item
    }
    for name in ("confusion_matrix", "reliability", "roc", "mistakes"):
        assert f"test/{name}/_type" in logged or f"test/{name}" in logged, logged
    per_class = [
        json.loads(item.value_json)
        for r in kinds["history"]
        for item in r.history.item
        if (item.key or "/".join(item.nested_key)) in ("test/per_class", "test/per_class/_type")
    ]
    assert per_class and "table-file" in json.dumps(per_class)
    (model,) = [r.artifact for r in kinds["artifact"] if r.artifact.type == "model"]
    assert model.name == "medical-model" and set(model.aliases) >= {"best", "latest"}
    files = {entry.path for entry in model.manifest.contents}
    assert {"model.safetensors", "config.json", "README.md", "recipe.yaml"} <= files
    epochs = [
        json.loads(item.value_json)
        for r in kinds["summary"]
        for item in r.summary.update
        if item.key == "epoch"
    ]
    assert epochs[-1] == 0  # one epoch, index 0: the last one trained, not one past it
    lrs = [
        json.loads(i.value_json)
        for r in kinds["summary"]
        for i in r.summary.update
        if i.key == "lr"
    ]
    assert lrs and f"{lrs[-1]:.1e}" == printed_lr  # the console's number


@pytest.mark.parametrize("name", [n for n in NEEDS if n != "medical"])
def test_bundled_recipe_trains_reports_evaluates_exports(
    name: str, trained: Callable[[str], tuple[Path, list[str]]]
) -> None:
    run_dir, lines = trained(name)
    log = "\n".join(lines)
    for note in LIGHTNING_NOTES:  # what Lightning says that a vittune user cannot act on
        assert note not in log, log
    if load_recipe(run_dir / "recipe.yaml", command=None).task == "pretrain-mae":
        # no classifier: the encoder is the product, and evaluate says why it cannot score
        assert (run_dir / "encoder.safetensors").is_file()
        assert "  data: unlabelled, images per split {" in log, log
        names = documented_metrics("mae.md", "| `csv/metrics.csv` |", "\n") - {"train/loss_step"}
        assert names and names <= logged_metrics(run_dir), names - logged_metrics(run_dir)
        with pytest.raises(RecipeError, match="MAE pretraining run"):
            evaluate_run(run_dir, device="cpu")
        return
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = "best" if metrics["best_checkpoint"] else "last; no best checkpoint"
    assert f"  test ({weights} weights): test/acc1 " in log, log
    if name == "quickstart":  # the metric names docs/recipes.md lists are the logged ones
        names = documented_metrics("recipes.md", "Metrics logged by fine-tuning:", "and `val/acc5`")
        names.discard("train/loss_step")  # every log_every_n_steps (10) steps: 1 step here
        assert len(names) >= 6 and names <= logged_metrics(run_dir), names - logged_metrics(run_dir)
    check_classifier_run(run_dir)


def test_medical_recipe_end_to_end_through_the_cli(split_folder: Path, tmp_path: Path) -> None:
    """The shipped medical recipe (balanced class weights) through finetune, evaluate, export:
    it ended every run with a test split in `KeyError: 'train'` before. W&B logs offline, and
    its records hold the recipe as sections, the test report and the model artifact."""
    overrides = overrides_for("medical", split_folder, tmp_path / "runs", None)
    overrides[overrides.index("logging.wandb=false")] = "logging.wandb=true"
    as_a_user = {**ONE_THREAD, "PYTHONWARNINGS": ""}  # warnings shown, as a user gets them
    trained = run_cli(
        "finetune", str(RECIPES / "medical.yaml"), *overrides, cwd=tmp_path, env=as_a_user
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "site-packages" not in trained.stderr, trained.stderr  # no library's warning
    (epoch_line,) = [line for line in trained.stdout.splitlines() if line.startswith("epoch ")]
    check_wandb_records(tmp_path / "runs" / "medical", epoch_line.split("  lr ")[1].split()[0])
    run_dir = tmp_path / "runs" / "medical"
    assert "test report: " in trained.stdout and (run_dir / "eval" / "test").is_dir()
    evaluated = run_cli("evaluate", str(run_dir), "--weights", "last", cwd=tmp_path, env=ONE_THREAD)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "on the test split: 16 images" in evaluated.stdout
    exported = run_cli("export", str(run_dir), "--check-images", "8", cwd=tmp_path, env=ONE_THREAD)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (run_dir / "export" / "model.onnx").is_file()
