"""Time of a DeiT distillation step against the student's own step plus the teacher's forward.

What distillation must cost is one training step of the student and one forward pass of the
teacher; anything above their sum is vittune's overhead (the teacher wrapper's
un-normalise / resize / re-normalise / class reorder, the loss, the metrics). Goal: at most
1.1x that sum.

- **distillation step**: `DistillationTask.training_step` (vittune's code, outside a Trainer so
  that Lightning's own per-step cost, measured by overhead.py, is not counted), backward,
  AdamW step. The teacher is a `FrozenTeacher` with its own statistics and resolution.
- **student step**: the same timm student, forward (both heads), cross-entropy on each head,
  backward, AdamW step: what training it without a teacher costs.
- **teacher forward**: the bare timm teacher in eval mode under `no_grad`, on a batch already at
  its resolution and normalisation.

The three are timed in rotating order within each round on the same batch, so that all three
see the same machine load; a round's ratio is distill / (student + teacher), and the table shows
medians over rounds. Process CPU time with one torch thread is the default measure (on a
shared machine wall time mostly measures the other jobs); wall time is reported beside it.

    python benchmarks/distill_step.py                  # both configurations, ~2 min
    python benchmarks/distill_step.py --write          # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vittune.models.teacher import FrozenTeacher
from vittune.recipe.schema import Recipe
from vittune.tasks.distillation import DistillationTask

SECTION = "## DeiT distillation step (vittune vs student step + teacher forward)"
GOAL = 1.10


@dataclass
class Config:
    student: str
    student_kwargs: dict[str, Any]
    img_size: int
    teacher: str
    teacher_size: int
    in_chans: int
    batch: int
    classes: int
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)


CONFIGS = {
    # The digits experiment: a 6-block DeiT-Tiny at 32 px (4x4 tokens), grey, and a small
    # ResNet teacher at 16 px (so the batch is resized for it).
    "digits": Config(
        student="deit_tiny_distilled_patch16_224",
        student_kwargs=dict(patch_size=8, depth=6),
        img_size=32,
        teacher="test_resnet",
        teacher_size=16,
        in_chans=1,
        batch=32,
        classes=10,
    ),
    # DeiT-Small at 96 px (6x6 tokens) taught by a ResNet-18 at 128 px, RGB, 100 classes.
    "small": Config(
        student="deit_small_distilled_patch16_224",
        student_kwargs={},
        img_size=96,
        teacher="resnet18",
        teacher_size=128,
        in_chans=3,
        batch=16,
        classes=100,
    ),
}


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def build(cfg: Config, kind: str) -> dict[str, Any]:
    torch.manual_seed(0)
    student = timm.create_model(
        cfg.student,
        num_classes=cfg.classes,
        in_chans=cfg.in_chans,
        img_size=cfg.img_size,
        drop_path_rate=0.1,
        **cfg.student_kwargs,
    )
    teacher_model = timm.create_model(cfg.teacher, num_classes=cfg.classes, in_chans=cfg.in_chans)
    student_stats = ((0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans)
    teacher_stats = (IMAGENET_DEFAULT_MEAN[: cfg.in_chans], IMAGENET_DEFAULT_STD[: cfg.in_chans])
    order = list(range(cfg.classes))[::-1]  # a teacher whose classes come in another order
    teacher = FrozenTeacher(
        teacher_model, *teacher_stats, *student_stats, cfg.teacher_size, order, "benchmark"
    )
    recipe = Recipe.model_validate(
        {
            "model": {"name": cfg.student, "in_chans": cfg.in_chans, "img_size": cfg.img_size},
            "data": {"builtin": "digits"},
            "distill": {"teacher": {"name": cfg.teacher, "pretrained": "-"}, "type": kind},
        }
    )
    task = DistillationTask(recipe, student, teacher, [str(i) for i in range(cfg.classes)])
    task.train()
    images = torch.randn(cfg.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    targets = torch.randint(0, cfg.classes, (cfg.batch,))
    with torch.no_grad():
        teacher_input = teacher.prepare(images)  # [B, C, h, w] at the teacher's size
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    return dict(
        task=task,
        student=student,
        teacher_model=teacher.model,
        images=images,
        targets=targets,
        teacher_input=teacher_input,
        optimizer=optimizer,
    )


def student_step(p: dict[str, Any]) -> None:
    cls_logits, dist_logits = p["student"](p["images"])  # [B, K] each
    loss = 0.5 * F.cross_entropy(cls_logits, p["targets"])
    loss = loss + 0.5 * F.cross_entropy(dist_logits, p["targets"])
    p["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    p["optimizer"].step()


@torch.no_grad()
def teacher_forward(p: dict[str, Any]) -> None:
    p["teacher_model"](p["teacher_input"])


def distill_step(p: dict[str, Any]) -> None:
    loss = p["task"].training_step((p["images"], p["targets"]), 0)
    p["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    p["optimizer"].step()


def measure(cfg: Config, kind: str, rounds: int, warmup: int) -> dict[str, float]:
    parts = build(cfg, kind)
    steps = {"student": student_step, "teacher": teacher_forward, "distill": distill_step}
    names = list(steps)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % 3 :] + names[: r % 3]  # rotate who goes first
        for name in order:
            start = clock()
            steps[name](parts)
            end = clock()
            if r >= warmup:
                times[name].append((end[0] - start[0], end[1] - start[1]))
    result: dict[str, float] = {}
    for measure_index, label in ((1, "cpu"), (0, "wall")):
        ratios = [
            d[measure_index] / (s[measure_index] + t[measure_index])
            for s, t, d in zip(times["student"], times["teacher"], times["distill"], strict=True)
        ]
        result[f"ratio_{label}"] = statistics.median(ratios)
        for name in names:
            result[f"{name}_{label}"] = 1000 * statistics.median(
                x[measure_index] for x in times[name]
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--type", default="hard", choices=["hard", "soft"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # steps run without a Trainer

    rows = []
    for name in args.configs:
        cfg = CONFIGS[name]
        r = measure(cfg, args.type, args.rounds, args.warmup)
        verdict = "yes" if r["ratio_cpu"] <= GOAL else "no"
        rows.append(
            f"| {name} | {cfg.student} @ {cfg.img_size} px, {cfg.teacher} @ {cfg.teacher_size} px, "
            f"batch {cfg.batch} | {r['student_cpu']:.0f} | {r['teacher_cpu']:.0f} "
            f"| {r['distill_cpu']:.0f} | {r['ratio_cpu']:.3f} | {r['ratio_wall']:.3f} | {verdict} |"
        )
        print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/distill_step.py", *sys.argv[1:]])
    text = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine()}; {args.threads} torch thread(s); distillation type {args.type}.",
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
            f"Medians over {args.rounds} rounds (after {args.warmup} warm-up rounds) of CPU time "
            "per step in ms; the ratio is distill / (student + teacher) per round, goal <= "
            f"{GOAL:.2f}. What is compared is in the script's docstring.",
            "",
            "| config | models | student step | teacher forward | distillation step "
            "| ratio (CPU) | ratio (wall) | within goal |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
