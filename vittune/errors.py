"""User-facing errors: the CLI prints their one-line message and exits with code 2.

Anything else that escapes is a bug in vittune and keeps its traceback.
"""

import signal

# What schedulers send before they stop a job: SIGTERM (SLURM, Kubernetes, systemd) and SIGUSR1
# (SLURM's `--signal=SIGUSR1@90` warning). Each ends a run as `Preempted`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class VittuneError(Exception):
    """Base class for mistakes a user can make and fix."""


class RecipeError(VittuneError):
    """The recipe (or a command-line override) is invalid."""


class DataError(VittuneError):
    """The data on disk does not match what the recipe says."""


class StorageError(VittuneError):
    """The disk refused a write (full, over quota, or a file-size limit); nothing is lost."""


class WeightsError(VittuneError):
    """Pretrained weights cannot be found, verified or loaded into the model."""


class Preempted(BaseException):
    """A preemption signal (SIGTERM, SIGUSR1) stopped the run, after a checkpoint was saved.

    The CLI prints the message and exits with 128 + the signal number (143 for SIGTERM, 138
    for SIGUSR1), as a shell reports a process that the signal ended. A BaseException, like
    KeyboardInterrupt: raised from a signal handler at any point, it must not be caught (and
    reworded) by the `except Exception` around a file read.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
