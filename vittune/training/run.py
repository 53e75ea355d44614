"""A training run from a checked recipe: the resume point, the run folder and its lock, and
clear endings for stops and mistakes; training itself is in session.py.

Data flows one way: recipe -> run folder -> assembly (data, models, optim, task) -> Trainer
-> export. This module does what needs neither Lightning nor the data: it checks the resume
point, makes the folder and says where it is (within seconds of the command), and only then
imports session.py, which builds and trains. Nothing here knows about the command line.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vittune.errors import Preempted, RecipeError
from vittune.files import atomic_write
from vittune.recipe.load import dump_recipe
from vittune.recipe.schema import Command, Recipe
from vittune.training import collector
from vittune.training.resume import ResumePoint, resolve_resume
from vittune.training.run_folder import (
    RunFolder,
    prepare_run_dir,
    release_run_dir,
    removed_on_user_error,
)
from vittune.training.run_lock import acquire, release
from vittune.training.settings import check_machine
from vittune.training.stop_signals import StopSignals

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from vittune.training.session import RunResult


def fit(
    recipe: Recipe,
    command: Command,
    recipe_path: str | Path,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train as the recipe says, keep best/last checkpoints, and export the best weights.

    `trainer.resume_from` is checked before the run folder exists; `auto` continues the newest
    checkpoint of `<logging.run_dir>/<logging.name>` in that same folder (or starts fresh there).
    `callbacks` join the Trainer's (a sweep's pruning callback).
    """
    check_machine(recipe)  # a GPU that is not there, an unusable cache folder: no folder yet
    resume = resolve_resume(recipe)
    signals = StopSignals()
    with signals.installed():
        folder = prepare_run_dir(
            recipe.logging.name,
            recipe.logging.run_dir,
            Path(recipe_path).stem,
            reuse=recipe.trainer.resume_from == "auto",
        )
        lock = None
        try:
            lock = acquire(folder.path) if folder.owner else None  # one writer per run folder
            with removed_on_user_error(folder, lambda: held_checkpoints(folder.path)):
                start_in(folder, recipe, command, log, resume)
                # Lightning, the data scan and the model build come after the line above: a
                # user learns where the run is at once (the imports alone take seconds).
                from vittune.training.session import train_in_folder  # noqa: PLC0415

                collector.resume()  # the imports are done (cli.py paused it for them)
                return train_in_folder(folder, recipe, command, log, resume, signals, callbacks)
        except Preempted as stop:
            held = held_checkpoints(folder.path)
            if folder.created and held is None:
                shutil.rmtree(folder.path, ignore_errors=True)  # stopped before any step
            if signals.stopped_in == "after the export":
                raise Preempted(
                    stop.signum,
                    f"{stop}; the run had finished: {folder.path} holds its export",
                ) from None
            if signals.stopped_in == "after training":
                raise Preempted(
                    stop.signum,
                    f"{stop}, before the export; {folder.path / 'checkpoints' / 'last.ckpt'}"
                    " holds the final step; export it with trainer.resume_from=auto"
                    f" logging.name={folder.path.name}",
                ) from None
            raise
        finally:
            release(lock)
            release_run_dir(folder)


def held_checkpoints(run_dir: Path) -> str | None:
    """What a run folder holds that is worth keeping ("checkpoints/last.ckpt, ..."), or None."""
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    return f"checkpoints/{', '.join(names)}" if names else None


def start_in(
    folder: RunFolder,
    recipe: Recipe,
    command: Command,
    log: Callable[[str], None],
    resume: ResumePoint | None,
) -> None:
    """Record the recipe in the folder and say where the run is (rank 0 only)."""
    if not folder.owner:
        return
    try:  # a resumed run records the recipe it continues with (only resumable keys differ)
        atomic_write(folder.path / "recipe.yaml", lambda p: p.write_text(dump_recipe(recipe)))
    except OSError as err:
        raise RecipeError(
            f"cannot write to run folder {folder.path}: {err.strerror}; point logging.run_dir at a writable folder"
        ) from None
    log(f"vittune {command}: run folder {folder.path}")
    if resume is not None:
        log(
            f"  resuming {resume.path} at step {resume.global_step} (epoch {resume.epoch});"
            " weights, optimiser and schedule from it"
        )
        if reached := resume.limit_reached(recipe):
            log(
                f"  it already reached {reached}: nothing left to train; it goes on to the test"
                f" and the export (raise {reached.split('=')[0]} to train on)"
            )
