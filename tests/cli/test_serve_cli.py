"""`vittune serve` as a user runs it: the console script in a subprocess on a free loopback port,
called over HTTP. Served answers equal `vittune predict`'s for the same files, every bad input
is a 4xx JSON error while the server keeps serving, a 200-request burst loses nothing,
SIGTERM during a burst answers the requests in flight, Ctrl+C to the process group stops without
a traceback, and a busy port or a missing GPU is one line. The API's batch handling and the ONNX /
int8 models are also checked in-process on the same trained run."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from conftest import VITTUNE, make_class_images, run_cli, subprocess_env, write_image
from helpers import ONE_THREAD, run_in_process, tiny, write_png, write_recipe

from vittune.deploy.serve_input import Refused
from vittune.deploy.serve_model import ServedModel, ServeOptions, check_onnx_file
from vittune.errors import RecipeError
from vittune.inference.predict import predict_files
from vittune.inference.trained_run import build_trained, load_trained_run

START_TIMEOUT = 240.0  # seconds: a worker process imports torch and builds the model
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-run")
    make_class_images(root / "data", dict.fromkeys(CLASSES, 8))
    recipe = write_recipe(root / "r.yaml", {"data": {"root": str(root / "data")}})
    overrides = tiny("model.in_chans=1", "trainer.max_epochs=1", "logging.name=run")
    result = run_cli("finetune", str(recipe), *overrides, cwd=root, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "run"


@pytest.fixture(scope="module")
def images(run_dir: Path) -> list[Path]:
    """Files of every kind predict reads: grey 8/16-bit PNG, 16-bit TIFF, colour JPEG, RGBA."""
    folder = run_dir.parent.parent / "to-serve"
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65535, (40, 48), dtype=np.uint16)
    return [
        *sorted((run_dir.parent.parent / "data" / "b").glob("*.png"))[:2],
        write_png(folder / "grey16.png", grey16),
        write_image(folder / "grey16.tif", grey16[::-1].copy()),
        write_image(folder / "colour.jpg", rng.integers(0, 255, (36, 30, 3), dtype=np.uint8)),
        write_png(folder / "rgba.png", rng.integers(0, 255, (33, 33, 4), dtype=np.uint8)),
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    cwd: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(run_dir: Path, root: Path, *args: str, new_session: bool = False) -> Server:
    """The real console script, on a free loopback port; returns once /health says ok.

    `new_session`: in its own process group, as a terminal's foreground job is, so that a
    signal to the group reaches every process of the server, as Ctrl+C does."""
    cwd, log = root / "cwd", root / "serve.log"
    cwd.mkdir()
    port = free_port()
    env = subprocess_env(**ONE_THREAD)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [VITTUNE, "serve", str(run_dir), "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
    server = Server(process, f"http://127.0.0.1:{port}", cwd, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vittune serve exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    pytest.fail(f"vittune serve was not ready within {START_TIMEOUT:.0f} s:\n{server.output()}")


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=30)
    return server.process.returncode


@pytest.fixture(scope="module")
def server(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    served = start_server(
        run_dir,
        tmp_path_factory.mktemp("serve"),
        "--max-batch-size", "16", "--batch-timeout", "0.05", "--max-body-mb", "1",
    )  # fmt: skip
    yield served
    stop_server(served)


def predicted_rows(run_dir: Path, files: list[Path], out: Path) -> dict[str, dict[str, str]]:
    result = run_cli("predict", str(run_dir), *map(str, files), "--out", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    with out.open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def as_multipart(path: Path) -> dict:
    return {"files": {"file": (path.name, path.read_bytes())}}


def as_raw(path: Path) -> dict:
    return {"content": path.read_bytes(), "headers": {"Content-Type": "application/octet-stream"}}


def as_json(path: Path) -> dict:
    return {"json": {"image": base64.b64encode(path.read_bytes()).decode(), "name": path.name}}


@pytest.mark.slow
def test_health_and_info_and_no_client_file(server: Server, run_dir: Path) -> None:
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert (health.status_code, health.text) == (200, "ok")
    model = httpx.get(f"{server.url}/info", timeout=30).json()["model"]
    model_file = run_dir / "model.safetensors"
    assembly = build_trained(load_trained_run(run_dir))
    assert model["classes"] == json.loads((run_dir / "config.json").read_text())["label_names"]
    assert model["input"]["channels"] == 1
    assert (model["input"]["height"], model["input"]["width"]) == (32, 32)
    assert model["input"]["mean"] == list(assembly.mean)
    assert model["input"]["std"] == list(assembly.std)
    assert model["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    assert model["version"] == hashlib.sha256(model_file.read_bytes()).hexdigest()[:12]
    assert list(server.cwd.iterdir()) == []  # LitServe's client.py is not written
    listening = [
        c.laddr
        for c in psutil.Process(server.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}


@pytest.mark.slow
def test_served_answers_equal_predict(
    server: Server, run_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    rows = predicted_rows(run_dir, images, tmp_path / "preds.csv")
    for path in images:
        row = rows[str(path)]
        expected = [(row[f"top{i}_class"], float(row[f"top{i}_prob"])) for i in (1, 2, 3)]
        for shape in (as_multipart, as_raw, as_json):
            response = httpx.post(f"{server.url}/predict", timeout=60, **shape(path))
            assert response.status_code == 200, (path, shape.__name__, response.text)
            answer = response.json()
            got = [(p["class"], p["probability"]) for p in answer["predictions"]]
            assert [c for c, _ in got] == [c for c, _ in expected], (path, shape.__name__)
            # the CSV keeps six significant digits: at most 5e-7 off for probabilities < 1
            np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=1e-6)
            assert answer["model"] == "run" and len(answer["version"]) == 12


def bomb_png() -> bytes:
    """A valid PNG header declaring 60000 x 60000 pixels, over the default pixel limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 60001 * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.slow
def test_bad_inputs_are_4xx_json_and_the_server_keeps_serving(
    server: Server, images: list[Path]
) -> None:
    png = images[0].read_bytes()
    octet = {"Content-Type": "application/octet-stream"}
    cases = [
        ("not an image", {"content": b"hello, world", "headers": octet}, 400, "not an image"),
        ("truncated", {"files": {"file": ("t.png", png[: len(png) // 2])}}, 400, "t.png"),
        ("bomb", {"content": bomb_png(), "headers": octet}, 400, "decompression bomb"),
        (
            "text/plain",
            {"content": png, "headers": {"Content-Type": "text/plain"}},
            415,
            "text/plain",
        ),
        ("form fields", {"data": {"x": "1"}}, 415, "x-www-form-urlencoded"),
        ("too big", {"content": b"\0" * (2 << 20), "headers": octet}, 413, "--max-body-mb"),
        ("no file field", {"files": {"image": ("x.png", png)}}, 400, "no file field"),
        ("bad base64", {"json": {"image": "@@@"}}, 400, "base64"),
        ("empty body", {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "no image"),
    ]
    for name, request, status, words in cases:
        response = httpx.post(f"{server.url}/predict", timeout=60, **request)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"], (name, response.text)

    def chunked():  # no Content-Length: the limit is applied while reading
        for _ in range(3):
            yield b"\0" * (1 << 20)

    response = httpx.post(f"{server.url}/predict", content=chunked(), headers=octet, timeout=60)
    assert response.status_code == 413
    assert httpx.post(f"{server.url}/predict", timeout=60, **as_raw(images[0])).status_code == 200


async def post_all(url: str, requests: list[dict], connections: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{url}/predict", **r) for r in requests))


def reference_answers(server: Server, images: list[Path]) -> dict[Path, dict[str, float]]:
    return {
        p: httpx.post(f"{server.url}/predict", timeout=60, **as_raw(p)).json()["probabilities"]
        for p in images
    }


@pytest.mark.slow
def test_a_burst_of_200_concurrent_requests_loses_nothing(
    server: Server, images: list[Path]
) -> None:
    reference = reference_answers(server, images)
    picks = [images[i % len(images)] for i in range(200)]
    responses = asyncio.run(post_all(server.url, [as_raw(p) for p in picks], connections=200))
    assert [r.status_code for r in responses] == [200] * 200
    for path, response in zip(picks, responses, strict=True):
        got = response.json()["probabilities"]
        np.testing.assert_allclose(list(got.values()), list(reference[path].values()), atol=1e-6)


@pytest.mark.slow
def test_bad_requests_in_a_burst_fail_alone(server: Server, images: list[Path]) -> None:
    reference = reference_answers(server, images[:1])[images[0]]
    bad = {"content": b"not an image", "headers": {"Content-Type": "image/png"}}
    requests = [as_raw(images[0]) if i % 2 else bad for i in range(48)]
    responses = asyncio.run(post_all(server.url, requests, connections=48))
    for i, response in enumerate(responses):
        if i % 2:
            assert response.status_code == 200
            got = list(response.json()["probabilities"].values())
            np.testing.assert_allclose(got, list(reference.values()), atol=1e-6)
        else:
            assert response.status_code == 400 and "not an image" in response.json()["error"]


def test_one_bad_image_in_a_batch_costs_only_its_request(
    run_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    """The API's steps in the order LitServe's batched loop calls them, on one batch."""
    from vittune.deploy.serve_api import VittuneAPI

    api = VittuneAPI(ServeOptions(str(run_dir)), "v", max_batch_size=8, batch_timeout=0.0)
    api.setup("cpu")
    payloads = [{"image": p.read_bytes(), "name": p.name} for p in images[:3]]
    payloads.insert(1, {"image": b"GIF89a broken", "name": "bad.gif"})
    decoded = [api.decode_request(p) for p in payloads]
    assert isinstance(decoded[1], Refused)
    answers = [api.encode_response(y) for y in api.unbatch(api.predict(api.batch(decoded)))]
    assert answers[1] == {
        "error": "cannot decode image bad.gif: the file is corrupt or not an image; replace or"
        " remove it",
        "status": 400,
    }
    expected = predict_files(run_dir, [str(p) for p in images[:3]], tmp_path / "p.csv").probs
    got = np.array([list(answers[i]["probabilities"].values()) for i in (0, 2, 3)])
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.slow
def test_onnx_and_int8_models_agree_with_torch(run_dir: Path, images: list[Path]) -> None:
    from vittune.deploy.serve import prepare_onnx

    run = load_trained_run(run_dir)
    lines: list[str] = []
    path = prepare_onnx(run, True, lines.append)  # no export yet: serve runs vittune export
    assert path == run_dir / "export" / "model.int8.onnx" and "exporting it" in lines[0]
    assert prepare_onnx(run, False, lines.append).is_file() and len(lines) == 1

    torch_model = ServedModel(ServeOptions(str(run_dir)))
    batch = np.stack([torch_model.preprocess(p.read_bytes(), p.name).numpy() for p in images])
    reference = torch_model.probabilities(torch.from_numpy(batch))  # [N, K]
    onnx = ServedModel(ServeOptions(str(run_dir), fmt="onnx")).probabilities(
        torch.from_numpy(batch)
    )
    np.testing.assert_allclose(onnx, reference, atol=1e-4)  # export's own logit tolerance
    for options in (
        ServeOptions(str(run_dir), int8=True),
        ServeOptions(str(run_dir), "best", "onnx", True),
    ):
        quantised = ServedModel(options).probabilities(torch.from_numpy(batch))
        np.testing.assert_allclose(quantised.sum(axis=1), 1.0, atol=1e-5)
        assert np.abs(quantised - reference).max() < 0.05, options

    sidecar = path.with_name(path.name + ".json")
    contract = json.loads(sidecar.read_text())
    contract["input"]["normalisation"] = "baked"
    sidecar.write_text(json.dumps(contract))
    with pytest.raises(RecipeError, match="--bake-normalisation"):
        check_onnx_file(path, run)


@pytest.mark.slow  # the command's imports take 20-30 s on the shared test machine
def test_an_option_mistake_is_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path), "--host", "10.1.2.3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vittune: error: --host must be one of 127.0.0.1, 0.0.0.0, ::, got '10.1.2.3'"
    ]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--format", "onnx"], "--format onnx (onnxruntime's CPU provider) runs on the CPU"),
        (["--int8"], "--int8 (dynamic quantisation) runs on the CPU"),
    ],
)
def test_cpu_only_formats_on_cuda_are_one_line(
    tmp_path: Path, options: list[str], expected: str
) -> None:
    result = run_in_process("serve", str(tmp_path), *options, "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vittune: error: {expected}; drop --device cuda, or serve --format torch on the GPU"
    ]


@pytest.mark.slow
def test_a_port_in_use_is_one_line_before_the_model_loads(run_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(run_dir), "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""  # no banner claiming to serve
    assert result.stderr.strip().splitlines() == [
        f"vittune: error: port {port} on 127.0.0.1 is in use; stop what listens there or pick"
        " another with --port"
    ]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "serve", str(run_dir), "--device", "cuda", "--port", str(free_port()), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "vittune: error: --device cuda: no CUDA GPU is visible here; use --device cpu"
    ]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_quietly(run_dir: Path, tmp_path: Path) -> None:
    """Ctrl+C in a terminal sends SIGINT to every process of the foreground group: the model
    worker and HTTP server get it too, not only `vittune serve`."""
    served = start_server(run_dir, tmp_path, new_session=True)
    children = psutil.Process(served.process.pid).children(recursive=True)
    try:
        signalled = time.monotonic()
        os.killpg(served.process.pid, signal.SIGINT)
        code = served.process.wait(timeout=90)
        took = time.monotonic() - signalled
    finally:
        stop_server(served)
    lines = served.output().strip().splitlines()
    assert code == 0, served.output()
    # the banner and the stopped line only: no traceback, no LitServe warning about a worker
    # that had to be killed
    assert lines[-1] == "vittune serve: stopped", served.output()
    assert all(line.startswith("vittune serve: ") for line in lines), served.output()
    assert took < 10, took  # LitServe kills a worker that ignores SIGTERM only after 5 s
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.cmdline() for c in alive]


@pytest.mark.slow
def test_sigterm_during_a_burst_answers_the_requests_in_flight(
    run_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    # Batches wait up to 2 s to fill, so the burst is still in flight when SIGTERM comes at 1 s.
    served = start_server(run_dir, tmp_path, "--max-batch-size", "64", "--batch-timeout", "2")
    children = psutil.Process(served.process.pid).children(recursive=True)
    assert children  # HTTP server and model worker processes

    async def timed(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        response = await client.post(f"{served.url}/predict", **as_raw(images[0]))
        return response, time.monotonic()

    async def burst() -> tuple[list[tuple[httpx.Response, float]], float]:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            # open the 16 connections first, so each request below is sent on a live one
            await asyncio.gather(*(client.get(f"{served.url}/health") for _ in range(16)))
            tasks = [asyncio.ensure_future(timed(client)) for _ in range(16)]
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks), signalled

    try:
        answered, signalled = asyncio.run(burst())
        assert [r.status_code for r, _ in answered] == [200] * 16
        # every answer came after the signal: all 16 were in flight when it arrived
        assert min(t for _, t in answered) > signalled
        code = served.process.wait(timeout=90)
    finally:
        stop_server(served)
    assert code == 0, served.output()
    assert "vittune serve: stopped" in served.output()
    assert "Traceback" not in served.output()  # LitServe's worker monitor ended quietly
    # the queue manager, HTTP server, model worker and resource tracker all end with it
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.cmdline() for c in alive]
