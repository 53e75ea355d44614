"""`vittune inspect`: what a recipe will train, without training it.

It builds through the same `assembly.build` as training, so what it shows is what a run
gets. Where this machine lacks something a run would have (the data folder, hub weights,
a teacher's weights), it shows the architecture anyway and says what it left out.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vittune.data.datamodule import scan_sources
from vittune.data.datasets import SplitSamples
from vittune.errors import DataError, WeightsError
from vittune.models.backbone import count_parameters
from vittune.optim.memory import training_memory
from vittune.optim.param_groups import build_param_groups
from vittune.recipe.schema import Command, Recipe
from vittune.tasks.assembly import Assembly, build
from vittune.tasks.base import effective_lr

STAND_IN_CLASSES = ["class_0", "class_1"]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _grid(grid: tuple[int, int] | None) -> str:
    return f"{grid[0]}x{grid[1]}" if grid else "n/a"


@torch.no_grad()
def forward_flops(model: torch.nn.Module, in_chans: int, img_size: tuple[int, int]) -> int:
    """FLOPs of one forward pass on one image, counted by torch's FlopCounterMode."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_chans, *img_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def _found(recipe: Recipe, command: Command) -> tuple[SplitSamples, str]:
    if command == "pretrain-mae":
        stand_in = SplitSamples.classes_only([])
        return stand_in, "none: MAE pretrains the encoder alone (labels are ignored)"
    try:
        found = scan_sources(recipe.data)
        return found, f"{len(found.classes)} classes from the data"
    except DataError as err:
        stand_in = SplitSamples.classes_only(STAND_IN_CLASSES)
        return stand_in, f"data not readable ({err}); head shown with 2 classes"


def _random_init(recipe: Recipe) -> Recipe:
    return recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"pretrained": False})}
    )


def build_for_inspection(
    recipe: Recipe, command: Command, found: SplitSamples, notes: list[str]
) -> Assembly:
    """`build`, falling back to what can be shown when weights are not on this machine."""
    try:
        return build(recipe, command, found=found)
    except WeightsError as err:
        missing = str(err)
    if command == "distill":  # perhaps only the teacher is missing: show the student as built
        try:
            assembly = build(recipe, "finetune", found=found)
            notes.append(f"teacher not loaded here: {missing}")
            return assembly
        except WeightsError:
            pass
    notes.append(f"weights not available here ({missing}); shown with random init")
    try:
        return build(_random_init(recipe), command, found=found)
    except WeightsError as err:  # distill: the teacher is missing too
        notes.append(f"teacher not loaded here: {err}")
        return build(_random_init(recipe), "finetune", found=found)


def _task_lines(recipe: Recipe, command: Command, assembly: Assembly) -> list[str]:
    task = assembly.task
    lines = []
    teacher = getattr(task, "teacher", None)
    if teacher is not None:
        cfg = recipe.distill
        lines.append(f"teacher      {teacher.description}")
        lines.append(f"distillation {cfg.type}, alpha {cfg.alpha}, tau {cfg.tau}")
    if command == "pretrain-mae":
        mae = recipe.mae
        decoder_params = sum(p.numel() for p in task.decoder.parameters())
        tokens = assembly.report.grid_after or (0, 0)
        patches = tokens[0] * tokens[1]
        keep = round(patches * (1 - mae.mask_ratio))
        lines.append(
            f"mae decoder  {mae.decoder_depth} blocks x {mae.decoder_dim} wide, "
            f"{mae.decoder_heads} heads, {decoder_params:,} params, {mae.pos_embed} pos-embed"
        )
        lines.append(
            f"masking      ratio {mae.mask_ratio}: the encoder sees {keep} of {patches} patches"
            f"; loss on {'normalised' if mae.norm_pix_loss else 'raw'} pixels"
        )
    return lines


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _peft_lines(recipe: Recipe, trainable: int, total: int) -> list[str]:
    """The PEFT method and what training holds besides activations (optim/memory.py)."""
    peft = recipe.peft
    lines = []
    if peft.method != "none":
        detail = {
            "lora": f"rank {peft.rank}, alpha {peft.alpha:g} on {', '.join(peft.targets)}",
            "dora": f"rank {peft.rank}, alpha {peft.alpha:g} on {', '.join(peft.targets)}",
            "ia3": f"scales on {', '.join(peft.targets)}",
            "ssf": f"scale + shift after {', '.join(peft.targets)}, norm1, norm2",
            "vpt": f"{peft.prompt_tokens} prompt tokens before block 0",
            "vpt_deep": f"{peft.prompt_tokens} prompt tokens before every block",
            "bitfit": "bias terms" + (" and norm scales" if peft.bitfit_norms else ""),
        }[peft.method]
        lines.append(f"peft         {peft.method}: {detail}; the head trains in full")
    memory = training_memory(total, trainable, recipe.optim.name, recipe.ema is not None)
    ema = f" + EMA copy {_mb(memory.ema)}" if memory.ema else ""
    lines.append(
        f"memory       {_mb(memory.total)} float32 besides activations: weights"
        f" {_mb(memory.weights)} + gradients {_mb(memory.gradients)} + {recipe.optim.name}"
        f" state {_mb(memory.optimiser)}{ema}"
    )
    return lines


def inspect_recipe(recipe: Recipe, command: Command = "finetune") -> str:
    """A report of the backbone, token grid, weight loading, parameter groups and FLOPs."""
    found, data_note = _found(recipe, command)
    notes: list[str] = []
    assembly = build_for_inspection(recipe, command, found, notes)
    model, report = assembly.task.model, assembly.report
    grouped = assembly.task.optimised_module()  # MAE: encoder + decoder + mask token
    lr = effective_lr(recipe, world_size=1)
    groups = build_param_groups(grouped, recipe.optim, lr)
    trainable, total = count_parameters(grouped)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    frozen = [(n, p) for n, p in grouped.named_parameters() if id(p) not in in_optimizer]

    out = [f"command      vittune {command}"]
    out.append(f"backbone     {recipe.model.name} ({type(model).__name__})")
    out.append(f"input        {recipe.model.in_chans} x {list(recipe.model.img_size)} px")
    out.append(
        f"token grid   {_grid(report.grid_before or report.grid_after)} -> {_grid(report.grid_after)}"
    )
    out.append(f"weights      {report.source}")
    out += [f"             {note}" for note in [*report.notes, *notes]]
    out.append(f"head         {data_note}")
    reinit = report.reinitialised or (
        ["(whole model: random init)"] if report.source == "random init" else []
    )
    out.append(f"re-init      {', '.join(reinit) if reinit else 'nothing'}")
    out += _task_lines(recipe, command, assembly)
    scaling = (
        f" (optim.lr {recipe.optim.lr:g} x batch {recipe.data.batch_size}/256, 1 device)"
        if recipe.optim.lr_scaling == "linear"
        else ""
    )
    out.append(f"peak lr      {lr:.3g}{scaling}; layer decay {recipe.optim.layer_decay or 'off'}")
    out.append("")
    rows = [
        [
            g["name"],
            str(g["layer_id"]) if g["layer_id"] is not None else "-",
            f"{sum(p.numel() for p in g['params']):,}",
            f"{g['lr']:.3e}",
            f"{g['weight_decay']:g}",
            "no",
        ]
        for g in groups
    ]
    if frozen:
        rows.append(["frozen", "-", f"{sum(p.numel() for _, p in frozen):,}", "-", "-", "yes"])
    out.append(_table(["group", "layer", "params", "lr", "weight_decay", "frozen"], rows))
    out.append("")
    out.append(
        f"parameters   {trainable:,} trainable of {total:,} ({100.0 * trainable / max(total, 1):.1f}%)"
    )
    out += _peft_lines(recipe, trainable, total)
    flops = forward_flops(model, recipe.model.in_chans, recipe.model.img_size)
    out.append(f"forward      {flops / 1e9:.3f} GFLOPs per image (torch flop counter)")
    return "\n".join(out)
