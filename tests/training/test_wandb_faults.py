"""A W&B server that is half alive (a real HTTP server on 127.0.0.1 that answers the page but
fails or hangs on the API, or answers the probe and then fails): the run logs offline with one
line and never waits long, at start or at exit."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_class_images, subprocess_env
from helpers import VITTUNE, tiny, write_recipe
from lightning.pytorch.loggers import WandbLogger

from vittune.errors import RecipeError
from vittune.netprobe import PROBE_TIMEOUT_S
from vittune.recipe.schema import LoggingConfig
from vittune.training import tracking

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def half_alive(api: str, good_posts: int = 0) -> http.server.ThreadingHTTPServer:
    """HEAD and GET answer 200; after `good_posts` good API answers, each POST gets a 500
    (`api="fail"`) or no answer at all (`api="hang"`)."""
    posts = [0]
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _ok(self, body: bytes = b"") -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self._ok()

        def do_GET(self) -> None:  # noqa: N802
            self._ok(b"{}")

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            posts[0] += 1
            if posts[0] <= good_posts:
                self._ok(b'{"data": {"viewer": null}}')
            elif api == "fail":
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                stop.wait(120)  # hangs (until the test ends)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.stop_hanging = stop  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(api: str, good_posts: int = 0) -> str:
        servers.append(half_alive(api, good_posts))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"

    yield start
    for server in servers:
        server.stop_hanging.set()
        server.shutdown()


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.parametrize("api", ["fail", "hang"])
def test_a_server_whose_api_fails_or_hangs_is_offline_within_the_probe_deadline(
    keyed: None, serve, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    url = serve(api)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    started = time.monotonic()
    mode, reason = tracking.resolve_wandb_mode(LoggingConfig())
    assert time.monotonic() - started < PROBE_TIMEOUT_S + 1
    assert mode == "offline" and url in reason
    with pytest.raises(RecipeError, match="online but the W&B server"):
        tracking.resolve_wandb_mode(LoggingConfig(wandb_mode="online"))


def test_a_server_with_a_working_api_is_online(
    keyed: None, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", serve("fail", good_posts=1))
    assert tracking.resolve_wandb_mode(LoggingConfig()) == ("online", None)


@pytest.mark.slow
def test_a_server_that_fails_after_the_probe_falls_back_to_offline_before_training(
    keyed: None, serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = serve("fail", good_posts=1)  # the probe's POST is answered, wandb's are not
    monkeypatch.setenv("WANDB_BASE_URL", url)
    started = time.monotonic()
    # with the run folder's W&B id, as every vittune run has: the offline run takes it over
    loggers, message = tracking.build_loggers(
        LoggingConfig(), tmp_path / "run", "r", wandb_id="keep1234"
    )
    took = time.monotonic() - started
    assert took < 60, took  # wandb retries its API for about 20-30 s (measured), then gives up
    wandb_logger = loggers[-1]
    assert isinstance(wandb_logger, WandbLogger)
    assert "W&B is logging offline" in message and "answered the probe but failed" in message
    assert url in message and "\n" not in message
    wandb_logger.experiment.log({"x": 1.0})  # the offline run works
    assert wandb_logger.experiment.id == "keep1234"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*-keep1234"))
    wandb_logger.experiment.finish()


def run_and_time_the_exit(
    args: list[str], cwd: Path, env: dict[str, str]
) -> tuple[int, str, float]:
    """Run the CLI (WANDB_MODE unset, as on a machine set up for W&B); its exit code, stdout,
    and the seconds from its last line (the run folder) to its exit: W&B's wait at exit."""
    full = subprocess_env(unset=("WANDB_MODE",), **env)
    with (cwd / "stderr.txt").open("w") as errors:
        proc = subprocess.Popen(
            [VITTUNE, *args], cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        lines, last = [], time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            last = time.monotonic()
        code = proc.wait(timeout=300)
    return code, "".join(lines), time.monotonic() - last


@pytest.mark.slow
@pytest.mark.parametrize(
    ("api", "good_posts"), [("fail", 0), ("hang", 0), ("fail", 1), ("hang", 1)]
)
def test_cli_with_a_half_alive_server_logs_offline_in_one_line_and_exits_at_once(
    tmp_path: Path, serve, api: str, good_posts: int
) -> None:
    """The server fails or hangs on the probe (0 good answers), or answers the probe and then
    fails or hangs on the run's own API calls (1): one offline line, the run finishes, and its
    exit does not wait on the server (wandb's usage telemetry posted to it at exit with a 10 s
    timeout: 10-21 s measured before)."""
    url = serve(api, good_posts)
    make_class_images(tmp_path / "data", {"a": 8, "b": 8}, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    overrides = tiny("trainer.max_epochs=1", "logging.name=net", "logging.wandb=true")
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": url, "HOME": str(tmp_path)}
    code, stdout, exit_wait = run_and_time_the_exit(
        ["finetune", str(recipe), *overrides], tmp_path, env
    )
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    notices = [line for line in stdout.splitlines() if "W&B is logging offline" in line]
    assert len(notices) == 1 and url in notices[0], stdout
    assert ("answered the probe but failed" in notices[0]) == (good_posts > 0)
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
    # 1.5 s measured on a quiet machine; the telemetry wait it guards against was 10-21 s
    assert exit_wait < 8, exit_wait
    assert list((tmp_path / "runs" / "net" / "wandb").glob("offline-run-*"))
