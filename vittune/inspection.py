"""`vittune inspect`: what a recipe will train, without training it."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vittune.data.datamodule import scan_sources
from vittune.errors import DataError
from vittune.models.backbone import count_parameters, create_backbone
from vittune.optim.param_groups import build_param_groups
from vittune.recipe.schema import Command, Recipe
from vittune.run import freeze_for_recipe
from vittune.tasks.base import effective_lr


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
def forward_flops(model: torch.nn.Module, in_chans: int, img_size: int | tuple[int, int]) -> int:
    """FLOPs of one forward pass on one image, counted by torch's FlopCounterMode."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_chans, height, width))
    model.train(was_training)
    return int(counter.get_total_flops())


def inspect_recipe(recipe: Recipe, command: Command = "finetune") -> str:
    """A report of the backbone, token grid, weight loading, parameter groups and FLOPs."""
    out: list[str] = []
    try:
        classes = scan_sources(recipe.data).classes
        data_note = f"{len(classes)} classes from the data"
    except DataError as err:
        classes = ["class_0", "class_1"]
        data_note = f"data not readable ({err}); head shown with 2 classes"
    num_classes = 0 if command == "pretrain-mae" else len(classes)
    if command == "pretrain-mae":
        data_note = "none: MAE pretrains the encoder alone (labels are ignored)"
    model, report = create_backbone(recipe.model, num_classes)
    if command == "pretrain-mae":
        from vittune.tasks.mae import MaeTask  # noqa: PLC0415 (only MAE needs the decoder)

        grouped = MaeTask(recipe, model).optimised_module()  # encoder + decoder + mask token
    else:
        freeze_for_recipe(model, recipe)
        grouped = model
    lr = effective_lr(recipe, world_size=1)
    groups = build_param_groups(grouped, recipe.optim, lr)
    trainable, total = count_parameters(grouped)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    frozen = [(n, p) for n, p in grouped.named_parameters() if id(p) not in in_optimizer]

    out.append(f"backbone     {recipe.model.name} ({type(model).__name__})")
    out.append(f"input        {recipe.model.in_chans} x {recipe.model.img_size} px")
    out.append(
        f"token grid   {_grid(report.grid_before or report.grid_after)} -> {_grid(report.grid_after)}"
    )
    out.append(f"weights      {report.source}")
    for note in report.notes:
        out.append(f"             {note}")
    out.append(f"head         {data_note}")
    reinit = report.reinitialised or (
        ["(whole model: random init)"] if report.source == "random init" else []
    )
    out.append(f"re-init      {', '.join(reinit) if reinit else 'nothing'}")
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
    flops = forward_flops(model, recipe.model.in_chans, recipe.model.img_size)
    out.append(f"forward      {flops / 1e9:.3f} GFLOPs per image (torch flop counter)")
    return "\n".join(out)
