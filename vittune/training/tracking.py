"""Run tracking: a CSV log always, Weights & Biases when wanted, never waiting on the network."""

from __future__ import annotations

import csv
import gc
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from vittune.errors import RecipeError
from vittune.files import is_write_failure, needed_for, storage_error
from vittune.netprobe import PROBE_TIMEOUT_S, endpoint_reachable
from vittune.recipe.schema import LoggingConfig
from vittune.training.wandb_start import start_or_reason

DEFAULT_WANDB_URL = "https://api.wandb.ai"
WANDB_HOST = urlparse(DEFAULT_WANDB_URL).hostname
# wandb.init's own wait for its service (90 s by default); the probe has already found the
# server answering, so this only bounds a server that stops answering in between.
WANDB_INIT_TIMEOUT_S = 10
# Offline, wandb.init only starts its local service (nothing on the network to wait for): on
# a loaded machine that alone took over 10 s, and the run then logged nothing to W&B.
WANDB_OFFLINE_INIT_TIMEOUT_S = 90
# At exit wandb waits for its uploads; beyond this the rest stays on disk for `wandb sync`.
WANDB_FINISH_TIMEOUT_S = 5
# The probe calls the API itself (a POST to its GraphQL endpoint), not only the front page:
# a proxy can answer while the application behind it fails or hangs.
WANDB_API_PROBE = b'{"query": "{ viewer { id } }"}'


def wandb_base_url() -> str:
    """The server W&B will talk to: `WANDB_BASE_URL` (self-hosted W&B) or the public one."""
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL).rstrip("/")


def wandb_key_available() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(wandb_base_url()).hostname or WANDB_HOST
    try:
        found = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return found.authenticators(host) is not None or found.authenticators(WANDB_HOST) is not None


def host_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the W&B server (`WANDB_BASE_URL` by default) answers within `timeout` seconds."""
    url = url or wandb_base_url()
    return endpoint_reachable(f"{url}/graphql", timeout, body=WANDB_API_PROBE)


def resolve_wandb_mode(cfg: LoggingConfig) -> tuple[str, str | None]:
    """(mode, reason) for W&B; never lets wandb wait on a server that does not answer.

    `WANDB_MODE` wins over the recipe. `auto` goes online only with a key and an answering
    server, else offline with the reason. An explicit `online` (either place) that cannot be
    honoured is a one-line error before training: the user asked for live logging.
    """
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = env_mode or cfg.wandb_mode
    where = "WANDB_MODE=online" if env_mode else "logging.wandb_mode: online"
    if mode not in ("online", "auto", "run"):  # offline, disabled, dryrun: nothing to reach
        return mode, None
    explicit = mode in ("online", "run")
    url = wandb_base_url()
    if not wandb_key_available():
        if explicit:
            raise RecipeError(
                f"{where} but no W&B API key is set; run `wandb login`, set WANDB_API_KEY,"
                " or use logging.wandb_mode: auto to fall back to offline"
            )
        return "offline", "no W&B API key found (run `wandb login` to log online)"
    if not host_reachable(url):
        if explicit:
            raise RecipeError(
                f"{where} but the W&B server {url} did not answer within {PROBE_TIMEOUT_S:g} s;"
                " check WANDB_BASE_URL and the network, or use logging.wandb_mode: auto or offline"
            )
        return "offline", f"the W&B server {url} did not answer within {PROBE_TIMEOUT_S:g} s"
    return "online", None


def build_loggers(
    cfg: LoggingConfig, run_dir: Path, run_name: str, wandb_id: str | None = None
) -> tuple[list[Logger], str | None]:
    """Loggers for the Trainer, and a message for the user about W&B (or None).

    `wandb_id` (kept in the run folder) makes a resumed run continue the same W&B run. An
    online run is started here: a server that fails after the probe means offline logging
    (`auto`) or a one-line error (explicit `online`) before training, never a traceback later.
    """
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="csv")]
    if not cfg.wandb:
        return loggers, None
    mode, reason = resolve_wandb_mode(cfg)
    if mode == "disabled":
        return loggers, None
    wandb_logger = _wandb_logger(cfg, run_dir, run_name, mode, wandb_id)
    if mode == "online" and (failure := start_or_reason(wandb_logger)):
        where = f"the W&B server {wandb_base_url()} answered the probe but failed ({failure})"
        if (os.environ.get("WANDB_MODE", "").strip().lower() or cfg.wandb_mode) != "auto":
            raise RecipeError(
                f"{where}; check the server, or use logging.wandb_mode: auto or offline"
            )
        mode, reason = "offline", where
        forget_failed_start()
        wandb_logger = _wandb_logger(cfg, run_dir, run_name, mode, wandb_id)
    loggers.append(wandb_logger)
    if mode == "offline":
        why = f" ({reason})" if reason else ""
        return (
            loggers,
            f"W&B is logging offline{why}; sync later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
        )
    return loggers, None


def _wandb_logger(
    cfg: LoggingConfig, run_dir: Path, run_name: str, mode: str, wandb_id: str | None
) -> WandbLogger:
    if mode == "offline":
        keep_offline_runs_off_the_network()
    import wandb  # noqa: PLC0415 (only runs that log to W&B pay for its import)

    from vittune.training.wandb_run import SectionedWandbLogger  # noqa: PLC0415

    wandb_logger = SectionedWandbLogger(
        project=cfg.project,
        entity=cfg.entity,
        name=run_name,
        tags=cfg.tags,
        group=cfg.group,
        save_dir=str(run_dir),
        mode=mode,
        # offline, vittune prints the one line that matters (where to sync from) itself
        settings=wandb.Settings(
            init_timeout=WANDB_INIT_TIMEOUT_S if mode == "online" else WANDB_OFFLINE_INIT_TIMEOUT_S,
            finish_timeout=WANDB_FINISH_TIMEOUT_S,
            silent=mode == "offline",
        ),
        id=wandb_id,
        resume="allow" if wandb_id else None,
    )
    # Lightning passes `anonymous=None`, which wandb (>= 0.19) answers with a warning that the
    # setting has no effect, on every run; leaving the key out asks for the same thing.
    wandb_logger._wandb_init.pop("anonymous", None)
    return wandb_logger


def forget_failed_start() -> None:
    """End what the failed online start left running, before the offline run starts.

    - The wandb service keeps that run's id registered (and keeps retrying the server), so the
      offline run with the same id (the run folder's, kept for resumes) was refused with "run
      ID ... is in use": `wandb.teardown()` ends it, and the offline run starts a fresh one.
    - The failed start reported its error through wandb's usage telemetry, whose exporter then
      held the interpreter's exit on the broken server (its first export asks the server
      whether it takes telemetry, with a 10 s timeout, then flushes; measured 21 s at exit).
      wandb has no public switch for telemetry proxies already built (the process's and the
      failed run's own), so `disable()` stops new ones and each built one is given the answer
      its own check gives for a server without the endpoint: nothing is sent.
      tests/training/test_wandb_faults.py fails if a wandb release moves these names.
    """
    import wandb  # noqa: PLC0415

    wandb.teardown()
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy as otel  # noqa: PLC0415
    except ImportError:  # a wandb without this telemetry
        return
    otel.disable()
    for proxy in [o for o in gc.get_objects() if isinstance(o, otel.OpenTelemetryProxy)]:
        if hasattr(proxy, "_server_supports_proxy"):
            proxy._server_supports_proxy = False


def keep_offline_runs_off_the_network() -> None:
    """Turn off the wandb SDK's usage telemetry for an offline run (unless the user set it).

    wandb (0.31) posts usage metrics to `<WANDB_BASE_URL>/sdk/otel/v1/metrics` at interpreter
    exit whatever the run's mode, with a 10 s request timeout: a W&B server that hangs (the
    reason a run falls back to offline) held every offline run's exit for 10 s and more.
    `WANDB_ERROR_REPORTING=false` is wandb's documented switch for this reporting; the process
    was already logging offline, so nothing the user asked for is lost.
    """
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


def summarize_run(loggers: list[Logger], values: dict[str, float | int]) -> None:
    """Put `values` into the run summary of every logger that has one (W&B), beside the last
    values W&B keeps there itself."""
    if not values:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a metrics.csv already in the folder is continued, not deleted.

    A run resumed into its own folder (`trainer.resume_from: auto`) keeps the rows of the steps
    before the interruption; the new rows are appended under the same (sorted) header.
    """

    def save(self) -> None:
        try:
            super().save()
        except OSError as err:
            if not is_write_failure(err):
                raise
            path = Path(self.metrics_file_path)
            raise storage_error(path, needed_for(path, None), err) from None

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
