"""Wall time of `vittune finetune` against a plain timm + torch loop, on the same JPEG folder.

The goal: a `vittune finetune` run, decoding, validation and checkpoints included, takes at
most 1.05x the wall time of a hand-written timm loop (`plain_timm_loop.py`) on the same data,
epochs and model, and prints its first line (the run folder) within 4 s. Both sides run as subprocesses, timed from process start to exit, so Python
and library imports count; the imports alone are timed apart as well.

The data is generated here from a seed: per class a colour-tinted grating at a class-dependent
angle on smoothed noise, JPEGs of 64-96 px, written to `train/` and `val/` folders that both
sides read as their split. Both train the same timm ViT (fp32, CPU) with AdamW, a per-step
cosine schedule from the same lr, the same batch size and loader workers, random resized crop
(scale 0.5-1) and horizontal flip, validate every epoch and save weights every epoch (vittune:
its default best/last checkpoints and the export at the end; W&B off through the recipe).

Runs are paired: each repeat runs both sides back to back, alternating which goes first, and
the ratio is taken per repeat. Wall time and CPU time (user + sys of the child and its
loader workers, from `getrusage(RUSAGE_CHILDREN)`) are both recorded; on a machine shared with
other jobs, CPU time is the steadier of the two. Both sides run with one torch thread
(`OMP_NUM_THREADS=1`; `--threads 0` leaves torch's default, all cores): with two threads on a
loaded 2-core machine, runs took twice as long and both clocks scattered by 15 % and more.

    python benchmarks/end_to_end.py                  # 3 repeats, 3 epochs, 10 x 100 images
    python benchmarks/end_to_end.py --write          # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image
from results_md import RESULTS, machine, write_section  # (benchmarks/ is on sys.path)

SECTION = "## End to end: `vittune finetune` vs a plain timm loop"
SECTIONS = {
    "synthetic": SECTION,
    "digits": "## End to end on the digits: `vittune finetune` vs a plain timm loop",
}
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MEAN = STD = (0.5, 0.5, 0.5)
TARGET = 1.05  # the goal (issue 17): vittune's wall time at most 1.05x the plain loop's
NOISE = (
    "On a machine shared with other jobs, wall time mostly measures those jobs, and CPU time is"
    " disturbed too (torch's OpenMP threads spin while a sibling thread waits for a core):"
    " one torch thread per side (the default) keeps both steadier than torch's default of all cores."
)
IMPORTS = {  # what each side imports before its first line of work
    "python alone": "pass",
    "plain: torch, torchvision, timm": "import torch, torchvision, timm",
    "vittune: vittune.cli, vittune.training.run": "import vittune.cli, vittune.training.run",
    "vittune: the same and Lightning, collection paused as the CLI does": (
        "from vittune.training import collector; collector.pause();"
        " import vittune.cli, vittune.training.run, vittune.training.session; collector.resume()"
    ),
}
# Where `vittune finetune`'s start-up goes, step by step, in one fresh process (the order the
# run takes them): each step's seconds are printed as "step seconds".
STARTUP = """
import sys, time
from pathlib import Path
start = time.perf_counter()
def mark(step):
    global start
    now = time.perf_counter()
    print(step, f"{now - start:.3f}", flush=True)
    start = now
import vittune.cli
from vittune.training import collector
mark("import vittune.cli (typer)")
collector.pause()  # as the command does: no garbage collection during the imports
from vittune.recipe.load import load_recipe
recipe = load_recipe(sys.argv[1], [], command="finetune")
mark("load + check the recipe (imports timm, torch)")
import vittune.training.run
mark("import vittune.training.run (run folder, lock; the first line is printed here)")
import vittune.training.session
collector.resume()
mark("import vittune.training.session (Lightning, torchmetrics)")
from vittune.data.datamodule import scan_sources
found = scan_sources(recipe.data)
mark("scan the folder, check image headers")
from vittune.tasks.assembly import build
assembly = build(recipe, "finetune", found=found)
mark("build model, data module, task")
from vittune.training.trainer import build_trainer, monitor_of
build_trainer(recipe, Path(sys.argv[2]), monitor_of(recipe, assembly.task), [])
mark("build the Trainer")
"""
FAST_FAILS = {  # commands that should answer before the heavy imports
    "`vittune --version`": ["--version"],
    "`vittune evaluate runs/missing`": ["evaluate", "runs/missing"],
}


def time_startup(setup, repeats: int, env: dict[str, str], work: Path) -> dict[str, list[float]]:
    """Seconds of each start-up step (STARTUP), and of the commands that should fail fast."""
    recipe = work / "startup.yaml"
    recipe.write_text(yaml.safe_dump(setup.recipe(work / "runs", "startup"), sort_keys=False))
    steps: dict[str, list[float]] = {}
    for _ in range(repeats):
        run = timed(
            [sys.executable, "-c", STARTUP, str(recipe), str(work / "startup-run")], env, work
        )
        for _, line in run.lines:
            name, seconds = line.rsplit(" ", 1)
            steps.setdefault(name, []).append(float(seconds))
        steps.setdefault("whole process (to exit)", []).append(run.wall)
        for name, args in FAST_FAILS.items():
            command = [sys.executable, "-m", "vittune.cli", *args]
            steps.setdefault(name, []).append(timed(command, env, work, check=False).wall)
    return steps


def make_images(root: Path, classes: int, per_class: int, val_fraction: float, seed: int) -> None:
    """`root/{train,val}/class<k>/*.jpg`: a tinted grating whose angle and colour depend on the
    class, with random phase, period and size, on Gaussian-smoothed noise. Same seed, same files."""
    rng = np.random.default_rng(seed)
    n_val = max(1, round(per_class * val_fraction))
    for k in range(classes):
        hue = 2 * math.pi * k / classes
        tint = 0.5 + 0.5 * np.cos(hue + np.array([0.0, 2.0, 4.0]) * math.pi / 3)  # [3]
        for i in range(per_class):
            height, width = rng.integers(64, 97, size=2)
            y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # [H, W] each
            angle = math.pi * k / classes + rng.normal(0.0, 0.08)
            period = rng.uniform(8.0, 16.0)
            wave = np.sin(
                2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period
                + rng.uniform(0, 2 * math.pi)
            )  # [H, W]
            noise = cv2.GaussianBlur(
                rng.normal(0.0, 1.0, (height, width, 3)).astype(np.float32), (0, 0), 3.0
            )  # [H, W, 3], smooth blobs
            pixels = 0.5 + 0.3 * wave[..., None] * tint + 0.6 * noise  # [H, W, 3]
            folder = root / ("val" if i < n_val else "train") / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
            image.save(folder / f"{i:04d}.jpg", quality=90)


@dataclass
class Setup:
    """What both sides train: the same model, data, schedule and loader."""

    data: Path
    model: str
    img_size: int
    patch_size: int
    depth: int
    epochs: int
    batch_size: int
    workers: int
    lr: float = 1e-3
    weight_decay: float = 0.05
    drop_path: float = 0.1
    seed: int = 42
    in_chans: int = 3
    augment: bool = True  # random resized crop (scale 0.5-1) + flip; else a resize
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    clip: float = 0.0  # gradient-norm clip, 0: none

    def recipe(self, run_dir: Path, name: str) -> dict:
        mean, std = [MEAN[0]] * self.in_chans, [STD[0]] * self.in_chans
        trainer = {"max_epochs": self.epochs, "accelerator": "cpu", "devices": 1}
        trainer |= {"precision": "32-true", "seed": self.seed, "check_val_every_n_epoch": 1}
        if self.clip:
            trainer["gradient_clip_val"] = self.clip
        return {
            "model": {"name": self.model, "pretrained": False, "img_size": self.img_size}
            | {"patch_size": self.patch_size, "drop_path_rate": self.drop_path}
            | {"in_chans": self.in_chans, "kwargs": {"depth": self.depth}},
            "data": {"root": str(self.data), "batch_size": self.batch_size}
            | {"num_workers": self.workers, "mean": mean, "std": std},
            "augment": {"preset": "light" if self.augment else "none"},
            "loss": {"label_smoothing": self.label_smoothing},
            "optim": {"name": "adamw", "lr": self.lr, "weight_decay": self.weight_decay},
            "schedule": {"name": "cosine", "warmup_epochs": self.warmup_epochs},
            "trainer": trainer,
            "logging": {"wandb": False, "run_dir": str(run_dir), "name": name},
        }

    def plain_args(self, out: Path) -> list[str]:
        mean, std = [MEAN[0]] * self.in_chans, [STD[0]] * self.in_chans
        return [
            str(self.data), str(out), "--model", self.model,
            "--img-size", str(self.img_size), "--patch-size", str(self.patch_size),
            "--model-kwargs", f'{{"depth": {self.depth}}}', "--drop-path", str(self.drop_path),
            "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
            "--workers", str(self.workers), "--lr", str(self.lr),
            "--weight-decay", str(self.weight_decay), "--seed", str(self.seed),
            "--in-chans", str(self.in_chans), "--label-smoothing", str(self.label_smoothing),
            "--warmup-epochs", str(self.warmup_epochs), "--clip", str(self.clip),
            *([] if self.augment else ["--no-augment"]),
            "--mean", *map(str, mean), "--std", *map(str, std),
        ]  # fmt: skip


def make_digits(root: Path, seed: int) -> None:
    """scikit-learn's 1,797 8x8 digits as grey PNGs in `root/{train,val,test}/<digit>/`
    (70/15/15, a seeded shuffle): the quickstart's data, with a test split scored at the end.
    The PNGs are vittune's own export of the digits (`data.builtin: digits`), moved into split
    folders."""
    from vittune.data.builtin import export_digits

    exported = export_digits(root / "all")
    files = sorted(exported.glob("*/*.png"), key=lambda p: int(p.stem))  # <digit>/<index>.png
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = n_test = round(0.15 * len(files))
    for rank, index in enumerate(order):
        split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        source = files[index]
        folder = root / split / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        source.rename(folder / source.name)
    shutil.rmtree(exported)


def digits_setup(data: Path, epochs: int) -> Setup:
    """recipes/quickstart.yaml's model, loader and schedule (its digits run, issue 17)."""
    return Setup(
        data, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, epochs=epochs,
        batch_size=64, workers=1, drop_path=0.05, in_chans=1, augment=False,
        label_smoothing=0.1, warmup_epochs=1, clip=1.0,
    )  # fmt: skip


@dataclass
class Run:
    """One subprocess: wall and CPU seconds, and when (seconds after start) each line came."""

    wall: float
    cpu: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def at(self, prefix: str, last: bool = False) -> float:
        times = [t for t, line in self.lines if line.startswith(prefix)]
        if not times:
            raise RuntimeError(f"no line starting with {prefix!r} in the output")
        return times[-1] if last else times[0]


def child_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> Run:
    """Run `command` to its end; wall time from just before the fork to its exit, CPU time of
    the child and every process it waited for (its DataLoader workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
        code = proc.wait()
        wall = time.perf_counter() - start
        if code != 0 and check:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command[:4])} ... exited {code}:\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, lines)


def run_vittune(setup: Setup, work: Path, name: str, env: dict[str, str]) -> tuple[Run, float]:
    """`vittune finetune` through its CLI module; (the run, its last val/acc1)."""
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(setup.recipe(work / "runs", name), sort_keys=False))
    command = [sys.executable, "-m", "vittune.cli", "finetune", str(recipe)]
    run = timed(command, env, work)
    rows = (work / "runs" / name / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("val/acc1")
    accuracy = [float(c[column]) for c in (r.split(",") for r in rows[1:]) if c[column]][-1]
    shutil.rmtree(work / "runs" / name)
    return run, accuracy


def run_plain(setup: Setup, work: Path, name: str, env: dict[str, str]) -> tuple[Run, float]:
    out = work / name
    command = [sys.executable, str(HERE / "plain_timm_loop.py"), *setup.plain_args(out)]
    run = timed(command, env, work)
    accuracy = float(next(line for _, line in run.lines if line.startswith("final")).split()[-1])
    shutil.rmtree(out)
    return run, accuracy


# Lines that mark the end of start-up (data, model and Trainer built) and of the last epoch.
MARKS = {"vittune": ("  data: ", "epoch "), "plain": ("ready", "epoch ")}
FIRST_LINE = "vittune finetune: run folder"  # vittune's first line, before Lightning is imported
SIDES = {"vittune": run_vittune, "plain": run_plain}


def phases(run: Run, side: str) -> tuple[float, float, float]:
    """(start-up, epochs, finish) seconds: to the ready line, to the last epoch line, to exit."""
    ready, last = run.at(MARKS[side][0]), run.at(MARKS[side][1], last=True)
    return ready, last - ready, run.wall - last


def time_imports(repeats: int, env: dict[str, str], work: Path) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, code in IMPORTS.items():
            runs[name].append(timed([sys.executable, "-c", code], env, work))
    return runs


def med(values: list[float]) -> float:
    return statistics.median(values)


def startup_table(steps: dict[str, list[float]]) -> str:
    lines = [
        "Start-up of `vittune finetune`, step by step in one process, and commands that should"
        " answer before the heavy imports (medians, seconds):",
        "",
        "| step | wall s |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {med(values):.2f} |" for name, values in steps.items()]
    return "\n".join(lines)


def tables(results: dict[str, list[tuple[Run, float]]], imports: dict[str, list[Run]]) -> list[str]:
    ours, plain = ([r for r, _ in results[s]] for s in ("vittune", "plain"))
    walls = [o.wall / p.wall for o, p in zip(ours, plain, strict=True)]  # per repeat
    cpus = [o.cpu / p.cpu for o, p in zip(ours, plain, strict=True)]
    lines = [
        "| side | wall s | CPU s | final val top-1 | ratio vittune / plain, wall | ratio, CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side, runs in (("plain timm loop", plain), ("`vittune finetune`", ours)):
        accuracy = [a for _, a in results["vittune" if runs is ours else "plain"]]
        row = f"| {side} | {med([r.wall for r in runs]):.1f} | {med([r.cpu for r in runs]):.1f} "
        row += f"| {med(accuracy):.3f} ({min(accuracy):.3f} - {max(accuracy):.3f}) "
        if runs is ours:
            row += f"| **{med(walls):.3f}** ({min(walls):.3f} - {max(walls):.3f}) "
            row += f"| {med(cpus):.3f} ({min(cpus):.3f} - {max(cpus):.3f}) |"
        else:
            row += "| | |"
        lines.append(row)

    split = [
        "Where the wall time goes (medians, seconds):",
        "",
        "| side | first line (vittune: the run folder) | start-up (to data + model + Trainer"
        " ready) | epochs (train, validation, checkpoints) | finish (after the last epoch: export,"
        " exit) |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, runs in (("plain timm loop", plain), ("`vittune finetune`", ours)):
        parts = [phases(r, "vittune" if runs is ours else "plain") for r in runs]
        first = f"{med([r.at(FIRST_LINE) for r in runs]):.1f}" if runs is ours else ""
        split.append(
            f"| {side} | {first} | "
            + " | ".join(f"{med(p):.1f}" for p in zip(*parts, strict=True))
            + " |"
        )

    importing = [
        "Imports alone (`python -c`, medians):",
        "",
        "| imports | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    for name, runs in imports.items():
        importing.append(
            f"| {name} | {med([r.wall for r in runs]):.2f} | {med([r.cpu for r in runs]):.2f} |"
        )
    verdict = (
        f"Target: wall ratio at most {TARGET}. Median wall ratio {med(walls):.3f}"
        f" ({'within' if med(walls) <= TARGET else 'over'} the target), worst repeat"
        f" {max(walls):.3f}; median CPU ratio {med(cpus):.3f}. {NOISE}"
    )
    return ["\n".join(lines), verdict, "\n".join(split), "\n".join(importing)]


def installed_extras() -> str:
    """Which install ran: torchmetrics (imported by Lightning) also imports `transformers`
    whenever it is installed, as the `peft` extra does: about 0.9 s more start-up."""
    if importlib.util.find_spec("transformers") is None:
        return "Installed without the `peft` extra (no `transformers`), as `make demo` installs."
    return (
        "Installed with `transformers` (the `peft` extra): torchmetrics imports it with"
        " Lightning, about 0.9 s of start-up that the default install does not pay."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="paired runs of both sides (0: start-up only)"
    )
    parser.add_argument(
        "--data",
        choices=["synthetic", "digits"],
        default="synthetic",
        help="generated JPEGs (the options below), or the digits with the quickstart's model",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=100, help="images per class, train + val")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS (torch threads) for both sides; 0 leaves it unset (all cores)",
    )
    parser.add_argument("--import-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="of the generated images")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()

    env = child_env(args.threads)
    results: dict[str, list[tuple[Run, float]]] = {side: [] for side in SIDES}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="vittune-e2e-") as tmp:
        work = Path(tmp)
        if args.data == "digits":
            make_digits(work / "data", args.seed)
            setup = digits_setup(work / "data", args.epochs)
        else:
            make_images(work / "data", args.classes, args.images, args.val_fraction, args.seed)
            setup = Setup(
                work / "data", args.model, args.img_size, args.patch_size, args.depth,
                args.epochs, args.batch_size, args.workers,
            )  # fmt: skip
        imports = time_imports(args.import_repeats, env, work)  # also warms the file cache
        startup = time_startup(setup, args.import_repeats, env, work)
        for repeat in range(args.repeats):
            order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
            for side in order:
                results[side].append(SIDES[side](setup, work, f"{side}{repeat}", env))
                loads.append(os.getloadavg()[0])
            ours, plain = results["vittune"][-1][0], results["plain"][-1][0]
            print(
                f"repeat {repeat + 1}/{args.repeats} ({' first, '.join(order)} second): wall"
                f" {ours.wall:.1f} s vs {plain.wall:.1f} s, CPU {ours.cpu:.1f} s vs"
                f" {plain.cpu:.1f} s (vittune vs plain)",
                flush=True,
            )
    parts = [*(tables(results, imports) if args.repeats else []), startup_table(startup)]
    n_train = args.images - max(1, round(args.images * args.val_fraction))
    data = (
        f"{args.classes} classes x {n_train} train + {args.images - n_train} val JPEGs (64-96 px),"
        " random resized crop + flip"
        if args.data == "synthetic"
        else "the 1,797 digits as 8x8 grey PNGs, 70/15/15 train/val/test folders (test scored"
        " at the end with the best weights; vittune also writes its test report and export),"
        " no augmentation, label smoothing 0.1, 1 warm-up epoch, gradient clip 1.0"
    )
    described = (
        f"{setup.model} with {setup.depth} blocks at {setup.img_size} px / patch"
        f" {setup.patch_size}, {setup.in_chans} input channel(s), {data}, {args.epochs} epochs,"
        f" batch {setup.batch_size}, {setup.workers} loader worker(s), fp32 on CPU,"
        f" OMP_NUM_THREADS {args.threads or 'unset'}; {args.repeats} paired repeats."
        f" Load average (1 min) during the runs: {min(loads):.1f} - {max(loads):.1f}."
        f" {installed_extras()}"
    )
    print(f"\n{described}\n\n" + "\n\n".join(parts))
    if args.write:
        # the digits case fixes the model and data (digits_setup): its flags would mislead
        synthetic_only = {"classes", "images", "val_fraction", "model", "depth", "img_size"}
        synthetic_only |= {"patch_size", "batch_size", "workers"}
        flags = " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k != "write"
            and v is not None
            and not (args.data == "digits" and k in synthetic_only)
        )
        write_section(
            SECTIONS[args.data],
            f"{SECTIONS[args.data]}\n\nMachine: {machine()}.\nDate: {time.strftime('%Y-%m-%d')}. Command:"
            f" `python benchmarks/end_to_end.py {flags}`.\n\n{described}\n\n" + "\n\n".join(parts),
        )
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
