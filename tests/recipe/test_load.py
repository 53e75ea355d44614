"""Recipe loading: schema checks with did-you-mean, `base:` inheritance, overrides, safe YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import RECIPES, write_recipe

from vittune.errors import RecipeError
from vittune.recipe.load import dump_recipe, load_recipe
from vittune.recipe.overrides import deep_merge, parse_override
from vittune.recipe.schema import Recipe

DIGITS = {"data": {"builtin": "digits"}}


def load_error(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def digits_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", DIGITS)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({**DIGITS, "optim": {"lrr": 1e-3}}, "`optim.lrr`; did you mean `optim.lr`?"),
        ({**DIGITS, "modle": {"name": "x"}}, "`modle`; did you mean `model`?"),
        ({"data": {"builtin": "digits", "batchsize": 8}}, "did you mean `data.batch_size`?"),
        # the misspelling is reported, not the required key it leaves missing
        (
            {**DIGITS, "distill": {"teacher": {"nme": "vit"}}},
            "`distill.teacher.nme`; did you mean `distill.teacher.name`?",
        ),
    ],
)
def test_unknown_key_is_refused_with_a_suggestion(
    tmp_path: Path, content: dict, expected: str
) -> None:
    message = load_error(write_recipe(tmp_path / "r.yaml", content))
    assert message.startswith("unknown recipe key"), message
    assert expected in message


def test_unknown_key_without_close_match_lists_the_known_keys(digits_recipe: Path) -> None:
    message = load_error(digits_recipe, "schedule.zzzzzz=1")
    assert "known keys here:" in message and "warmup_epochs" in message


@pytest.mark.parametrize(
    ("override", "where", "what"),
    [
        ("optim.lr=abc", "`optim.lr`", "valid number"),
        ("trainer.max_epochs=1.5", "`trainer.max_epochs`", "integer"),
        ("data.batch_size=0", "`data.batch_size`", "greater than or equal to 1"),
        ("augment.preset=heavy", "`augment.preset`", "'medical'"),
        # union-typed fields name the field, not pydantic's internal union member
        ("model.img_size=abc", "`model.img_size`", "abc"),
        ("loss.class_weights=[1, x]", "`loss.class_weights.1`", "valid number"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(
    digits_recipe: Path, override: str, where: str, what: str
) -> None:
    message = load_error(digits_recipe, override)
    assert where in message and what in message, message
    assert "fix the value" in message


def test_base_inheritance_deep_merges_and_resolves_relative_to_the_file(tmp_path: Path) -> None:
    write_recipe(
        tmp_path / "shared" / "root.yaml",
        {"model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}}, "optim": {"lr": 0.1}},
    )
    write_recipe(
        tmp_path / "shared" / "mid.yaml",
        {"base": "root.yaml", "model": {"img_size": 32}, "data": {"builtin": "digits"}},
    )
    child = write_recipe(
        tmp_path / "child.yaml",
        {"base": "shared/mid.yaml", "model": {"kwargs": {"embed_dim": 64}}, "optim": {"lr": 0.2}},
    )
    recipe = load_recipe(child, ["model.kwargs.num_heads=2", "trainer.max_epochs=3"])
    assert recipe.model.name == "vit_tiny_patch16_224"  # from the grandparent
    assert recipe.model.img_size == (32, 32)  # from the parent, as (height, width)
    assert recipe.model.kwargs == {"depth": 2, "embed_dim": 64, "num_heads": 2}  # all three merged
    assert recipe.optim.lr == 0.2  # the child wins over its base
    assert recipe.trainer.max_epochs == 3  # the command line wins over everything
    assert recipe.data.builtin == "digits"


def test_base_loop_and_missing_base_are_recipe_errors(tmp_path: Path) -> None:
    write_recipe(tmp_path / "a.yaml", {"base": "b.yaml", **DIGITS})
    write_recipe(tmp_path / "b.yaml", {"base": "a.yaml"})
    assert "loops back" in load_error(tmp_path / "a.yaml")
    write_recipe(tmp_path / "c.yaml", {"base": "nowhere.yaml", **DIGITS})
    assert "nowhere.yaml" in load_error(tmp_path / "c.yaml")


def test_overrides_are_parsed_as_yaml_values() -> None:
    assert parse_override("optim.lr=3e-4") == {"optim": {"lr": 3e-4}}
    # YAML 1.1 would leave `1e-3` a string; untyped fields (model.kwargs) must get a float
    assert parse_override("model.kwargs.drop_rate=1e-3") == {
        "model": {"kwargs": {"drop_rate": 1e-3}}
    }
    assert parse_override("trainer.max_epochs=10") == {"trainer": {"max_epochs": 10}}
    assert parse_override("model.img_size=[32, 48]") == {"model": {"img_size": [32, 48]}}
    assert parse_override("logging.name=run=1") == {"logging": {"name": "run=1"}}
    assert parse_override("model.pretrained=false") == {"model": {"pretrained": False}}
    assert parse_override("data.mean=") == {"data": {"mean": None}}
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_override("optim.lr")
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_override("optim..lr=1")


def test_exponent_floats_in_files_are_floats(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {builtin: digits}\nmodel: {kwargs: {drop_rate: 1e-2}}\noptim: {lr: 2e-4}\n"
    )
    recipe = load_recipe(path)
    assert recipe.model.kwargs == {"drop_rate": 0.01} and recipe.optim.lr == 2e-4


def test_deep_merge_replaces_lists_and_scalars_but_merges_mappings() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, {"a": {"c": [3]}, "d": {"e": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": {"e": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # the input is left untouched


def test_python_tags_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    message = load_error(recipe)
    assert "not valid YAML" in message and "python/object" in message
    assert not marker.exists()


def test_the_dumped_recipe_loads_back_to_the_same_recipe(tmp_path: Path) -> None:
    original = load_recipe(
        RECIPES / "medical.yaml",
        ["model.img_size=[32, 48]", "model.patch_size=8", "augment.transforms=[{name: Blur}]"],
    )
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_recipe(original))
    assert "base" not in yaml.safe_load(dumped.read_text())
    assert load_recipe(dumped) == original
    assert load_recipe(dumped).model.img_size == (32, 48)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_for_its_command(path: Path) -> None:
    command = yaml.safe_load(path.read_text()).get("task") or "finetune"
    assert isinstance(load_recipe(path, command=command), Recipe)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.img_size=36", "model.patch_size=8"], "not divisible by model.patch_size 8"),
        (["model.img_size=[32, 36]", "model.patch_size=8"], "not divisible"),
        (["data.root=/x"], "set exactly one of data.root, data.csv or data.builtin"),
        (["data.builtin=null"], "(none is set)"),
        (["data.mean=[0.5, 0.5]", "data.std=[0.5, 0.5]"], "model.in_chans is 3"),
        (["data.mean=[0.5]", "data.std=[0.5, 0.5]"], "same length"),
        (["task=distill"], "vittune distill"),
    ],
)
def test_semantic_checks(digits_recipe: Path, overrides: list[str], expected: str) -> None:
    assert expected in load_error(digits_recipe, *overrides)


def test_missing_and_malformed_recipe_files(tmp_path: Path) -> None:
    assert "recipe file not found" in load_error(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML at line" in load_error(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "must be a mapping" in load_error(listing)
