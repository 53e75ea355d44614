"""What a finished run sends to W&B beyond its metrics: the recipe as config sections, the
test report (figures and the per-class table) and the exported model as a versioned artifact.

Everything here is a no-op without a W&B logger; wandb is imported only when one exists.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

# the files of the `model` artifact, as `vittune export`'s run folder lays them out
ARTIFACT_FILES = ("config.json", "README.md", "recipe.yaml", "metrics.json")
REPORT_FIGURES = ("confusion_matrix", "reliability", "roc", "mistakes")


class SectionedWandbLogger(WandbLogger):
    """Lightning's W&B logger, with the recipe as W&B config sections (`model.name`,
    `optim.lr`, ...) instead of one nested `recipe` key: W&B's run table, filters and sweeps
    work on sections. The checkpoint's hyperparameters keep their `recipe` key (resume reads it).
    """

    def log_hyperparams(self, params: Any) -> None:
        params = dict(params) if isinstance(params, dict) else params
        if isinstance(params, dict) and isinstance(params.get("recipe"), dict):
            params = {**{k: v for k, v in params.items() if k != "recipe"}, **params["recipe"]}
        super().log_hyperparams(params)


def wandb_runs(loggers: list[Logger]) -> list[Any]:
    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def artifact_name(run_dir: Path) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^\w.-]", "-", f"{run_dir.name}-model")


def log_test_report(loggers: list[Logger], folder: Path) -> None:
    """The figures of `eval/test/` as images and `per_class.csv` as a table, under `test/`."""
    runs = wandb_runs(loggers)
    if not runs or not folder.is_dir():
        return
    import wandb  # noqa: PLC0415

    logged: dict[str, Any] = {
        f"test/{name}": wandb.Image(str(folder / f"{name}.png"))
        for name in REPORT_FIGURES
        if (folder / f"{name}.png").is_file()
    }
    table_file = folder / "per_class.csv"
    if table_file.is_file():
        with open(table_file, newline="") as handle:
            header, *rows = list(csv.reader(handle))
        logged["test/per_class"] = wandb.Table(columns=header, data=rows)
    for run in runs:
        run.log(logged)


def log_model_artifact(loggers: list[Logger], run_dir: Path, export: Path, best: bool) -> None:
    """The export, its config and card, recipe and metrics as one `model` artifact; aliased
    `best` when the export holds the best checkpoint's weights (W&B adds `latest` itself)."""
    runs = wandb_runs(loggers)
    if not runs:
        return
    import wandb  # noqa: PLC0415

    artifact = wandb.Artifact(artifact_name(run_dir), type="model")
    for path in (export, *(run_dir / name for name in ARTIFACT_FILES)):
        if path.is_file():
            artifact.add_file(str(path), name=path.name)
    for run in runs:
        run.log_artifact(artifact, aliases=["best"] if best else [])
