"""Recipe text to data: the safe YAML loader, dotted overrides, nested merging, and pydantic's
validation errors as one line with a did-you-mean.

Shared by loading (load.py) and the checks that try values against the schema (checks.py's
sweep-space check), so neither imports the other for them.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe


class SafeRecipeLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (no Python tags) that also reads `1e-3` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-3`); `1e-3` would reach
    untyped fields such as `model.kwargs` or albumentations arguments as a string.
    """


SafeRecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=SafeRecipeLoader)  # a SafeLoader: Python tags are refused


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into a copy of `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn `optim.lr=3e-4` into {"optim": {"lr": 0.0003}}; values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"override {text!r} is not of the form section.key=value (e.g. optim.lr=3e-4)"
        )
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    set_dotted(nested, key, value)
    return nested


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (`optim.lr`) in a recipe mapping in place, making the mappings on the
    way (and replacing what is not one); the value replaces, it is not merged."""
    parts = key.split(".")
    cursor = raw
    for part in parts[:-1]:
        if not isinstance(cursor.get(part), dict):
            cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for did-you-mean suggestions)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return model
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return model
        model = nested[0]
    return model


_UNION_TAGS = {"int", "float", "str", "bool", "none"}


def _dotted(loc: tuple[Any, ...]) -> str:
    """`model.img_size` rather than pydantic's `model.img_size.int`: union-member tags dropped."""
    return ".".join(
        str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))
    )


def format_validation_error(err: ValidationError) -> str:
    """One line naming the first problem, where it is, and how to fix it."""
    errors = err.errors()
    # A misspelt key also makes the right key "missing": report the misspelling first.
    errors = [e for e in errors if e["type"] == "extra_forbidden"] or errors
    # A union field fails once per member; the deepest failure is the most specific one
    # (`class_weights=[1, x]` is about element 1, not about the `none`/`balanced` literal).
    field = _dotted(tuple(errors[0]["loc"]))
    first = max(
        (e for e in errors if _dotted(tuple(e["loc"])).startswith(field)),
        key=lambda e: len(e["loc"]),
    )
    loc = tuple(first["loc"])
    dotted = _dotted(loc)
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = (
            f"did you mean `{'.'.join([*map(str, loc[:-1]), guess[0]])}`?"
            if guess
            else f"known keys here: {', '.join(known)}"
        )
        return f"unknown recipe key `{dotted}`; {hint}"
    if first["type"] == "missing":
        return f"recipe key `{dotted}` is required but missing; add it to the recipe"
    value = first.get("input")
    return f"recipe key `{dotted}`: {first['msg']} (got {value!r}); fix the value in the recipe or override"
