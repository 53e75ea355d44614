"""Every rule that needs only the recipe, one checker per command.

They run when the recipe is loaded: before a run folder exists, a model is built or a file is
read, so `--print-recipe`, `inspect` and every training command refuse the same mistakes in
one line. Rules that need a built model (its patch size, its layers) stay in models/.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable

import timm
import timm.optim
from pydantic import ValidationError

from vittune.errors import RecipeError
from vittune.recipe.overrides import format_validation_error, set_dotted
from vittune.recipe.schema import Command, Recipe
from vittune.recipe.trainer_settings import check_trainer_settings

Check = Callable[[Recipe], None]


def _known_model(name: str, key: str) -> None:
    if timm.is_model(name):
        return
    guess = difflib.get_close_matches(name, timm.list_models(), n=1)
    raise RecipeError(
        f"unknown timm model {name!r} in {key}"
        + (f"; did you mean {guess[0]!r}?" if guess else "; see timm.list_models()")
    )


def check_model(recipe: Recipe) -> None:
    _known_model(recipe.model.name, "model.name")
    patch = recipe.model.patch_size
    height, width = recipe.model.img_size
    if patch is not None and (height % patch or width % patch):
        raise RecipeError(
            f"model.img_size {[height, width]} is not divisible by model.patch_size {patch}; pick a multiple of {patch}"
        )


def check_data(recipe: Recipe) -> None:
    data = recipe.data
    sources = [name for name in ("root", "csv", "builtin") if getattr(data, name)]
    if len(sources) != 1:
        raise RecipeError(
            "set exactly one of data.root, data.csv or data.builtin "
            + (f"(got {', '.join(sources)})" if sources else "(none is set)")
        )
    if data.format == "litdata":
        check_litdata(recipe)
    check_groups(recipe)
    if len(set(map(len, filter(None, (data.mean, data.std))))) > 1:
        raise RecipeError(
            "data.mean and data.std must have the same length (one value per channel)"
        )
    if data.mean is not None and len(data.mean) not in (1, recipe.model.in_chans):
        raise RecipeError(
            f"data.mean has {len(data.mean)} values but model.in_chans is {recipe.model.in_chans};"
            " give one value per channel (or one for all)"
        )


def check_groups(recipe: Recipe) -> None:
    """Patient-level splits: a CSV names groups in a column, a folder by a path regex."""
    data = recipe.data
    if data.group_column and not data.csv:
        raise RecipeError(
            "data.group_column names a column of data.csv; for an image folder use"
            " data.group_pattern (a regex on the path), or list the images in a CSV"
        )
    if data.group_pattern and (not data.root or data.csv):
        raise RecipeError(
            "data.group_pattern is searched in paths under data.root; with data.csv give the"
            " group in a column and set data.group_column"
        )
    if data.dicom_frame == "all" and (data.cache != "none" or data.format == "litdata"):
        raise RecipeError(
            "data.dicom_frame: all (one sample per frame) works on files without data.cache;"
            " set data.cache: none and data.format: files, or choose middle / first"
        )
    if (data.group_column or data.group_pattern) and data.format == "litdata":
        raise RecipeError(
            "litdata shards keep the split they were written with: set data.group_* when"
            " running `vittune prepare-data` with data.format: files, and drop it here"
        )


def check_litdata(recipe: Recipe) -> None:
    """`data.format: litdata` reads the shards of `vittune prepare-data` from data.root (its
    vittune.json is checked when the data is opened: it may be in object storage)."""
    data = recipe.data
    if not data.root:
        given = "data.csv" if data.csv else "data.builtin"
        raise RecipeError(
            f"data.format: litdata reads shards from data.root, not {given}; run"
            " `vittune prepare-data RECIPE OUT` with data.format: files, then set data.root: OUT"
            f" and remove {given}"
        )
    if data.cache != "none":
        raise RecipeError(
            "data.cache does not apply to data.format: litdata (litdata keeps its own chunk"
            " cache); set data.cache: none"
        )


def check_optim(recipe: Recipe) -> None:
    name = recipe.optim.name.lower()
    known = timm.optim.list_optimizers()
    if name not in known:
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {guess[0]!r}?" if guess else "e.g. adamw, sgd, lamb"
        raise RecipeError(
            f"unknown optim.name {recipe.optim.name!r}; {hint} (timm.optim.list_optimizers())"
        )


def check_mixing(recipe: Recipe) -> None:
    augment, data = recipe.augment, recipe.data
    mixing = augment.mixup_alpha > 0 or augment.cutmix_alpha > 0
    if mixing and data.multi_label:
        raise RecipeError(
            "mixup/cutmix are not supported with data.multi_label; set augment.mixup_alpha and augment.cutmix_alpha to 0"
        )
    if mixing and data.batch_size % 2:
        raise RecipeError(f"mixup/cutmix need an even data.batch_size, got {data.batch_size}")


def check_loss(recipe: Recipe) -> None:
    if recipe.data.multi_label and recipe.loss.class_weights == "balanced":
        raise RecipeError(
            "loss.class_weights: balanced is for single-label data; give explicit weights or none"
        )


def check_freeze(recipe: Recipe) -> None:
    for epoch, blocks in recipe.freeze.unfreeze_schedule.items():
        if epoch < 0 or blocks < 0:
            raise RecipeError(
                f"freeze.unfreeze_schedule entry {epoch}: {blocks} must map an epoch >= 0 to a block count >= 0"
            )


def check_mae(recipe: Recipe) -> None:
    mae = recipe.mae
    if mae is None:
        raise RecipeError("`vittune pretrain-mae` needs a `mae:` section")
    if recipe.optim.layer_decay is not None:
        raise RecipeError(
            "optim.layer_decay is for fine-tuning; MAE pretraining trains every layer at one lr, set it to null"
        )
    if mae.decoder_dim % mae.decoder_heads:
        raise RecipeError(
            f"mae.decoder_dim {mae.decoder_dim} is not divisible by mae.decoder_heads {mae.decoder_heads}; pick a multiple"
        )


def check_distill(recipe: Recipe) -> None:
    if recipe.distill is None:
        raise RecipeError(
            "`vittune distill` needs a `distill:` section with at least `teacher: {name: ..., pretrained: ...}`"
        )
    teacher = recipe.distill.teacher
    if teacher.pretrained is False:
        raise RecipeError(
            "distill.teacher.pretrained is false: a random teacher teaches nothing; point it at weights"
        )
    _known_model(teacher.name, "distill.teacher.name")
    if recipe.data.multi_label:
        raise RecipeError(
            "vittune distill is single-label; set data.multi_label: false or use vittune finetune"
        )
    if recipe.loss.class_weights != "none":
        raise RecipeError(
            "loss.class_weights is not supported by vittune distill; set loss.class_weights: none"
        )


def check_peft(recipe: Recipe) -> None:
    """PEFT replaces freezing: the adapters are what trains, the backbone stays frozen."""
    peft, freeze = recipe.peft, recipe.freeze
    if peft.method == "none":
        return
    clash = [
        key
        for key, on in (
            ("freeze.linear_probe", freeze.linear_probe),
            ("freeze.frozen_blocks", freeze.frozen_blocks > 0),
            ("freeze.unfreeze_schedule", bool(freeze.unfreeze_schedule)),
        )
        if on
    ]
    if clash:
        raise RecipeError(
            f"peft.method: {peft.method} already freezes the backbone and trains only its"
            f" adapters and head; remove {', '.join(clash)} (or set peft.method: none)"
        )
    if peft.method in ("lora", "dora", "ia3") and not peft.targets:
        raise RecipeError(
            f"peft.targets is empty: {peft.method} needs layers to adapt, e.g."
            " [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]"
        )
    if len(set(peft.targets)) != len(peft.targets):
        raise RecipeError(f"peft.targets lists a layer twice: {peft.targets}")


def check_not_for_mae(recipe: Recipe) -> None:
    if recipe.peft.method != "none":
        raise RecipeError(
            "peft is for fine-tuning a pretrained encoder; MAE pretraining trains it whole:"
            " set peft.method: none (then fine-tune the MAE run with peft)"
        )
    if recipe.ema is not None:
        raise RecipeError(
            "ema applies to vittune finetune and distill; remove the ema: section for MAE"
        )


COMMON: list[Check] = [
    check_model,
    check_data,
    check_optim,
    check_mixing,
    check_loss,
    check_trainer_settings,
]
CHECKS: dict[str, list[Check]] = {
    "finetune": [*COMMON, check_freeze, check_peft],
    "pretrain-mae": [*COMMON, check_mae, check_not_for_mae],
    "distill": [*COMMON, check_freeze, check_distill, check_peft],
}


def check_recipe(recipe: Recipe, command: Command) -> None:
    """Refuse, in one line, the first rule of `command` that the recipe breaks."""
    if recipe.task is not None and recipe.task != command:
        raise RecipeError(
            f"this recipe is for `vittune {recipe.task}`, not `vittune {command}`; run that command instead"
        )
    for check in CHECKS[command]:
        check(recipe)
    if recipe.sweep is not None and recipe.sweep.space:
        check_sweep_space(recipe, command)


# Keys a sweep sets itself for every trial (its folder, name and W&B group).
SWEEP_OWNED = ("sweep", "logging.run_dir", "logging.name", "logging.group", "trainer.resume_from")


def check_sweep_space(recipe: Recipe, command: Command) -> None:
    """Every `sweep.space` key is a recipe key, and every end of its range (every choice) is a
    value the schema and this command's checks accept, so no trial can fail on a refused value
    of a single key. Combinations are tried by the trials themselves (a refused one fails it)."""
    base = recipe.model_dump(mode="json", exclude={"sweep"})
    for key, entry in recipe.sweep.space.items():
        if any(key == owned or key.startswith(owned + ".") for owned in SWEEP_OWNED):
            raise RecipeError(
                f"sweep.space key `{key}` is set by the sweep itself for each trial; remove it"
            )
        values = entry.choice if entry.kind == "choice" else list(getattr(entry, entry.kind))
        for value in values:
            raw = copy.deepcopy(base)
            set_dotted(raw, key, value)
            try:
                check_recipe(Recipe.model_validate(raw), command)
            except ValidationError as err:
                problem = format_validation_error(err)
                if problem.startswith("unknown recipe key"):
                    raise RecipeError(f"sweep.space: {problem}") from None
                raise RecipeError(
                    f"sweep.space `{key}`: the value {value!r} is refused ({problem.split('; fix')[0]});"
                    " narrow the range or the choices"
                ) from None
            except RecipeError as err:
                raise RecipeError(
                    f"sweep.space `{key}`: the value {value!r} is refused ({err}); narrow the range"
                    " or the choices"
                ) from None
