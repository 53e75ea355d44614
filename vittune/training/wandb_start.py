"""Start an online W&B run at once, so that a server that fails after the probe is found
before training and the run can fall back to offline logging instead of failing later.

A W&B server (or a proxy in front of it) can answer the reachability probe and still fail or
hang on the API: wandb.init then retried until its timeout and raised `CommError` from
inside `trainer.fit`, after the run folder existed. Here the run is created right after the
logger, under wandb's `init_timeout`; a failure is returned as one line for the caller.
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger


def start_or_reason(logger: WandbLogger) -> str | None:
    """Create the logger's W&B run now; None when it started, else why it did not."""
    try:
        logger.experiment  # noqa: B018 (the property starts the run)
    except Exception as err:  # wandb raises CommError, UsageError, TimeoutError, ...
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"{type(err).__name__}: {first}" if first else type(err).__name__
    return None
