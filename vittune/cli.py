"""The `vittune` command line: each command loads a recipe and hands it to run.py.

User mistakes (VittuneError) print one line and exit with code 2; bugs keep their traceback.
A preemption signal (SIGTERM, SIGUSR1) stops training with a checkpoint of the current step,
prints one line and exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from vittune.errors import Preempted, VittuneError
from vittune.inference.run_check import require_run_folder
from vittune.training import collector

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
        if str(stop):  # other DDP ranks stop silently
            typer.echo(f"vittune: {stop}", err=True)
        raise typer.Exit(code=stop.exit_code) from None


def _train(command: str, recipe_path: str, overrides: list[str] | None, print_recipe: bool) -> None:
    def action() -> None:
        from vittune.recipe.load import dump_recipe, load_recipe

        recipe = load_recipe(recipe_path, overrides or [], command=command)
        if print_recipe:
            typer.echo(dump_recipe(recipe), nl=False)
            return
        from vittune.training.run import fit

        result = fit(recipe, command, recipe_path, log=typer.echo)
        if result.export_path is not None:
            score = f"{result.best_score:.4f}" if result.best_score is not None else "n/a"
            if result.exported == "last":  # checkpoint.save_top_k 0 keeps no best checkpoint
                typer.echo(f"vittune {command}: done. exported the last weights (no best kept)")
            else:
                typer.echo(f"vittune {command}: done. best {result.monitor} = {score}")
            typer.echo(f"  exported {result.export_path}")
            typer.echo(f"  run folder: {result.run_dir}")
            # result.messages (the W&B notice) were printed when the run started: not again

    # for torch, timm and Lightning: fit resumes collection once they are imported (the end
    # of the block does, where the command ends before: --print-recipe, a recipe error)
    with collector.paused():
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
        if command not in (None, "finetune", "pretrain-mae", "distill"):
            raise typer.BadParameter("--command must be finetune, pretrain-mae or distill")
        with collector.paused():
            from vittune.inference.inspect import inspect_recipe
            from vittune.recipe.load import load_recipe

            loaded = load_recipe(recipe, overrides or [], command=command)
        chosen = command or loaded.task or "finetune"
        typer.echo(inspect_recipe(loaded, chosen))

    guarded(action)


@app.command("prepare-data")
def prepare_data(
    recipe: RecipeArg,
    out: Annotated[str, typer.Argument(help="A new (or empty) folder for the shards.")],
    overrides: OverridesArg = None,
    option_overrides: Annotated[
        list[str] | None,
        typer.Option("--override", help="A dotted override (as after OUT); repeatable."),
    ] = None,
) -> None:
    """Write the recipe's images, split as training splits them, as litdata shards."""

    def action() -> None:
        given = [*(option_overrides or []), *(overrides or [])]
        with collector.paused():
            from vittune.data.prepare import prepare_data as write_shards
            from vittune.recipe.load import load_recipe

            loaded = load_recipe(recipe, given, command=None)
        typer.echo(f"vittune prepare-data: {recipe} -> {out}")
        metadata = write_shards(loaded, out, log=typer.echo)
        typer.echo(
            f"vittune prepare-data: done. {len(metadata['classes'])} classes, images per split"
            f" {metadata['splits']}; train with data.format=litdata data.root={out}"
        )

    guarded(action)


RunArg = Annotated[str, typer.Argument(help="A run folder (runs/<name>) of finetune or distill.")]
WeightsOpt = Annotated[
    str, typer.Option(help="best (the exported model.safetensors), last (last.ckpt), or a file")
]
DeviceOpt = Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu, cuda, cuda:1")]


@app.command()
def evaluate(
    run: RunArg,
    overrides: OverridesArg = None,
    split: Annotated[
        str,
        typer.Option(help="auto (test, else val; all of new data), train, val, test or all"),
    ] = "auto",
    weights: WeightsOpt = "best",
    name: Annotated[str | None, typer.Option(help="eval/<name>/ (default: the split)")] = None,
    temperature: Annotated[
        bool, typer.Option("--temperature", help="Also fit a temperature (calibration).")
    ] = False,
    device: DeviceOpt = "auto",
    token_merge: Annotated[
        list[int] | None,
        typer.Option(
            help="Also score with r tokens merged per block (ToMe); repeat for several r."
        ),
    ] = None,
    operating_point: Annotated[
        str | None,
        typer.Option(help="spec=0.95, sens=0.9 or youden: a threshold chosen on val, applied here"),
    ] = None,
    aggregate: Annotated[
        str | None, typer.Option(help="mean or max: also score per group (data.group_*)")
    ] = None,
    bootstrap: Annotated[
        int | None, typer.Option(help="Bootstrap resamples for the 95% CIs (default 1000)")
    ] = None,
) -> None:
    """Score a trained run on its test/val split, or on other data given as data.* overrides."""

    def action() -> None:
        require_run_folder(run)  # before the heavy imports: a typo is said at once
        with collector.paused():
            from vittune.evaluation.clinical_report import format_clinical
            from vittune.evaluation.clinical_run import ClinicalOptions
            from vittune.evaluation.report import format_table
            from vittune.inference.evaluate import evaluate_run

        clinical = ClinicalOptions(operating_point, aggregate, bootstrap)
        result = evaluate_run(
            run, overrides or [], split, weights, name, temperature, device, token_merge, clinical
        )
        typer.echo(
            f"vittune evaluate: {run} ({weights} weights) on the {result.split} split:"
            f" {result.report.num_samples} images"
        )
        if result.skipped:
            typer.echo(f"  {len(result.skipped)} file(s) could not be decoded and are not scored")
        typer.echo(format_table(result.report))
        typer.echo("\n" + format_clinical(result.clinical))
        if result.merging:
            typer.echo("\ntoken merging (ToMe)   r  tokens in last block   top-1   images/s")
            for row in result.merging:
                typer.echo(
                    f"                     {row['r']:>3}  {row['tokens_last_block']:>20}"
                    f"  {row['acc1']:.4f}  {row['images_per_s']:>9.1f}"
                )
        typer.echo(f"\nsaved in {result.folder}")

    guarded(action)


@app.command()
def predict(
    run: RunArg,
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, globs or a CSV.")],
    out: Annotated[str, typer.Option("--out", help="Where to write the CSV.")] = "predictions.csv",
    weights: WeightsOpt = "best",
    batch_size: Annotated[int | None, typer.Option(help="Default: the run's.")] = None,
    flip: Annotated[
        bool, typer.Option("--flip", help="Average with the horizontally flipped image.")
    ] = False,
    threshold: Annotated[float, typer.Option(help="Multi-label decision threshold.")] = 0.5,
    top_k: Annotated[int, typer.Option(help="Ranked classes per image in the CSV.")] = 3,
    device: DeviceOpt = "auto",
) -> None:
    """Predict classes for images with a trained run; unreadable files are listed, not fatal."""

    def action() -> None:
        require_run_folder(run)
        with collector.paused():
            from vittune.inference.predict import predict_files

        result = predict_files(
            run, inputs, out, weights, batch_size, flip, threshold, top_k, device
        )
        failed = sum(error is not None for error in result.errors)
        typer.echo(
            f"vittune predict: {len(result.paths) - failed} images predicted"
            + (f", {failed} unreadable (see the error column)" if failed else "")
            + f"; wrote {result.out}"
        )

    guarded(action)


@app.command()
def attention(
    run: RunArg,
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs or a CSV.")],
    out: Annotated[str, typer.Option("--out", help="Folder for the PNGs.")] = "attention",
    weights: WeightsOpt = "best",
    head_fusion: Annotated[
        str, typer.Option(help="Rollout: mean, max or min over heads.")
    ] = "mean",
    discard_ratio: Annotated[
        float, typer.Option(help="Rollout: share of the weakest attention weights dropped.")
    ] = 0.0,
) -> None:
    """Attention maps of a trained ViT: last-block class-token attention and rollout."""

    def action() -> None:
        require_run_folder(run)
        with collector.paused():
            from vittune.inference.attention import attention_for_files

        written, failed = attention_for_files(run, images, out, weights, head_fusion, discard_ratio)
        typer.echo(f"vittune attention: {len(written)} image(s) -> {out}")
        for line in failed:
            typer.echo(f"  skipped {line}", err=True)

    guarded(action)


@app.command()
def export(
    run: RunArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    out: Annotated[
        str | None, typer.Option("--out", help="Default: RUN/export/model.onnx (or .pt)")
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: torch's)")] = None,
    weights: WeightsOpt = "best",
    bake_normalisation: Annotated[
        bool, typer.Option("--bake-normalisation", help="The graph takes [0, 1] pixels.")
    ] = False,
    quantize: Annotated[str | None, typer.Option(help="int8: also write an int8 variant")] = None,
    tolerance: Annotated[float, typer.Option(help="Largest logit difference allowed")] = 1e-4,
    check_images: Annotated[
        int, typer.Option(help="Validation images to check and score on (evenly spaced)")
    ] = 1000,
) -> None:
    """Export a trained run to ONNX or TorchScript, checked against PyTorch on its val images."""

    def action() -> None:
        require_run_folder(run)
        with collector.paused():
            from vittune.deploy.pipeline import export_run, format_table

        result = export_run(
            run,
            fmt,
            out,
            opset,
            weights,
            bake_normalisation,
            quantize,
            tolerance,
            check_images,
            log=typer.echo,
        )
        typer.echo(
            f"vittune export: {result.path} matches PyTorch on {result.num_images}"
            f" {result.source} images (max |logit diff| {result.variants[1].check.max_abs_diff:.2e},"
            f" top-1 agreement {result.variants[1].check.top1_agreement:.2%})"
        )
        typer.echo(format_table(result))
        typer.echo(f"\ninput contract: {result.sidecar}\nreport: {result.report}")

    guarded(action)


@app.command()
def serve(
    run: RunArg,
    host: Annotated[
        str, typer.Option(help="127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    fmt: Annotated[
        str, typer.Option("--format", help="torch, or onnx (RUN/export/model.onnx)")
    ] = "torch",
    int8: Annotated[bool, typer.Option("--int8", help="int8 dynamic quantisation (CPU).")] = False,
    max_batch_size: Annotated[
        int, typer.Option(help="Requests run together at most (1: no batching).")
    ] = 32,
    batch_timeout: Annotated[float, typer.Option(help="Seconds a batch waits to fill.")] = 0.01,
    workers: Annotated[int, typer.Option(help="Model worker processes.")] = 1,
    device: Annotated[
        str, typer.Option(help="auto (a GPU when there is one), cpu or cuda")
    ] = "auto",
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB.")] = 10.0,
    top_k: Annotated[int, typer.Option(help="Ranked classes per answer.")] = 3,
    threshold: Annotated[float, typer.Option(help="Multi-label decision threshold.")] = 0.5,
    weights: WeightsOpt = "best",
) -> None:
    """Serve a trained run over HTTP (LitServe): POST /predict, GET /health, GET /info."""

    def action() -> None:
        with collector.paused():
            from vittune.deploy.serve import serve_run

        serve_run(
            run, host, port, fmt, int8, max_batch_size, batch_timeout, workers, device,
            max_body_mb, top_k, threshold, weights, log=typer.echo,
        )  # fmt: skip

    guarded(action)


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"vittune {version('vittune')}")
        raise typer.Exit()


@app.command()
def sweep(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Finished trials the study aims for (sweep.trials).")
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(help="Study name and folder under logging.run_dir (shared by workers)."),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna RDB URL or journal file (default: in the sweep folder)."),
    ] = None,
    wandb_sweep: Annotated[
        str | None,
        typer.Option("--wandb-sweep", help="Write an equivalent W&B sweep YAML and exit."),
    ] = None,
) -> None:
    """Search the recipe's sweep.space with Optuna; each trial is a run folder (docs/sweeps.md)."""

    def action() -> None:
        with collector.paused():
            from vittune.recipe.load import load_recipe

            loaded = load_recipe(recipe, overrides or [], command=None)
        command = loaded.task or "finetune"
        if wandb_sweep:
            from vittune.search.wandb_sweep import write_wandb_sweep

            write_wandb_sweep(loaded, command, recipe, overrides or [], wandb_sweep, log=typer.echo)
            return
        with collector.paused():
            from vittune.search.sweep import run_sweep

        run_sweep(loaded, command, recipe, trials, study, storage, log=typer.echo)

    guarded(action)


@app.command("lr-find")
def lr_find(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    steps: Annotated[int, typer.Option(min=5, help="Optimiser steps of the range test.")] = 100,
    min_lr: Annotated[float, typer.Option(help="Base lr of the first step.")] = 1e-7,
    max_lr: Annotated[float, typer.Option(help="Base lr of the last step.")] = 1.0,
    plot: Annotated[
        str, typer.Option(help="Where to save the plot (a CSV goes beside it).")
    ] = "lr_find.png",
) -> None:
    """Learning-rate range test that keeps layer decay and group ratios; prints optim.lr=..."""

    def action() -> None:
        with collector.paused():
            from vittune.recipe.load import load_recipe
            from vittune.search.lr_find import run_lr_find

            loaded = load_recipe(recipe, overrides or [], command=None)
        run_lr_find(loaded, loaded.task or "finetune", steps, min_lr, max_lr, plot, log=typer.echo)

    guarded(action)


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
    from vittune.training import early_signals

    early_signals.install()  # a signal during the imports: one line, 128 + signum
    from vittune.training.noise import quiet_third_party

    quiet_third_party()  # here, not on import: library users keep their logging and warnings
    try:
        app(prog_name="vittune")
    finally:
        # The command has finished and closed its files. Freezing every object makes the
        # interpreter's final garbage collection skip the million-odd objects that torch,
        # Lightning, torchmetrics, scipy and matplotlib leave behind: 1.0 s of a training
        # run's exit (1.25 s -> 0.27 s, measured). atexit handlers (W&B, DataLoader
        # workers, logging) still run, and the memory goes back to the system at exit.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
