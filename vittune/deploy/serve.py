"""`vittune serve RUN`: a trained run behind an HTTP endpoint, on LitServe.

LitServe gives the worker processes, dynamic batching (`max_batch_size`, `batch_timeout`),
workers per device, `GET /health` and `GET /info` (the run's input contract and metrics in its
`model` field). vittune adds the `POST /predict` route: LitServe's own route only reads form or
JSON bodies (it calls `request.json()` on anything else), so this one takes a raw image body
too, bounds the body (`--max-body-mb`), refuses wrong content types with a 4xx JSON error, and
hands the image bytes to LitServe's request queue. SIGTERM and Ctrl+C run LitServe's graceful
shutdown: the HTTP servers stop accepting, answer what is in flight, then the workers stop.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vittune.deploy.serve_model import (
    SERVE_FORMATS,
    ServeOptions,
    check_onnx_file,
    onnx_file,
    version_of,
)
from vittune.errors import RecipeError
from vittune.files import handlers_restored
from vittune.inference.devices import device_for
from vittune.inference.trained_run import TrainedRun, build_trained, load_trained_run

# LitServe binds only these (it refuses other host strings).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
DEVICES = ("auto", "cpu", "cuda")


def check_options(
    host: str,
    port: int,
    fmt: str,
    max_batch_size: int,
    batch_timeout: float,
    workers: int,
    device: str,
    max_body_mb: float,
    top_k: int,
    threshold: float,
) -> None:
    """One line per mistake, before any model is loaded."""
    if host not in HOSTS:
        raise RecipeError(f"--host must be one of {', '.join(HOSTS)}, got {host!r}")
    if not 1024 <= port <= 65535:
        raise RecipeError(f"--port must be between 1024 and 65535, got {port}")
    if fmt not in SERVE_FORMATS:
        raise RecipeError(f"--format must be one of {', '.join(SERVE_FORMATS)}, got {fmt!r}")
    if max_batch_size < 1:
        raise RecipeError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if batch_timeout < 0:
        raise RecipeError(f"--batch-timeout must be 0 or more seconds, got {batch_timeout}")
    if workers < 1:
        raise RecipeError(f"--workers must be at least 1, got {workers}")
    if device not in DEVICES:
        raise RecipeError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if not max_body_mb > 0:
        raise RecipeError(f"--max-body-mb must be positive, got {max_body_mb}")
    if top_k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {top_k}")
    if not 0.0 < threshold < 1.0:
        raise RecipeError(f"--threshold must be between 0 and 1, got {threshold}")


def check_port(host: str, port: int) -> None:
    """A port that something else listens on: one line before the model loads.

    LitServe finds out only when uvicorn binds, after the banner: uvicorn logs the errno and
    the command exits 3. The probe binds as uvicorn does (SO_REUSEADDR, so a port whose last
    connections are in TIME_WAIT counts as free) and lets go at once; a program that takes the
    port between this check and LitServe's bind still meets uvicorn's error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise RecipeError(
                    f"port {port} on {host} is in use; stop what listens there or pick another"
                    " with --port"
                ) from None
            raise RecipeError(
                f"cannot listen on port {port} on {host} ({err.strerror}); pick another --host"
                " or --port"
            ) from None


def run_info(run: TrainedRun, options: ServeOptions, version: str) -> dict[str, Any]:
    """What `GET /info` says about the model: classes, the input contract, the run's metrics."""
    assembly = build_trained(run)
    chans, (height, width) = run.recipe.model.in_chans, run.recipe.model.img_size
    metrics_file = run.folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return {
        "name": run.folder.name,
        "version": version,
        "architecture": run.recipe.model.name,
        "format": options.fmt + (" int8" if options.int8 else ""),
        "weights": str(run.weights),
        "classes": list(run.classes),
        "multi_label": run.multi_label,
        "top_k": options.top_k,
        "threshold": options.threshold if run.multi_label else None,
        "input": {
            "channels": chans,
            "height": height,
            "width": width,
            "intensity_scaling": run.recipe.data.intensity,
            "mean": list(assembly.mean),
            "std": list(assembly.std),
            "max_image_pixels": run.recipe.data.max_image_pixels,
        },
        "metrics": metrics,
    }


def prepare_onnx(run: TrainedRun, int8: bool, log: Callable[[str], None]) -> Path:
    """The run's checked ONNX file; exported (and checked) first if `vittune export` never ran."""
    path = onnx_file(run.folder, int8)
    if not path.is_file():
        from vittune.deploy.pipeline import export_run  # noqa: PLC0415

        log(f"vittune serve: {path} not found; exporting it (vittune export) first")
        export_run(run.folder, "onnx", weights=str(run.weights), quantize="int8" if int8 else None)
    check_onnx_file(path, run)
    return path


def stop_on_signals(server) -> None:
    """SIGTERM and SIGINT (Ctrl+C) in this process run LitServe's graceful shutdown.

    LitServe 0.2 installs no SIGTERM handler (the default one would kill this process and
    orphan the HTTP server and the workers), and on KeyboardInterrupt it drops what is in
    flight; its `run` waits on a shutdown event, the one its own /shutdown endpoint sets. The
    handler sets that event from a new thread (a manager proxy must not be re-entered from a
    signal handler in the thread blocked on it); setting it, rather than raising
    KeyboardInterrupt, also ends LitServe's worker monitor, which would otherwise report the
    stopped workers as a crash. Child processes forked later inherit the handler and take the
    default action instead, quietly: uvicorn installs its own graceful one while it serves and
    re-raises the signal into this one when it is done (the default SIGINT action of Python,
    KeyboardInterrupt, would print a traceback there); the queue manager ignores SIGINT.
    """
    main, stopping = os.getpid(), []

    def handler(signum: int, frame) -> None:
        if os.getpid() != main:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        event = server._shutdown_event  # None until `run` has started its manager process
        if event is None:
            raise KeyboardInterrupt
        if not stopping:  # a second signal changes nothing
            stopping.append(threading.Thread(target=event.set, name="vittune-stop"))
            stopping[0].start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def workers_ignore_sigint(server) -> None:
    """LitServe's model workers start with SIGINT ignored; this process stops them.

    Ctrl+C in a terminal sends SIGINT to the whole foreground process group. A worker would
    raise KeyboardInterrupt in LitServe's batch loop (a traceback) and drop what it holds,
    while this process, which got the same SIGINT, is about to stop it in order. LitServe
    offers no hook in the worker before `LitAPI.setup`, which runs after seconds of imports; a
    worker that died then would never report ready, and LitServe waits for that. So SIGINT is
    ignored here while LitServe spawns them: an ignored signal stays ignored across the exec,
    and Python then installs no KeyboardInterrupt handler. LitServe stops workers with
    SIGTERM, which still ends them at once. (A Ctrl+C during those few milliseconds is lost;
    LitServe's restart path, off here, launches from a thread and is left alone.)
    """
    launch = server.launch_inference_worker

    def launch_inference_worker(lit_api):
        with handlers_restored([signal.SIGINT]):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return launch(lit_api)

    server.launch_inference_worker = launch_inference_worker


def serve_run(
    run_folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    fmt: str = "torch",
    int8: bool = False,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    workers: int = 1,
    device: str = "auto",
    max_body_mb: float = 10.0,
    top_k: int = 3,
    threshold: float = 0.5,
    weights: str = "best",
    log: Callable[[str], None] = print,
) -> None:
    """Serve a finetune or distill run until SIGTERM or Ctrl+C."""
    check_options(
        host, port, fmt, max_batch_size, batch_timeout, workers, device, max_body_mb, top_k,
        threshold,
    )  # fmt: skip
    if device == "cuda" and (int8 or fmt == "onnx"):  # both are served on the CPU
        served = (
            "--int8 (dynamic quantisation)"
            if int8
            else "--format onnx (onnxruntime's CPU provider)"
        )
        raise RecipeError(
            f"{served} runs on the CPU; drop --device cuda, or serve --format torch on the GPU"
        )
    try:
        import litserve as ls  # noqa: PLC0415
    except ImportError:
        raise RecipeError(
            "vittune serve needs LitServe; install it with pip install 'vittune[serve]'"
        ) from None
    device_for(device)  # cuda with none here: one line, not a worker failing after the banner
    check_port(host, port)
    run = load_trained_run(run_folder, [], weights)
    served_file = prepare_onnx(run, int8, log) if fmt == "onnx" else run.weights
    options = ServeOptions(str(run.folder), str(run.weights), fmt, int8, top_k, threshold)
    version = version_of(run.weights)

    from vittune.deploy.serve_api import VittuneAPI, add_predict_route  # noqa: PLC0415

    api = VittuneAPI(options, version, max_batch_size, batch_timeout)
    accelerator = "cpu" if int8 or fmt == "onnx" else device
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        model_metadata=run_info(run, options, version),
        disable_openapi_url=True,
    )
    add_predict_route(server, api, int(max_body_mb * 2**20))
    workers_ignore_sigint(server)
    stop_on_signals(server)
    log(
        f"vittune serve: {run.folder} ({served_file.name}, {options.fmt}"
        f"{' int8' if int8 else ''}, batches of up to {max_batch_size} within"
        f" {batch_timeout * 1000:g} ms, {workers} worker(s)) on http://{host}:{port}"
        "  POST /predict  GET /health  GET /info"
    )
    server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    log("vittune serve: stopped")
