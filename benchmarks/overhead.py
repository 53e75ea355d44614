"""Time of a vittune training step against a hand-written timm + torch loop doing the same work.

Both sides train the same timm ViT (seed, drop-path, classes) on the same tensors held in
memory (a DataLoader over a TensorDataset: decoding and augmentation are not measured), with
AdamW over the same two parameter groups (no weight decay on norms, biases, pos-embed and
tokens), a warmup-cosine LambdaLR stepped every step, fp32 on the CPU.

The vittune side is vittune's own code: the recipe schema, `create_backbone`,
`ClassificationTask` and the Trainer exactly as `vittune.training.trainer.build_trainer` makes it (CSV
logger, LearningRateMonitor, ModelCheckpoint, Lightning's default progress bar; W&B off).
A step runs from the start of one training step to the start of the next, so batch fetching
and every per-step hook count; validation and checkpoint writing (epoch end) are not timed.

By default the two loops are paired: one plain step runs at the start of each vittune step,
timed apart and subtracted, so both see the same load on a shared machine. Wall and process
CPU time are both recorded; with one torch thread, CPU time is the one other jobs disturb
least. Each run times the mean of its steps after a warm-up; tables show medians over repeats.

    python benchmarks/overhead.py                 # tiny and small configurations
    python benchmarks/overhead.py --breakdown     # + what each part costs, on the micro model
    python benchmarks/overhead.py --write         # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from vittune.data.datasets import SplitSamples
from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import build
from vittune.tasks.classification import ClassificationTask
from vittune.training.trainer import build_trainer, monitor_of

SECTION = "## Training-step overhead (vittune vs plain timm + torch)"
LR, WEIGHT_DECAY, DROP_PATH = 1e-3, 0.05, 0.1
WALL, CPU = 0, 1
INCLUDED = (
    "vittune side: recipe -> `create_backbone` -> `ClassificationTask` -> the Trainer of"
    " `vittune.training.trainer.build_trainer` (CSV logger, LearningRateMonitor, ModelCheckpoint, Lightning's"
    " default progress bar, loss logged every step, running train accuracy; W&B off). Plain side:"
    " forward, cross-entropy, backward, AdamW step, LambdaLR step. Same model, seed, batches"
    " (in-memory tensors), param groups, schedule, fp32 on CPU. ms per step = mean over the"
    " timed steps after a warm-up (batch fetch and every per-step hook included; validation and"
    " checkpointing at epoch end excluded), median over repeats; ratio = median of per-repeat"
    " ratios vittune / plain. Read CPU time: it is what other jobs on a shared machine disturb"
    " least."
)
Stamp = tuple[float, float]  # (wall-clock seconds, process CPU seconds)


def now() -> Stamp:
    return time.perf_counter(), time.process_time()


def _minus(end: Stamp, start: Stamp) -> Stamp:
    return end[WALL] - start[WALL], end[CPU] - start[CPU]


@dataclass(frozen=True)
class Config:
    label: str
    name: str
    img_size: int
    patch_size: int
    batch: int
    warmup: int  # untimed steps
    steps: int  # timed steps
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_chans: int = 3
    num_classes: int = 10


CONFIGS = {
    "tiny": Config(
        "vit_tiny depth 6, 32 px / patch 8, batch 64", "vit_tiny_patch16_224", 32, 8, 64,
        warmup=5, steps=20, kwargs={"depth": 6},
    ),
    "small": Config(
        "vit_small, 64 px / patch 16, batch 32", "vit_small_patch16_224", 64, 16, 32,
        warmup=3, steps=8,
    ),
    # The test suite's model: steps so short that a fixed per-step cost is easy to resolve.
    "micro": Config(
        "micro ViT (width 64, depth 2), 32 px / patch 8, batch 64", "vit_tiny_patch16_224",
        32, 8, 64, warmup=5, steps=60, kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2},
    ),
}  # fmt: skip


def make_loader(cfg: Config, n_steps: int, seed: int) -> DataLoader:
    """`n_steps` shuffled full batches of random, already normalised images and labels."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.batch * n_steps
    images = torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)  # [N, C, H, W]
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)  # [N]
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=cfg.batch, shuffle=True, drop_last=True, generator=g)


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Written here independently of vittune.optim.schedules: linear warmup, cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class PlainLoop:
    """A hand-written timm + torch training loop: what a user would write without vittune."""

    def __init__(self, cfg: Config, seed: int) -> None:
        total = cfg.warmup + cfg.steps + 1
        torch.manual_seed(seed)
        self.model = timm.create_model(
            cfg.name,
            num_classes=cfg.num_classes,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            drop_path_rate=DROP_PATH,
            **cfg.kwargs,
        )
        self.model.train()
        skip = set(self.model.no_weight_decay())  # pos_embed, cls_token
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, cfg.warmup)
        )
        self.loss_fn = nn.CrossEntropyLoss()
        self.batches = iter(make_loader(cfg, total, seed))

    def step(self) -> None:
        images, labels = next(self.batches)  # [B, C, H, W], [B]
        loss = self.loss_fn(self.model(images), labels)  # [B, classes] logits -> scalar
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def run_plain(cfg: Config, seed: int) -> list[Stamp]:
    """(wall, CPU) seconds of each step of the plain loop run on its own."""
    loop = PlainLoop(cfg, seed)
    starts = []
    for _ in range(cfg.warmup + cfg.steps + 1):
        starts.append(now())
        loop.step()
    return [_minus(b, a) for a, b in itertools.pairwise(starts)]


class StepClock(Callback):
    """Marks the start of every training step; paired, it runs one plain step there first."""

    def __init__(self, plain: PlainLoop | None = None) -> None:
        self.plain = plain
        self.marks: list[tuple[Stamp, Stamp]] = []  # (before, after) the plain step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        before = now()
        if self.plain is not None:
            self.plain.step()
        self.marks.append((before, now()))

    def vittune_steps(self) -> list[Stamp]:
        """From the end of one step's plain work to the start of the next step's."""
        return [_minus(b[0], a[1]) for a, b in itertools.pairwise(self.marks)]

    def plain_steps(self) -> list[Stamp]:
        return [_minus(after, before) for before, after in self.marks[:-1]]


Change = Callable[[L.Trainer, ClassificationTask], None]


def _drop_callbacks(*kinds: type) -> Change:
    def apply(trainer: L.Trainer, task: ClassificationTask) -> None:
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, kinds)]

    return apply


def _drop_loggers(trainer: L.Trainer, task: ClassificationTask) -> None:
    trainer.loggers = []  # LearningRateMonitor refuses to run without a logger: it goes too
    _drop_callbacks(LearningRateMonitor)(trainer, task)


def _without_train_accuracy(trainer: L.Trainer, task: ClassificationTask) -> None:
    task.train_metrics = MetricCollection({})  # update() and compute() become no-ops


def _lightning_alone(trainer: L.Trainer, task: ClassificationTask) -> None:
    _without_train_accuracy(trainer, task)
    task.log = lambda *args, **kwargs: None  # the task's own step, with nothing logged
    _drop_loggers(trainer, task)
    _drop_callbacks(ProgressBar)(trainer, task)


# What `--breakdown` changes on the vittune side, one at a time, to say what costs what. Each
# switches a part off on the task and Trainer vittune built; none re-writes the task's step.
ABLATIONS: dict[str, Change] = {
    "without progress bar": _drop_callbacks(ProgressBar),
    "without LearningRateMonitor": _drop_callbacks(LearningRateMonitor),
    "without CSV logger (and LR monitor)": _drop_loggers,
    "without train accuracy": _without_train_accuracy,
    "Lightning alone (no self.log, loggers, bar)": _lightning_alone,
}


def vittune_recipe(cfg: Config, total: int, folder: Path) -> Recipe:
    """The recipe a user would write for this run (data comes from memory: root is unused)."""
    model = dict(name=cfg.name, pretrained=False, img_size=cfg.img_size, in_chans=cfg.in_chans)
    model.update(patch_size=cfg.patch_size, drop_path_rate=DROP_PATH, kwargs=dict(cfg.kwargs))
    return Recipe.model_validate(
        {
            "model": model,
            "data": {"root": str(folder), "batch_size": cfg.batch, "num_workers": 0},
            "augment": {"preset": "none"},
            "optim": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "cosine", "warmup_steps": cfg.warmup},
            "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
            | {"max_epochs": 1, "max_steps": total},
            "logging": {"wandb": False, "run_dir": str(folder), "name": "bench"},
        }
    )


def run_vittune(
    cfg: Config, seed: int, change: Change | None = None, paired: bool = False
) -> tuple[list[Stamp], list[Stamp]]:
    """(wall, CPU) seconds of each step of `trainer.fit` on a task and Trainer built by
    vittune, and of each plain step run beside them (paired; empty otherwise)."""
    total = cfg.warmup + cfg.steps + 1
    with tempfile.TemporaryDirectory(prefix="vittune-bench-") as tmp:
        run_dir = Path(tmp) / "bench"
        run_dir.mkdir()
        recipe = vittune_recipe(cfg, total, Path(tmp))
        torch.manual_seed(seed)
        classes = [f"class{i}" for i in range(cfg.num_classes)]
        in_memory = SplitSamples.classes_only(classes)
        task = build(recipe, "finetune", run_dir, found=in_memory).task
        clock = StepClock(PlainLoop(cfg, seed) if paired else None)
        trainer, _, _ = build_trainer(recipe, run_dir, monitor_of(recipe, task), [clock])
        if change is not None:
            change(trainer, task)
        trainer.fit(task, train_dataloaders=make_loader(cfg, total, seed))
    return clock.vittune_steps(), clock.plain_steps() if paired else []


def timed_mean(steps: list[Stamp], cfg: Config) -> Stamp:
    """Mean (wall, CPU) seconds of the timed steps, after the warm-up ones."""
    window = steps[cfg.warmup : cfg.warmup + cfg.steps]
    if len(window) != cfg.steps:
        raise RuntimeError(f"expected {cfg.warmup + cfg.steps} steps, got {len(steps)}")
    return statistics.fmean(w for w, _ in window), statistics.fmean(c for _, c in window)


@dataclass
class Row:
    """Per repeat, each vittune variant's (wall, CPU) s/step and its plain reference's."""

    config: Config
    times: dict[str, list[Stamp]] = field(default_factory=dict)
    reference: dict[str, list[Stamp]] = field(default_factory=dict)

    def median(self, side: str, kind: int, plain: bool = False) -> float:
        return statistics.median(t[kind] for t in (self.reference if plain else self.times)[side])

    def per_repeat(self, side: str, kind: int, fn: Callable[[float, float], float]) -> list[float]:
        pairs = zip(self.times[side], self.reference[side], strict=True)
        return [fn(ours[kind], plain[kind]) for ours, plain in pairs]

    def ratio(self, side: str, kind: int) -> float:
        return statistics.median(self.per_repeat(side, kind, lambda o, p: o / p))


def measure(cfg: Config, repeats: int, seed: int, variants: list[str], paired: bool) -> Row:
    """Every variant once per repeat, each with its plain reference: interleaved (paired),
    or run on its own just before (even repeats) or after (odd repeats) the variant."""
    row = Row(cfg)
    for repeat in range(repeats):
        for name in variants:
            change = ABLATIONS.get(name)
            if paired:
                ours, plain = run_vittune(cfg, seed, change, paired=True)
            elif repeat % 2:
                ours, plain = run_vittune(cfg, seed, change)[0], run_plain(cfg, seed)
            else:
                plain, (ours, _) = run_plain(cfg, seed), run_vittune(cfg, seed, change)
            row.times.setdefault(name, []).append(timed_mean(ours, cfg))
            row.reference.setdefault(name, []).append(timed_mean(plain, cfg))
        done = ", ".join(
            f"{n} {row.times[n][-1][CPU] * 1e3:.1f} (plain {row.reference[n][-1][CPU] * 1e3:.1f})"
            for n in variants
        )
        print(f"[{cfg.label}] repeat {repeat + 1}/{repeats}, CPU ms/step: {done}", flush=True)
    return row


def table(rows: list[Row]) -> str:
    lines = [
        "| configuration | plain ms/step, wall / CPU | vittune ms/step, wall / CPU "
        "| ratio, wall | ratio, CPU | CPU ratio, min - max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = row.per_repeat("vittune", CPU, lambda o, p: o / p)
        lines.append(
            f"| {row.config.label} "
            f"| {row.median('vittune', WALL, plain=True) * 1e3:.1f}"
            f" / {row.median('vittune', CPU, plain=True) * 1e3:.1f} "
            f"| {row.median('vittune', WALL) * 1e3:.1f} / {row.median('vittune', CPU) * 1e3:.1f} "
            f"| {row.ratio('vittune', WALL):.3f} | **{row.ratio('vittune', CPU):.3f}** "
            f"| {min(spread):.3f} - {max(spread):.3f} |"
        )
    return "\n".join(lines)


def breakdown_table(row: Row) -> str:
    lines = [
        f"Breakdown on the {row.config.label}:",
        "",
        "| vittune side | CPU ms/step | plain CPU ms/step | ratio, CPU | overhead, CPU ms/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in row.times:
        overheads = row.per_repeat(name, CPU, lambda o, p: (o - p) * 1e3)
        lines.append(
            f"| {'as users get it' if name == 'vittune' else name} "
            f"| {row.median(name, CPU) * 1e3:.1f} | {row.median(name, CPU, plain=True) * 1e3:.1f} "
            f"| {row.ratio(name, CPU):.3f} | {statistics.median(overheads):+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["tiny", "small"])
    parser.add_argument("--breakdown", nargs="?", const="micro", choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--separate", action="store_true", help="plain loop on its own, unpaired")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)  # the same intra-op threads for every run, both sides
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    paired = not args.separate
    rows = [measure(CONFIGS[n], args.repeats, args.seed, ["vittune"], paired) for n in args.configs]
    parts = [table(rows)]
    if args.breakdown:
        variants = ["vittune", *ABLATIONS]
        parts.append(
            breakdown_table(
                measure(CONFIGS[args.breakdown], args.repeats, args.seed, variants, paired)
            )
        )
    print("\n" + "\n\n".join(parts))
    if args.write:
        flags = (
            f"--configs {' '.join(args.configs)} --repeats {args.repeats} --threads {args.threads}"
        )
        flags += f" --breakdown {args.breakdown}" if args.breakdown else ""
        flags += " --separate" if args.separate else ""
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {machine()}; {args.threads} torch thread(s).\n"
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/overhead.py {flags}`"
            f" ({'paired' if paired else 'separate'} runs).\n\n{INCLUDED}\n\n" + "\n\n".join(parts),
        )
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
