"""`vittune serve` under load: requests/s and latency percentiles at several concurrencies.

Question: how many requests per second does `vittune serve` answer, and how long does a client
wait, with and without dynamic batching, in PyTorch, ONNX and int8, beside `vittune predict`
over the same images (images/s)?

Loopback only and bounded: each cell sends at most `--requests` requests (and stops issuing new
ones after `--max-seconds`), at concurrency 1, 8, 32 and 64, from an httpx async client in
this process. Every server is the real console script (`vittune serve RUN`) started in a
subprocess and stopped with SIGTERM. Without `--run`, a small ViT run is trained first on
generated images (vit_tiny at 112 px, one epoch: the numbers are about serving, not accuracy).

    .venv/bin/python benchmarks/serve.py --write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_md import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VITTUNE = str(Path(sys.executable).with_name("vittune"))
SECTION = "Serving: `vittune serve` under load"
# (label, extra `vittune serve` arguments)
SERVERS = [
    ("torch, no batching", ["--max-batch-size", "1"]),
    ("torch, batching", []),
    ("onnx, batching", ["--format", "onnx"]),
    ("onnx int8, batching", ["--format", "onnx", "--int8"]),
    ("torch int8, batching", ["--int8"]),
]
MODEL = [
    "model.name=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.img_size=112",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "logging.wandb=false",
    "logging.name=bench",
]


def one_thread_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
    }


def make_images(folder: Path, classes: int = 3, per_class: int = 64, size: int = 112) -> list[Path]:
    """Striped colour PNGs, one angle per class (a learnable toy set)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    paths = []
    for c in range(classes):
        wave = np.cos(np.pi * c / classes) * cols + np.sin(np.pi * c / classes) * rows
        for k in range(per_class):
            grey = 0.5 + 0.35 * np.sin(2 * np.pi * wave / 9 + rng.uniform(0, 2 * np.pi))
            pixels = np.clip(grey[..., None] + rng.normal(0, 0.08, (size, size, 3)), 0, 1)
            path = folder / f"c{c}" / f"{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), (pixels * 255).astype(np.uint8))
            paths.append(path)
    return paths


def train_run(work: Path) -> Path:
    make_images(work / "data")
    recipe = work / "r.yaml"
    recipe.write_text(f"data:\n  root: {work / 'data'}\n")
    command = [VITTUNE, "finetune", str(recipe), *MODEL]
    subprocess.run(command, cwd=work, env=one_thread_env(), check=True, capture_output=True)
    return work / "runs" / "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(run: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [VITTUNE, "serve", str(run), "--port", str(port), *args],
            cwd=log.parent,
            env=one_thread_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"vittune serve did not start:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


async def load(url: str, bodies: list[bytes], concurrency: int, count: int, seconds: float):
    """(latencies in s of the 200 answers, errors, wall seconds) for `count` requests."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    issued = 0
    start = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < count and time.perf_counter() - start < seconds:
            body = bodies[issued % len(bodies)]
            issued += 1
            sent = time.perf_counter()
            try:
                response = await client.post(
                    f"{url}/predict", content=body, headers={"Content-Type": "image/png"}
                )
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        # warm-up: open the connections and let the worker settle (not timed)
        await asyncio.gather(*(client.get(f"{url}/health") for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def predict_rate(run: Path, folder: Path, out: Path) -> float:
    """images/s of `vittune predict` in-process over the folder (model load included)."""
    from vittune.inference.predict import predict_files

    start = time.perf_counter()
    result = predict_files(run, [str(folder)], out, progress=False)
    return len(result.paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: train a small one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=256, help="per cell, at most")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per cell, at most")
    parser.add_argument("--write", action="store_true", help="update RESULTS.md")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.run or train_run(work)
        folder = work / "requests"
        paths = make_images(folder)
        bodies = [p.read_bytes() for p in paths]
        rows = []
        for label, extra in SERVERS:
            process, url = start(run, extra, work / f"serve-{len(rows)}.log")
            try:
                for concurrency in args.concurrency:
                    latencies, errors, wall = asyncio.run(
                        load(url, bodies, concurrency, args.requests, args.max_seconds)
                    )
                    row = (
                        label, concurrency, len(latencies), errors, len(latencies) / wall,
                        percentile(latencies, 50), percentile(latencies, 95),
                        percentile(latencies, 99),
                    )  # fmt: skip
                    rows.append(row)
                    print("{:<22}{:>4}{:>6}{:>4}{:>9.1f}{:>9.1f}{:>9.1f}{:>9.1f}".format(*row))
            finally:
                stop(process)
        rate = predict_rate(run, folder, work / "preds.csv")
    load_after = os.getloadavg()
    print(f"vittune predict: {rate:.1f} images/s over {len(paths)} images")

    table = [
        "| server | concurrency | answered | errors | requests/s | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.1f} |"
            for r in rows
        ),
    ]
    text = "\n".join(
        [
            f"## {SECTION}",
            "",
            f"Machine: {machine()}; server and client share it, 1 torch/onnxruntime thread.",
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/serve.py"
            f" --requests {args.requests} --max-seconds {args.max_seconds:g}`."
            f" Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs).",
            "",
            "Model: vit_tiny_patch16_224 at 112 px (5.5 M parameters), trained one epoch on"
            " generated images; requests are 112 px colour PNGs sent as the body"
            " (`Content-Type: image/png`). Batching: the defaults `--max-batch-size 32"
            " --batch-timeout 0.01`; no batching: `--max-batch-size 1`. One model worker.",
            "",
            *table,
            "",
            f"`vittune predict` on the same {len(paths)} images, in-process, model load"
            f" included: **{rate:.1f} images/s**.",
        ]
    )
    if args.write:
        print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
