"""Does DeiT distillation from a CNN help a ViT with few labels? Digits, 10% of the labels.

1. `vittune finetune recipes/digits_teacher_cnn.yaml`: a small CNN (timm's test_resnet) learns
   from 143 labelled digits at 16 px.
2. `vittune distill recipes/digits_deit.yaml` with the same 143 labels, the same recipe, seed
   and epochs, once per distillation type: `none` (the baseline: no teacher, both heads learn
   the labels), `hard` and `soft`. The student is a 6-block distilled DeiT-Tiny at 32 px.

The students run at the same time, one torch thread each, so that load from other processes
hits every arm alike. The table reports validation top-1 at the last epoch (no selection) and
at the best epoch, each head's top-1 at the last epoch, and the teacher's top-1 on the
student's batches; `--write` also updates the section of benchmarks/RESULTS.md.

    python benchmarks/distill_experiment.py                 # about 10 min on 2 busy CPU cores
    python benchmarks/distill_experiment.py --seeds 0 1 --write
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## DeiT distillation on digits (10% of the labels)"
VITTUNE = shutil.which("vittune", path=str(Path(sys.executable).parent)) or "vittune"
TYPES = ("none", "hard", "soft")


def launch(command: str, recipe: str, name: str, overrides: list[str], work: Path, threads: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    env.pop("VITTUNE_RUN_DIR", None)
    log = (work / f"{name}.log").open("w")
    argv = [VITTUNE, command, str(REPO / "recipes" / recipe), *overrides, f"logging.name={name}"]
    return subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, name: str, work: Path) -> None:
    if process.wait() != 0:
        tail = (work / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{name} failed:\n" + "\n".join(tail))


def metrics(run: Path) -> dict[str, list[float]]:
    """Every logged value per key, in epoch order, from the run's CSV log."""
    values: dict[str, list[float]] = {}
    with (run / "csv" / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value:
                    values.setdefault(key, []).append(float(value))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=100)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="student seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep runs here")
    parser.add_argument(
        "--teacher-run", type=Path, default=None, help="reuse this teacher run (skip step 1)"
    )
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="distill-digits-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["logging.wandb=false", "data.num_workers=0"]
    start = time.time()
    teacher_run = args.teacher_run or work / "runs" / "teacher"
    if args.teacher_run is None:
        teacher = launch(
            "finetune",
            "digits_teacher_cnn.yaml",
            "teacher",
            [*common, f"trainer.max_epochs={args.teacher_epochs}", "trainer.seed=0"],
            work,
            args.threads,
        )
        wait(teacher, "teacher", work)
    teacher_s = time.time() - start

    start = time.time()
    arms = {}
    for seed in args.seeds:
        for kind in args.types:
            name = f"student-{kind}-seed{seed}"
            overrides = [
                *common,
                f"trainer.max_epochs={args.student_epochs}",
                f"trainer.seed={seed}",
                f"distill.type={kind}",
                f"distill.teacher.pretrained={teacher_run.resolve()}",
            ]
            arms[name] = launch("distill", "digits_deit.yaml", name, overrides, work, args.threads)
    for name, process in arms.items():
        wait(process, name, work)
    student_s = time.time() - start

    teacher_values = metrics(teacher_run)
    rows = [
        f"| CNN teacher (test_resnet, 16 px) | {len(teacher_values['val/acc1'])} "
        f"| {teacher_values['val/acc1'][-1]:.3f} | {max(teacher_values['val/acc1']):.3f} | | | |"
    ]
    summary: dict[str, list[float]] = {}
    for kind in args.types:
        for seed in args.seeds:
            values = metrics(work / "runs" / f"student-{kind}-seed{seed}")
            last, best = values["val/acc1"][-1], max(values["val/acc1"])
            summary.setdefault(kind, []).append(last)
            heads = [values.get(k, [float("nan")])[-1] for k in ("val/acc1_cls", "val/acc1_dist")]
            teacher_acc = values.get("val/acc1_teacher", [float("nan")])[-1]
            label = f"DeiT-Tiny, distill.type={kind}" + (
                f", seed {seed}" if len(args.seeds) > 1 else ""
            )
            cells = [f"{v:.3f}" if v == v else "" for v in (*heads, teacher_acc)]
            rows.append(
                f"| {label} | {args.student_epochs} | {last:.3f} | {best:.3f} | {' | '.join(cells)} |"
            )
    table = [
        "| model | epochs | val top-1, last epoch | val top-1, best epoch "
        "| class head, last | distillation head, last | teacher on the student's batches |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    means = ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in summary.items())
    command = " ".join(["python benchmarks/distill_experiment.py", *sys.argv[1:]])
    text = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine()}; {args.threads} torch thread(s) per run, students side by side.",
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
            f"143 labelled training images (10%), validation on 20% of the digits (359 images). "
            f"Teacher {teacher_s / 60:.1f} min, {len(arms)} students {student_s / 60:.1f} min "
            f"(wall, together). Mean last-epoch top-1 per type: {means}.",
            "",
            *table,
            "",
        ]
    )
    print(text)
    print(f"runs in {work}")
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
