"""User-facing errors: the CLI prints their one-line message and exits with code 2.

Anything else that escapes is a bug in vittune and keeps its traceback.
"""


class VittuneError(Exception):
    """Base class for mistakes a user can make and fix."""


class RecipeError(VittuneError):
    """The recipe (or a command-line override) is invalid."""


class DataError(VittuneError):
    """The data on disk does not match what the recipe says."""


class WeightsError(VittuneError):
    """Pretrained weights cannot be found, verified or loaded into the model."""
