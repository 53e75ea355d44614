"""Training throughput: images/s, ms per step, MFU and peak memory, with and without compile.

For each model configuration, five measurements, each in a fresh subprocess (so that peak
memory, compiled graphs and allocator state belong to that measurement alone):

- **plain**: timm model, cross-entropy, backward, AdamW step, in a hand-written loop, on
  batches already on the device (the reference: what the hardware gives without vittune);
- **vittune, device batches**: the task and Trainer vittune builds (`assembly.build` with an
  image-less class list, `build_trainer`), fed the same kind of device-resident batches;
- **vittune, DataLoader**: `assembly.build` over a generated JPEG folder, so vittune's real
  `ImageDataModule` decodes, random-resized-crops and flips every image;
- each vittune side with `trainer.compile` off and on.

Same model, batch and precision everywhere: bf16-mixed on a GPU, fp32 on the CPU. A step is
timed from the start of one training step to the start of the next (batch fetching and every
hook count), after untimed warm-up steps (which absorb compilation); on a GPU the clock reads
after `torch.cuda.synchronize()`. FLOPs per step come from `torch.utils.flop_counter.
FlopCounterMode` on one forward + backward of the model (on the meta device, attention through
the math SDPA path so that its matmuls count; element-wise work is not counted, as usual for
MFU). MFU = FLOPs per step / s per step / peak: the GPU's dense bf16 peak from a table, on the
CPU a measured fp32 matmul rate with the same torch threads (or `--peak-tflops`).

    python benchmarks/throughput.py                      # CPU: a small ViT at 64 px
    python benchmarks/throughput.py --configs vit_small vit_base   # the default with CUDA
    python benchmarks/throughput.py --write              # ... and update RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)

SECTION = "## Training throughput and torch.compile"
LR, WEIGHT_DECAY = 1e-3, 0.05
# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
WORKERS = {"cpu": 1, "cuda": 8}  # DataLoader processes: one spare core here, plenty on a GPU host
SIDES = (  # (name, batches, compiled)
    ("plain timm + torch", "device", False),
    ("vittune", "device", False),
    ("vittune", "device", True),
    ("vittune", "loader", False),
    ("vittune", "loader", True),
)


@dataclass(frozen=True)
class Config:
    label: str
    name: str
    img_size: int
    patch_size: int
    batch: int
    warmup: int  # untimed steps (compilation happens in the first)
    steps: int  # timed steps
    source_px: tuple[int, int]  # generated JPEG sides, drawn in this range
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10


CONFIGS = {
    "cpu_small": Config(
        "ViT width 192, depth 4, 64 px / patch 8, batch 16", "vit_tiny_patch16_224", 64, 8, 16,
        warmup=3, steps=30, source_px=(72, 96), kwargs={"depth": 4},
    ),
    "vit_small": Config(
        "vit_small_patch16_224, 224 px, batch 128", "vit_small_patch16_224", 224, 16, 128,
        warmup=10, steps=30, source_px=(256, 320),
    ),
    "vit_base": Config(
        "vit_base_patch16_224, 224 px, batch 128", "vit_base_patch16_224", 224, 16, 128,
        warmup=10, steps=30, source_px=(256, 320),
    ),
}  # fmt: skip


def create_model(cfg: Config) -> torch.nn.Module:
    import timm  # noqa: PLC0415

    return timm.create_model(
        cfg.name,
        num_classes=cfg.num_classes,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        **cfg.kwargs,
    )


def step_flops(cfg: Config) -> int:
    """FLOPs of one training forward + backward of a batch, counted on the meta device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with torch.device("meta"):
        model = create_model(cfg)
        images = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size)  # [B, 3, H, W]
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(images).sum().backward()
    return counter.get_total_flops()


def peak_flops(device: str, override: float | None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from)."""
    if override:
        return override * 1e12, "given with --peak-tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 data-sheet peak"
        return math.nan, f"{name}: unknown peak (give --peak-tflops)"
    # Process CPU time, best of 5: with one thread it is compute time, which other jobs on a
    # shared machine do not inflate (the wall clock there measures them too).
    n, reps, best = 2048, 5, math.inf
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    for _ in range(5):
        start = time.process_time()
        for _ in range(reps):
            a @ b
        best = min(best, time.process_time() - start)
    rate = 2 * n**3 * reps / best
    threads = torch.get_num_threads()
    return rate, f"measured fp32 {n}x{n} matmul, {threads} thread(s): {rate / 1e9:.1f} GFLOP/s"


def write_jpegs(folder: Path, cfg: Config, count: int, seed: int = 0) -> None:
    """`count` natural-looking JPEGs (smoothed noise: blobs at several scales) in class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(s) for s in rng.integers(*cfg.source_px, size=2, endpoint=True))
        image = np.zeros((h, w, 3), np.float32)
        for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):  # coarse to fine structure
            noise = rng.standard_normal((cells, cells, 3)).astype(np.float32)
            image += weight * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        image = cv2.GaussianBlur(image, (0, 0), 1.0) + 0.1 * rng.standard_normal(image.shape)
        pixels = np.clip(128 + 50 * image, 0, 255).astype(np.uint8)
        path = folder / f"class{i % cfg.num_classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])


# --- one measurement, in its own process ---------------------------------------------------


class Clock:
    """Wall and CPU time at the start of chosen steps; the GPU is synchronised first."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.marks: dict[int, tuple[float, float]] = {}
        self.wanted = {0, 1, cfg.warmup, cfg.warmup + cfg.steps}
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.count = 0

    def tick(self) -> None:
        if self.count in self.wanted:
            self.sync()
            self.marks[self.count] = (time.perf_counter(), time.process_time())
        self.count += 1


def device_batches(cfg: Config, device: str, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    size = (cfg.batch, 3, cfg.img_size, cfg.img_size)
    return [
        (
            torch.randn(size, generator=g).to(device),  # [B, 3, H, W], already normalised
            torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device),  # [B]
        )
        for _ in range(n)
    ]


def run_plain(cfg: Config, device: str, bf16: bool) -> Clock:
    model = create_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches, clock = device_batches(cfg, device), Clock(cfg, device)
    for i in range(cfg.warmup + cfg.steps + 1):
        clock.tick()
        images, labels = batches[i % len(batches)]
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return clock


class DeviceBatches:
    """An endless-enough iterable of the same few device-resident batches, for `trainer.fit`."""

    def __init__(self, batches: list, length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def run_vittune(
    cfg: Config, device: str, bf16: bool, batches: str, compiled: bool, data: Path
) -> Clock:
    from lightning.pytorch.callbacks import Callback  # noqa: PLC0415

    from vittune.data.datasets import SplitSamples  # noqa: PLC0415
    from vittune.recipe.schema import Recipe  # noqa: PLC0415
    from vittune.tasks.assembly import build  # noqa: PLC0415
    from vittune.training.trainer import build_trainer, monitor_of  # noqa: PLC0415

    total = cfg.warmup + cfg.steps + 1
    workers = 0 if batches == "device" else WORKERS[device]
    model = dict(name=cfg.name, pretrained=False, img_size=cfg.img_size, kwargs=dict(cfg.kwargs))
    clock = Clock(cfg, device)

    class Tick(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.tick()

    with tempfile.TemporaryDirectory(prefix="vittune-throughput-") as tmp:
        recipe = Recipe.model_validate(
            {
                "model": model | {"patch_size": cfg.patch_size},
                "data": {"root": str(data), "batch_size": cfg.batch, "num_workers": workers},
                "augment": {"preset": "light"},  # random-resized crop + flip
                "optim": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
                "schedule": {"name": "constant"},
                "trainer": {
                    "accelerator": "gpu" if device == "cuda" else "cpu",
                    "devices": 1,
                    "precision": "bf16-mixed" if bf16 else "32-true",
                    "max_epochs": 1,
                    "max_steps": total,
                    "limit_val_batches": 0,
                    "compile": compiled,
                },
                "logging": {"wandb": False, "run_dir": tmp, "name": "bench"},
            }
        )
        run_dir = Path(tmp) / "bench"
        run_dir.mkdir()
        classes = [f"class{i}" for i in range(cfg.num_classes)]
        found = SplitSamples.classes_only(classes) if batches == "device" else None
        assembly = build(recipe, "finetune", run_dir, found=found)
        task = assembly.task
        trainer, _, _ = build_trainer(recipe, run_dir, monitor_of(recipe, task), [Tick()])
        if batches == "device":
            trainer.fit(task, train_dataloaders=DeviceBatches(device_batches(cfg, device), total))
        else:
            trainer.fit(task, datamodule=assembly.datamodule)
    return clock


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    cfg = CONFIGS[args.config]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.side == "plain timm + torch":
        clock = run_plain(cfg, device, bf16)
    else:
        clock = run_vittune(cfg, device, bf16, args.batches, args.compiled, Path(args.data))
    start, end = clock.marks[cfg.warmup], clock.marks[cfg.warmup + cfg.steps]
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {
        "wall": (end[0] - start[0]) / cfg.steps,
        "cpu": (end[1] - start[1]) / cfg.steps,
        "first": clock.marks[1][0] - clock.marks[0][0],
        "memory_mib": memory,
    }


# --- the table -----------------------------------------------------------------------------


def measure_config(
    cfg_name: str, args: argparse.Namespace, data: Path, cache: Path
) -> list[dict[str, Any]]:
    """Each side in its own process; the compiled ones share one fresh inductor cache, so the
    first compiled side pays a cold compilation and the second finds its kernels cached."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    runs: dict[int, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        order = list(enumerate(SIDES))
        for i, (side, batches, compiled) in order if repeat % 2 == 0 else reversed(order):
            command = [sys.executable, __file__, "--one", cfg_name, "--side", side]
            command += ["--batches", batches, "--data", str(data), "--threads", str(args.threads)]
            command += ["--compiled"] if compiled else []
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{side}, {batches}, compile {compiled}:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(i, []).append(result)
            print(
                f"[{cfg_name}] repeat {repeat + 1}: {side}, {batches} batches, compile"
                f" {'on' if compiled else 'off'}: {result['wall'] * 1e3:.1f} ms/step,"
                f" first step {result['first']:.1f} s",
                flush=True,
            )
    clock = time_basis(args.threads)
    rows = []
    plain = [r[clock] for r in runs[0]]
    for i, (side, batches, compiled) in enumerate(SIDES):
        wall = statistics.median(r["wall"] for r in runs[i])
        rows.append(
            {
                "side": side,
                "batches": batches,
                "compiled": compiled,
                "wall": wall,
                "cpu": statistics.median(r["cpu"] for r in runs[i]),
                "first": max(r["first"] for r in runs[i]),  # the cold-cache compile
                "memory_mib": max(r["memory_mib"] for r in runs[i]),
                "vs_plain": statistics.median(
                    p / r[clock] for p, r in zip(plain, runs[i], strict=True)
                ),
            }
        )
    return rows


def time_basis(threads: int) -> str:
    """On a CPU with one torch thread, process CPU time: what other jobs on a shared machine
    disturb least (it sums all threads, so with more of them the wall clock it is)."""
    return "cpu" if not torch.cuda.is_available() and threads == 1 else "wall"


def table(
    cfg: Config, rows: list[dict[str, Any]], flops: int, peak: float, cpu: bool, basis: str
) -> str:
    memory = "peak RSS MiB" if cpu else "peak GPU MiB"
    lines = [
        f"**{cfg.label}** ({flops / 1e9:.2f} GFLOP per step, forward + backward)",
        "",
        f"| side | batches | compile | images/s | ms/step | CPU ms/step | first step s | MFU | {memory} | speed vs plain |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = flops / r[basis] / peak
        lines.append(
            f"| {r['side']} | {'device-resident' if r['batches'] == 'device' else 'DataLoader (JPEG)'}"
            f" | {'on' if r['compiled'] else 'off'} | {cfg.batch / r['wall']:.1f}"
            f" | {r['wall'] * 1e3:.1f} | {r['cpu'] * 1e3:.1f} | {r['first']:.1f}"
            f" | {mfu * 100:.1f} % | {r['memory_mib']:.0f} | {r['vs_plain']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    default = ["vit_small", "vit_base"] if gpu else ["cpu_small"]
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=default)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU runs)")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU, in TFLOP/s")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    if args.one:  # a worker: one measurement, its numbers as the last line
        args.config = args.one
        print(json.dumps(measure_one(args)))
        return

    torch.set_num_threads(args.threads)
    peak, peak_note = peak_flops("cuda" if gpu else "cpu", args.peak_tflops)
    parts = []
    for name in args.configs:
        cfg = CONFIGS[name]
        with tempfile.TemporaryDirectory(prefix="vittune-throughput-") as tmp:
            # enough training images that the timed steps never cross an epoch end (10 % val)
            count = math.ceil((cfg.warmup + cfg.steps + 2) * cfg.batch / 0.9)
            write_jpegs(Path(tmp) / "jpegs", cfg, count)
            rows = measure_config(name, args, Path(tmp) / "jpegs", Path(tmp) / "inductor")
        parts.append(table(cfg, rows, step_flops(cfg), peak, not gpu, time_basis(args.threads)))
    precision = "bf16-mixed" if gpu else f"fp32, {args.threads} torch thread(s)"
    notes = (
        f"Precision: {precision}. Peak for MFU: {peak_note}. FLOPs: FlopCounterMode, one forward"
        " + backward (matmuls and attention; element-wise work not counted). ms/step: median"
        f" over {args.repeats} repeat(s), each a fresh process, of the mean of the timed steps"
        " after the warm-up; first step s (the slowest repeat) includes compilation: a cold inductor"
        " cache for the first compiled process, a warm one for later ones. MFU and speed vs plain (the"
        " plain loop's time per step / this row's) use"
        f" {'CPU' if time_basis(args.threads) == 'cpu' else 'wall'} time. Peak memory: "
        + (
            "torch.cuda.max_memory_allocated."
            if gpu
            else "the process's RSS high-water mark (Python, libraries and compiled code"
            " included; DataLoader workers not)."
        )
    )
    text = "\n\n".join(parts) + "\n\n" + notes
    print("\n" + text)
    if args.write:
        flags = (
            f"--configs {' '.join(args.configs)} --repeats {args.repeats} --threads {args.threads}"
        )
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {machine()}.\nDate: {time.strftime('%Y-%m-%d')}. Command:"
            f" `python benchmarks/throughput.py {flags}`.\n\n{text}",
        )
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
