"""Parameter-efficient transfer, measured: a source ViT trained here on one labelled set,
transferred to another with every method of `peft:` (plus full fine-tuning and a linear probe).
(Not named peft.py: run as a script, that name would shadow the peft package it imports.)

- **source**: a 4-block, 96-wide ViT (8 px patches on 32 px images: 16 tokens) trained from
  scratch on scikit-learn's digits 0-4.
- **target**: digits 5-9 (other classes, never seen by the source), a stratified half to train
  on and the other half as the test split. Each method trains from the source weights with a new
  head, AdamW, cosine schedule, the same epochs and batch; 3 seeds (head init, order).
- per method: top-1 on the target's test half (mean and spread over seeds), trained parameters,
  the adapter's file size (`save_adapter`; full fine-tuning: the whole model; probe: the head),
  peak process RSS (each run in a forked child, its peak reset at the start with
  /proc/self/clear_refs), median training step time.
- **ViT-B/16 at 224 px**: peak RSS and step time of full fine-tuning vs LoRA vs SSF on
  synthetic batches (CPU: RSS; a GPU would report max_memory_allocated).

The adapters are vittune's own (`vittune.models.adapters.apply_peft`) and so are the parameter
groups (`build_param_groups`); the loop is a plain PyTorch loop, so that Lightning's per-step
cost (benchmarks/overhead.py) is not in the step times.

    python benchmarks/peft_transfer.py            # ~10 min on 2 busy cores
    python benchmarks/peft_transfer.py --write    # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from results_md import machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vittune.models.adapters import apply_peft, save_adapter
from vittune.optim.param_groups import build_optimizer, build_param_groups
from vittune.recipe.schema import OptimConfig, PeftConfig

ARCH = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, in_chans=1)
# lr per method: adapters and probes take larger steps than full fine-tuning (usual practice)
METHODS: dict[str, float] = {
    "full": 5e-4,
    "linear_probe": 1e-2,
    "lora": 3e-3,
    "dora": 3e-3,
    "ia3": 1e-2,
    "vpt": 1e-2,
    "vpt_deep": 1e-2,
    "ssf": 5e-3,
    "bitfit": 5e-3,
}
SEEDS = (0, 1, 2)


def digits(classes: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of `classes` as [N, 1, 32, 32] floats (8x8 upscaled, bilinear), labels 0..k-1."""
    data = load_digits()
    keep = np.isin(data.target, list(classes))
    images = torch.tensor(data.images[keep], dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target[keep] - classes.start)
    return images, labels


def step_time_loop(model, images, labels, lr, epochs, batch, seed) -> list[float]:
    """Train `model` in place (AdamW, cosine); returns the wall time of each step."""
    cfg = OptimConfig(name="adamw", lr=lr, weight_decay=0.05)
    optimizer = build_optimizer(build_param_groups(model, cfg, lr), cfg, lr)
    steps = epochs * math.ceil(len(images) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            index = order[start : start + batch]
            began = time.perf_counter()
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            times.append(time.perf_counter() - began)
    return times


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return float((model(images).argmax(-1) == labels).float().mean())


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # VmHWM := current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(method: str, source: dict[str, torch.Tensor], classes: int, seed: int):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=classes, **ARCH)
    state = {k: v for k, v in source.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    if method == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head."))
    elif method != "full":
        apply_peft(model, PeftConfig(method=method, prompt_tokens=4))
    return model


def adapter_bytes(model, method: str) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if method in ("full", "linear_probe"):
            keep = {n: p for n, p in model.state_dict().items()}
            if method == "linear_probe":
                keep = {n: p for n, p in keep.items() if n.startswith("head.")}
            save_file({k: v.contiguous() for k, v in keep.items()}, f"{folder}/w.safetensors")
        else:
            save_adapter(model, PeftConfig(method=method, prompt_tokens=4), Path(folder), "bench")
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def transfer_job(method: str, seed: int, args: argparse.Namespace, queue) -> None:
    """One (method, seed) run in a forked child: its own peak RSS."""
    torch.set_num_threads(1)
    reset_peak_rss()
    source = torch.load(args.source, weights_only=True)
    train_x, train_y, test_x, test_y = torch.load(args.target, weights_only=True)
    model = prepare(method, source, 5, seed)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = step_time_loop(model, train_x, train_y, METHODS[method], args.epochs, args.batch, seed)
    queue.put(
        {
            "method": method,
            "seed": seed,
            "top1": accuracy(model, test_x, test_y),
            "trained": trained,
            "total": sum(p.numel() for p in model.parameters()),
            "bytes": adapter_bytes(model, method),
            "rss": peak_rss_mb(),
            "step_ms": 1000 * statistics.median(times[3:]),
        }
    )


def vit_b_job(method: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    reset_peak_rss()
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    if method != "full":
        apply_peft(model, PeftConfig(method=method))
    images = torch.randn(args.vit_b_batch, 3, 224, 224)
    labels = torch.randint(0, 10, (args.vit_b_batch,))
    times = step_time_loop(model, images, labels, 1e-4, 3, args.vit_b_batch, 0)  # 3 steps
    queue.put(
        {
            "method": method,
            "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rss": peak_rss_mb(),
            "step_s": statistics.median(times[1:]),
        }
    )


def in_child(target, *args) -> dict[str, Any]:
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still running, unless it died
            if not child.is_alive():
                raise RuntimeError(f"{target} died with exit code {child.exitcode}") from None
    child.join()
    return result


def train_source(args: argparse.Namespace) -> float:
    images, labels = digits(range(0, 5))
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **ARCH)
    step_time_loop(model, train_x, train_y, 2e-3, args.source_epochs, args.batch, 0)
    torch.save(model.state_dict(), args.source)
    return accuracy(model, test_x, test_y)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | top-1 (mean ± sd, 3 seeds) | trained params | % of model | adapter file |"
        " peak RSS | step time |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        top1 = [100 * r["top1"] for r in mine]
        first = mine[0]
        lines.append(
            f"| {method} | {statistics.mean(top1):.1f} ± {statistics.pstdev(top1):.1f} |"
            f" {first['trained']:,} | {100 * first['trained'] / first['total']:.2f} % |"
            f" {first['bytes'] / 1024:.0f} KiB | {statistics.median(r['rss'] for r in mine):.0f} MB |"
            f" {statistics.median(r['step_ms'] for r in mine):.1f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vit-b-batch", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        args.source, args.target = f"{scratch}/source.pt", f"{scratch}/target.pt"
        source_top1 = in_child(lambda a, q: q.put(train_source(a)), args)
        images, labels = digits(range(5, 10))
        train_x, test_x, train_y, test_y = train_test_split(
            images, labels, test_size=0.5, stratify=labels, random_state=0
        )
        torch.save((train_x, train_y, test_x, test_y), args.target)
        print(f"source: digits 0-4, test top-1 {100 * source_top1:.1f}%", flush=True)
        rows = []
        for method in args.methods:
            for seed in SEEDS:
                rows.append(in_child(transfer_job, method, seed, args))
                print(rows[-1], flush=True)
    big = []
    for method in ("full", "lora", "ssf"):
        big.append(in_child(vit_b_job, method, args))
        print(big[-1], flush=True)
    minutes = (time.monotonic() - began) / 60
    for method in [m for m in METHODS if m not in args.methods]:
        del METHODS[method]  # the table lists what ran
    text = report(rows, big, source_top1, len(train_x), len(test_x), args, minutes)
    print(text)
    if args.write:
        write_section("PEFT transfer", text)


def report(rows, big, source_top1, n_train, n_test, args, minutes) -> str:
    vit_b = [
        f"| ViT-B/16 224 px, batch {args.vit_b_batch} | trained params | peak RSS | step time |",
        "|---|---|---|---|",
    ]
    for r in big:
        vit_b.append(
            f"| {r['method']} | {r['trained']:,} | {r['rss']:.0f} MB | {r['step_s']:.2f} s |"
        )
    return "\n".join(
        [
            "## PEFT transfer (benchmarks/peft_transfer.py)",
            "",
            f"Machine: {machine()}. The 2 cores were shared with 6 other engineers' jobs while"
            " this ran (wall-clock step times are contended; compare rows, not absolutes);"
            f" one torch thread per run; total {minutes:.1f} min.",
            "",
            f"Source: 4-block 96-wide ViT (16 tokens) trained from scratch on digits 0-4"
            f" ({args.source_epochs} epochs), its test top-1 {100 * source_top1:.1f} %. Target:"
            f" digits 5-9, {n_train} training / {n_test} test images, {args.epochs} epochs,"
            f" batch {args.batch}, AdamW + cosine, per-method lr {METHODS}. Peak RSS is the"
            " whole process's (torch itself is ~0.3 GB of it).",
            "",
            table(rows),
            "",
            "ViT-B/16 at 224 px on synthetic batches (3 steps, median of the last 2; AdamW):",
            "",
            *vit_b,
        ]
    )


if __name__ == "__main__":
    main()
