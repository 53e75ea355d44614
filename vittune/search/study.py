"""The Optuna study of a sweep: storage, sampler, pruner, and which trials still count.

Storage: by default a journal file in the sweep folder (`study.journal`), which needs no
server and which several processes on one machine, or on machines sharing a file system, may
append to at once (Optuna locks it). `--storage` takes any Optuna RDB URL (sqlite:///...,
postgresql://...) or the path of a journal file elsewhere.

Liveness: Optuna's own heartbeat exists only for RDB storages, so every trial here records its
host and pid and writes a heartbeat attribute every `sweep.heartbeat_s` seconds (the same for
every storage). A RUNNING trial whose process is gone (same host) or whose heartbeat is older
than three intervals (another host) is failed and its values queued again, so a killed and
restarted sweep loses only the trial that was running, and repeats it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vittune.errors import RecipeError
from vittune.files import pid_alive
from vittune.recipe.schema import SweepConfig
from vittune.search.space import grid_of

if TYPE_CHECKING:
    import optuna

JOURNAL = "study.journal"
# user attributes a trial carries
FAIL_REASON = "fail_reason"  # why a trial failed (counts as a finished trial)
INTERRUPTED = "interrupted"  # a stop that is not the trial's fault (it is queued again)
RETRY_OF = "retry_of"  # the number of the interrupted trial whose values this one repeats
STALE_AFTER = 3  # heartbeats missed before a running trial is taken for dead


def open_storage(storage: str | None, sweep_dir: Path) -> Any:
    """An Optuna storage: an RDB URL, a journal file path, or the sweep folder's journal."""
    import optuna

    if storage and "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except Exception as err:  # sqlalchemy raises many kinds; the message names the cause
            raise RecipeError(
                f"cannot open the sweep storage {storage}: {str(err).splitlines()[0]};"
                " check the URL (e.g. sqlite:///sweep.db, postgresql://user@host/db)"
            ) from None
    path = Path(storage) if storage else sweep_dir / JOURNAL
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
    except OSError as err:
        raise RecipeError(
            f"cannot open the sweep journal {path}: {err.strerror}; point --storage or"
            " logging.run_dir at a writable folder"
        ) from None
    return optuna.storages.JournalStorage(backend)


def make_sampler(cfg: SweepConfig, seed: int | None) -> Any:
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid_of(cfg.space), seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg: SweepConfig, max_epochs: int) -> Any:
    """Pruning compares the per-epoch monitor (reported at step = epoch - 1); a trial trains
    `prune_after_epochs` epochs before it can be stopped."""
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials,
            n_warmup_steps=max(0, cfg.prune_after_epochs - 1),
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, cfg.prune_after_epochs), max_resource=max_epochs
        )
    return optuna.pruners.NopPruner()


def open_study(
    name: str, storage: Any, cfg: SweepConfig, direction: str, seed: int, max_epochs: int
) -> tuple[optuna.Study, bool]:
    """(study, created): the process that creates the study seeds its sampler with `seed`;
    a worker that joins draws its own seed, or it would suggest the creator's values again."""
    import optuna

    pruner = make_pruner(cfg, max_epochs)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=direction,
            sampler=make_sampler(cfg, seed),
            pruner=pruner,
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(cfg, None), pruner=pruner
    )
    if study.direction.name.lower() != direction:
        wants = "maximise" if direction == "maximize" else "minimise"
        raise RecipeError(
            f"study {name!r} was created to {'minimise' if wants == 'maximise' else 'maximise'} its"
            f" objective, this recipe's checkpoint.mode would {wants} it; use the study's monitor"
            " and mode, or another --study"
        )
    return study, False


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses up one of `--trials`: finished, pruned, or failed for its own
    reasons; a trial interrupted by a stop or a dead worker is repeated instead."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and FAIL_REASON in trial.user_attrs


def remaining(study: optuna.Study, target: int) -> int:
    """Trials still to start so that the study reaches `target` (running ones included)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    busy = sum(t.state == TrialState.RUNNING for t in trials)
    return target - sum(counted(t) for t in trials) - busy


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial) -> None:
    """Queue an interrupted trial's values again (the next worker to ask runs them first)."""
    study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number})


def is_stale(trial: optuna.trial.FrozenTrial, heartbeat_s: int, now: float) -> bool:
    attrs = trial.user_attrs
    pid = attrs.get("pid")
    same_host = attrs.get("host") == socket.gethostname() and isinstance(pid, int)
    if same_host and pid != os.getpid() and not pid_alive(pid):
        return True
    beat = attrs.get("heartbeat")
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    return beat is not None and now - beat > STALE_AFTER * heartbeat_s


def reap_dead(study: optuna.Study, heartbeat_s: int) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and queue their values again; the
    numbers of those trials. Two workers may look at once: the storage lets only one of them
    finish a trial, and only that one queues it again."""
    import optuna
    from optuna.trial import TrialState

    reaped = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, heartbeat_s, now):
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        requeue(study, trial)
        reaped.append(trial.number)
    return reaped


@contextmanager
def heartbeat(trial: optuna.Trial, every_s: float) -> Iterator[None]:
    """Record who runs the trial, and keep a heartbeat attribute fresh while it runs."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("heartbeat", time.time())
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            try:
                trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial finished meanwhile; the next check ends the loop
                return

    thread = threading.Thread(target=beat, name="vittune-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
