"""Exports in timm's hub layout, so a run folder loads in plain timm, plus a model card.

A run folder holds what timm's `save_for_hf` writes: the weights in timm key names and a
`config.json` from timm's own `save_config_for_hf` (`architecture`, `num_classes`,
`label_names`, `model_args`, `pretrained_cfg` with the run's input size, mean, std and resize).
So `timm.create_model("local-dir:RUN", pretrained=True)` builds the trained model with its head,
and `timm.data.resolve_model_data_config(model)` gives the run's preprocessing. vittune's own
facts (task, classes, patch grid, version) sit under the `vittune` key, which timm ignores;
vittune reads either through `vittune.models.run_config.read_run_config`.

MAE runs export `encoder.safetensors` (the encoder alone, `num_classes` 0): the name says there
is no head, vittune's `model.pretrained: RUN` finds it, and timm's local-dir loader takes it too
(it falls back to the folder's only `*.safetensors` when there is no `model.safetensors`).
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from timm.layers import to_2tuple

# timm's writer of hub configs; `save_for_hf` (public) wraps it but also writes the weights,
# non-atomically and from the module's current state rather than the best checkpoint's.
from timm.models._hub import generate_readme, save_config_for_hf
from torch import nn

from vittune.files import atomic_write
from vittune.models.adapters.export_weights import (
    ExportedWeights,
    checkpoint_weights,
    exported_weights,
    write_adapter,
)
from vittune.models.backbone import tensor_bytes
from vittune.models.weights import read_state_dict
from vittune.recipe.schema import Command, Recipe

if TYPE_CHECKING:  # the assembly imports every task; an export needs none of them
    from vittune.tasks.assembly import Assembly

# vittune's evaluation resize (data/transforms.py: albumentations' Resize, cv2.INTER_LINEAR),
# applied to the whole image: no crop, so crop_pct 1.0 and a centre "crop" that keeps it all.
INTERPOLATION = "bilinear"
CARD_NAME = "README.md"
# pretrained_cfg keys that describe where a default checkpoint came from, not the model
PROVENANCE = (
    "tag",
    "license",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "description",
)


def vittune_version() -> str:
    try:
        return version("vittune")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def export_config(
    model: nn.Module,
    classes: list[str],
    img_size: int | tuple[int, int],
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    task: str,
    hub_weights: bool = False,
) -> dict[str, Any]:
    """config.json as timm's `save_config_for_hf` writes it for `model`, with vittune's facts.

    `model_args` come from what timm's factory recorded when it built `model` (img_size,
    patch_size, in_chans, the recipe's model.kwargs); `pretrained_cfg` carries the run's
    preprocessing. Class names go to timm's `label_names` only when the model has a head for
    them (an MAE encoder has none). Unless the run started from the architecture's hub
    weights (`hub_weights`), the default weights' provenance (tag, license, hub id, paper)
    is dropped: timm copies it from the architecture's default config, and a model trained
    from scratch or from other weights never saw those.
    """
    height, width = to_2tuple(img_size)
    own: dict[str, Any] = {"version": vittune_version(), "task": task, "classes": list(classes)}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        own.update(patch_size=int(patch[0]), grid=[height // patch[0], width // patch[1]])
    model_config: dict[str, Any] = {"vittune": own}
    if classes and getattr(model, "num_classes", None) == len(classes):
        model_config["label_names"] = list(classes)
    data_config = {
        "input_size": (in_chans, height, width),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    # timm writes to a path; read its JSON back so that the caller writes it atomically.
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "config.json"
        save_config_for_hf(model, str(path), model_config=model_config, data_config=data_config)
        config = json.loads(path.read_text())
    if not hub_weights:
        for key in PROVENANCE:
            config["pretrained_cfg"].pop(key, None)
    return config


def contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or strided storage; give it plain CPU copies."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_export(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    folder: Path,
    filename: str = "model.safetensors",
) -> Path:
    """Write the weights and config.json, each atomically and readable by all (0644): an
    export is meant to be shared, and a kill mid-write must not leave a truncated file."""
    path = folder / filename
    tensors = contiguous_state(state)
    metadata = {"format": "pt", "architecture": config["architecture"]}
    size = tensor_bytes(tensors.values())
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata), size=size)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda temp: temp.write_text(text))
    return path


def best_of(checkpoint: Path) -> dict[str, Any] | None:
    """The monitored metric, its best value and the epoch of a best checkpoint (None: unknown).

    Lightning stores the ModelCheckpoint state after updating it, so the best file records
    its own score; `mmap` reads that state without loading the weights again.
    """
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a checkpoint vittune did not write: the card just omits the score
        return None
    for key, state in (content.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and state.get("monitor"):
            score = state.get("best_model_score")
            if score is None:
                continue
            return {
                "monitor": state["monitor"],
                "score": float(score),
                "epoch": content.get("epoch"),
                "step": content.get("global_step"),
            }
    return None


def _snippet_kwargs(args: dict[str, Any]) -> str:
    return "".join(f"    {k}={v!r},\n" for k, v in args.items())


def model_card(facts: dict[str, Any]) -> str:
    """The run folder's README.md, from plain facts (no files read): timm's `generate_readme`
    with vittune's details and the two ways to load the export in timm."""
    run, weights, n = facts["run_dir"], facts["weights"], facts["num_classes"]
    details: dict[str, Any] = {
        "Architecture": f"{facts['architecture']} (timm)",
        "Task": facts["task"],
        "Weights": f"`{weights}` (best checkpoint), started from {facts['source']}",
        "Input": (
            f"{facts['input_size'][0]} channel(s), {facts['input_size'][1]}x"
            f"{facts['input_size'][2]} px (height x width), {facts['interpolation']} resize, "
            f"no crop, mean {facts['mean']}, std {facts['std']}"
        ),
        "Classes": facts["classes"] or "none (no classifier head)",
        "Images per split": facts["splits"],
    }
    best = facts.get("best")
    details["Best validation"] = (
        f"{best['monitor']} = {best['score']:.4f} at epoch {best['epoch']} (step {best['step']})"
        if best
        else "not recorded"
    )
    if facts.get("metrics"):
        details["Metrics"] = {k: f"{v:.4f}" for k, v in facts["metrics"].items()}
    details["Recipe"] = f"[{facts['recipe']}]({facts['recipe']}) in the run folder"
    if facts.get("peft"):
        details["Adapter"] = facts["peft"]
    head = "with its trained head" if n else "without a head (pass num_classes=N for a new one)"
    usage = (
        f"The folder follows timm's hub layout: timm builds the model {head} and reads the "
        "preprocessing from `config.json`.\n\n"
        "```python\n"
        "import timm\n\n"
        f'model = timm.create_model("local-dir:{run}", pretrained=True).eval()\n'
        "config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**config)\n"
        "```\n\n"
        "Or from the weight file alone, with the architecture arguments of `config.json` "
        "(`num_classes` goes into the overlay too, or timm drops the trained head):\n\n"
        "```python\n"
        "model = timm.create_model(\n"
        f'    "{facts["architecture"]}",\n'
        "    pretrained=True,\n"
        f'    pretrained_cfg_overlay=dict(file="{run}/{weights}", num_classes={n}),\n'
        f"{_snippet_kwargs(facts['model_args'])}"
        ")\n"
        "```\n"
    )
    card = {
        "description": f"A {facts['task']} run of vittune ({facts['name']}).",
        "details": details,
        "usage": usage,
        "tags": ["image-classification" if n else "image-feature-extraction", "timm", "vittune"],
        # vittune cannot know the terms of the data or of the weights it started from.
        "license": facts.get("license") or "other",
        "library_name": "timm",
    }
    return generate_readme(card, facts["name"], card["tags"][0])


def write_model_card(folder: Path, text: str) -> Path:
    """README.md in the run folder, atomically and 0644 like the other exports."""
    path = folder / CARD_NAME
    atomic_write(path, lambda temp: temp.write_text(text))
    return path


def adapted_export(assembly: Assembly, recipe: Recipe, checkpoint: Path | None) -> ExportedWeights:
    """PEFT / EMA runs: the checkpoint's EMA (else raw) weights, adapters merged."""
    task = assembly.task
    ema = getattr(task, "ema", None)
    if checkpoint is not None:
        state = checkpoint_weights(checkpoint, ema=ema is not None)
    else:
        state = (ema.module if ema is not None else task.model).state_dict()
    return exported_weights(task.model, recipe.peft, state)


def peft_note(recipe: Recipe, adapted: ExportedWeights | None) -> str | None:
    """The model card's line on a PEFT run's weights and its `adapter/` (docs/peft.md)."""
    method = recipe.peft.method
    if adapted is None or method == "none":
        return None
    if adapted.merged:
        return f"{method}, merged into these weights; the adapter alone is in `adapter/`"
    return (
        f"{method}: its prompts cannot merge into timm weights, so the weight file also holds"
        " `blocks.N.vpt_prompt` tensors and plain timm refuses it; load it with vittune or"
        " apply `adapter/` (docs/peft.md)"
    )


def export_best(
    assembly: Assembly,
    recipe: Recipe,
    command: Command,
    best_checkpoint: str | None,
    run_dir: Path,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write the best (else last) weights of the exported module in timm key names, timm's
    config.json and the model card. `metrics` (e.g. test scores) go into the card."""
    module = assembly.export_module(assembly.task)
    candidates = [best_checkpoint, str(run_dir / "checkpoints" / "last.ckpt")]
    best = next((p for p in candidates if p and Path(p).is_file()), None)
    adapted = None
    if recipe.peft.method != "none" or recipe.ema is not None:
        adapted = adapted_export(assembly, recipe, Path(best) if best else None)
        module, state = adapted.module, adapted.state
    else:
        state = read_state_dict(Path(best)) if best else module.state_dict()
        own = set(module.state_dict())
        state = {k: v for k, v in state.items() if k in own}
    size, chans = recipe.model.img_size, recipe.model.in_chans
    hub = recipe.model.pretrained is True  # the architecture's own hub weights
    config = export_config(
        module, assembly.classes, size, chans, assembly.mean, assembly.std, command, hub
    )
    if adapted is not None:
        config["vittune"]["peft"] = {"method": recipe.peft.method, "merged": adapted.merged}
        config["vittune"]["ema"] = recipe.ema is not None
    path = write_export(state, config, run_dir, assembly.export_name)
    if adapted is not None and recipe.peft.method != "none":
        write_adapter(adapted, recipe.peft, run_dir, assembly.report.source)
    facts = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "weights": assembly.export_name,
        "architecture": config["architecture"],
        "task": command,
        "source": assembly.report.source,
        "classes": list(assembly.classes),
        "num_classes": config["num_classes"],
        "splits": {s: len(v) for s, v in assembly.datamodule.found.splits.items()},
        "input_size": list(config["pretrained_cfg"]["input_size"]),
        "mean": list(assembly.mean),
        "std": list(assembly.std),
        "interpolation": INTERPOLATION,
        "model_args": config.get("model_args", {}),
        "best": best_of(Path(best_checkpoint))
        if best_checkpoint and best == best_checkpoint
        else None,
        "metrics": dict(metrics or {}),
        "recipe": "recipe.yaml",
        "peft": peft_note(recipe, adapted),
    }
    write_model_card(run_dir, model_card(facts))
    return path
