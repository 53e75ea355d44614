"""The `vittune` command line: each command loads a recipe and hands it to run.py.

User mistakes (VittuneError) print one line and exit with code 2; bugs keep their traceback.
A preemption signal (SIGTERM, SIGUSR1) stops training with a checkpoint of the current step,
prints one line and exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer

from vittune.errors import Preempted, VittuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune, MAE-pretrain and distill Vision Transformers from YAML recipes.",
)

RecipeArg = Annotated[str, typer.Argument(help="Path to a YAML recipe.")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides applied after the recipe, e.g. optim.lr=3e-4"),
]
PrintOpt = Annotated[
    bool, typer.Option("--print-recipe", help="Print the fully resolved recipe and exit.")
]


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    for prefix in ("vittune.errors.", ""):
        for name in ("DataError: ", "RecipeError: ", "WeightsError: ", "VittuneError: "):
            if last.startswith(prefix + name):
                return last[len(prefix + name) :]
    return lines[0] if len(lines) == 1 else last


def guarded(action: Callable[[], None]) -> None:
    try:
        action()
    except VittuneError as err:
        typer.echo(f"vittune: error: {one_line(err)}", err=True)
        raise typer.Exit(code=2) from None
    except Preempted as stop:
        typer.echo(f"vittune: {stop}", err=True)
        raise typer.Exit(code=stop.exit_code) from None


def _train(command: str, recipe_path: str, overrides: list[str] | None, print_recipe: bool) -> None:
    def action() -> None:
        from vittune.recipe.load import dump_recipe, load_recipe

        recipe = load_recipe(recipe_path, overrides or [], command=command)
        if print_recipe:
            typer.echo(dump_recipe(recipe), nl=False)
            return
        from vittune.run import fit

        result = fit(recipe, command, recipe_path, log=typer.echo)
        if result.export_path is not None:
            score = f"{result.best_score:.4f}" if result.best_score is not None else "n/a"
            typer.echo(f"vittune {command}: done. best {result.monitor} = {score}")
            typer.echo(f"  exported {result.export_path}")
            typer.echo(f"  run folder: {result.run_dir}")
            # result.messages (the W&B notice) were printed when the run started: not again

    guarded(action)


@app.command()
def finetune(
    recipe: RecipeArg, overrides: OverridesArg = None, print_recipe: PrintOpt = False
) -> None:
    """Fine-tune a classifier on an image folder or CSV."""
    _train("finetune", recipe, overrides, print_recipe)


@app.command("pretrain-mae")
def pretrain_mae(
    recipe: RecipeArg, overrides: OverridesArg = None, print_recipe: PrintOpt = False
) -> None:
    """Self-supervised MAE pretraining on (unlabelled) images."""
    _train("pretrain-mae", recipe, overrides, print_recipe)


@app.command()
def distill(
    recipe: RecipeArg, overrides: OverridesArg = None, print_recipe: PrintOpt = False
) -> None:
    """DeiT distillation of a ViT student from a teacher."""
    _train("distill", recipe, overrides, print_recipe)


@app.command()
def inspect(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    command: Annotated[
        str | None,
        typer.Option(help="finetune, pretrain-mae or distill (default: the recipe's task:)"),
    ] = None,
) -> None:
    """Show the backbone, token grid, weights, teacher or decoder and parameter groups; no training."""

    def action() -> None:
        from vittune.inspection import inspect_recipe
        from vittune.recipe.load import load_recipe

        if command not in (None, "finetune", "pretrain-mae", "distill"):
            raise typer.BadParameter("--command must be finetune, pretrain-mae or distill")
        loaded = load_recipe(recipe, overrides or [], command=command)
        chosen = command or loaded.task or "finetune"
        typer.echo(inspect_recipe(loaded, chosen))

    guarded(action)


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"vittune {version('vittune')}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Fine-tune, MAE-pretrain and distill Vision Transformers from YAML recipes."""


def main() -> None:
    from vittune.noise import quiet_third_party

    quiet_third_party()  # here, not on import: library users keep their logging and warnings
    app(prog_name="vittune")


if __name__ == "__main__":
    sys.exit(main())
