"""Run tracking: a CSV log always, Weights & Biases when wanted, never waiting on the network."""

from __future__ import annotations

import csv
import netrc
import os
import socket
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from vittune.recipe.schema import LoggingConfig

WANDB_HOST = "api.wandb.ai"


def wandb_key_available() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def host_reachable(host: str = WANDB_HOST, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(cfg: LoggingConfig) -> tuple[str, str | None]:
    """(mode, reason): `WANDB_MODE` wins; otherwise online only with a key and a reachable host."""
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return env_mode, None
    if cfg.wandb_mode == "offline":
        return "offline", None
    if not wandb_key_available():
        return "offline", "no W&B API key found (run `wandb login` to log online)"
    if not host_reachable():
        return "offline", f"{WANDB_HOST} is not reachable"
    return "online", None


def build_loggers(
    cfg: LoggingConfig, run_dir: Path, run_name: str, wandb_id: str | None = None
) -> tuple[list[Logger], str | None]:
    """Loggers for the Trainer, and a message for the user about W&B (or None).

    `wandb_id` (kept in the run folder) makes a resumed run continue the same W&B run.
    """
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="csv")]
    if not cfg.wandb:
        return loggers, None
    mode, reason = resolve_wandb_mode(cfg)
    if mode == "disabled":
        return loggers, None
    loggers.append(
        WandbLogger(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            tags=cfg.tags,
            save_dir=str(run_dir),
            mode=mode,
            id=wandb_id,
            resume="allow" if wandb_id else None,
        )
    )
    if mode == "offline":
        why = f" ({reason})" if reason else ""
        return (
            loggers,
            f"W&B is logging offline{why}; sync later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
        )
    return loggers, None


def log_image(loggers: list[Logger], key: str, path: Path, step: int | None = None) -> None:
    """Send a saved PNG to every logger that takes images (W&B); the file stays in the run folder."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a metrics.csv already in the folder is continued, not deleted.

    A run resumed into its own folder (`trainer.resume_from: auto`) keeps the rows of the steps
    before the interruption; the new rows are appended under the same (sorted) header.
    """

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that writes through AppendingWriter."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
