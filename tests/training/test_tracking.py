"""W&B and hub probes: offline on their own (no key, no answering server), never a hang.

The servers here are real sockets on 127.0.0.1: a port nobody listens on (refused at once),
a "black hole" that accepts connections and never answers (what a stuck proxy does), and a
tiny HTTP server that does answer.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_class_images
from helpers import run_cli_unset, tiny, write_recipe
from lightning.pytorch.loggers import WandbLogger

from vittune.errors import RecipeError, WeightsError
from vittune.models import weights
from vittune.netprobe import PROBE_TIMEOUT_S, endpoint_reachable
from vittune.recipe.schema import LoggingConfig
from vittune.training import tracking
from vittune.training.wandb_run import SectionedWandbLogger

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, as wandb expects


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dead_url() -> str:
    """Nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{_free_port()}"


@pytest.fixture
def black_hole_url() -> Iterator[str]:
    """Connections are accepted by the kernel's backlog, and nothing ever answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def live_url() -> Iterator[str]:
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(404)  # any status means "a server answers"
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802 (the W&B probe calls the GraphQL API)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def no_wandb_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A user without `wandb login`: no key in the environment, no ~/.netrc."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_probe_tells_dead_silent_and_live_servers_apart(
    dead_url: str, black_hole_url: str, live_url: str
) -> None:
    assert endpoint_reachable(live_url)
    assert not endpoint_reachable(dead_url)
    assert not endpoint_reachable("https://wandb.invalid")  # never resolves (RFC 2606)
    assert not endpoint_reachable("ftp://127.0.0.1")
    started = time.monotonic()
    assert not endpoint_reachable(black_hole_url, timeout=1.0)
    assert time.monotonic() - started < 5.0  # bounded by the deadline, not by the server


def test_no_key_means_offline_without_touching_the_network(no_wandb_setup: Path) -> None:
    assert not tracking.wandb_key_available()
    mode, reason = tracking.resolve_wandb_mode(LoggingConfig())
    assert mode == "offline" and "no W&B API key" in reason


def test_a_key_in_netrc_counts_for_the_configured_server(
    no_wandb_setup: Path, monkeypatch: pytest.MonkeyPatch, live_url: str
) -> None:
    netrc = no_wandb_setup / ".netrc"
    netrc.write_text("machine 127.0.0.1\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert not tracking.wandb_key_available()  # a key for another server
    monkeypatch.setenv("WANDB_BASE_URL", live_url)
    assert tracking.wandb_key_available()
    assert tracking.resolve_wandb_mode(LoggingConfig()) == ("online", None)


def test_unreachable_server_is_offline_for_auto_and_an_error_for_explicit_online(
    no_wandb_setup: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", dead_url)
    mode, reason = tracking.resolve_wandb_mode(LoggingConfig())
    assert mode == "offline" and dead_url in reason and "did not answer" in reason
    with pytest.raises(RecipeError, match="logging.wandb_mode: online but the W&B server"):
        tracking.resolve_wandb_mode(LoggingConfig(wandb_mode="online"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(RecipeError, match="WANDB_MODE=online but the W&B server"):
        tracking.resolve_wandb_mode(LoggingConfig())
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(RecipeError, match="no W&B API key"):
        tracking.resolve_wandb_mode(LoggingConfig())


def test_environment_and_recipe_choose_the_mode(
    no_wandb_setup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracking.resolve_wandb_mode(LoggingConfig(wandb_mode="offline")) == ("offline", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode(LoggingConfig(wandb_mode="online"))[0] == "disabled"


def test_loggers(no_wandb_setup: Path, tmp_path: Path) -> None:
    loggers, message = tracking.build_loggers(LoggingConfig(wandb=False), tmp_path / "run", "r")
    assert [type(x) for x in loggers] == [tracking.AppendingCSVLogger] and message is None
    loggers, message = tracking.build_loggers(LoggingConfig(), tmp_path / "run", "r")
    # Lightning's W&B logger, whose config is the recipe's sections (vittune.training.wandb_run)
    assert [type(x) for x in loggers] == [tracking.AppendingCSVLogger, SectionedWandbLogger]
    assert isinstance(loggers[1], WandbLogger)
    assert "logging offline" in message and "wandb sync" in message


def test_hub_probe_honours_hf_endpoint(
    monkeypatch: pytest.MonkeyPatch, dead_url: str, live_url: str
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", live_url)
    assert weights.hub_endpoint() == live_url and weights.hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", dead_url)
    assert not weights.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    weights.prepare_hub_access()
    assert weights.os.environ["HF_HUB_OFFLINE"] == "1"  # the cache, not minutes of retries


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, list[str]]:
    make_class_images(tmp_path / "data", {"a": 8, "b": 8}, size=32)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data")}})
    overrides = tiny(
        "trainer.max_epochs=1", "logging.name=net", "logging.wandb=true", drop=("logging.wandb",)
    )
    return recipe, overrides


@pytest.mark.slow
def test_cli_with_a_silent_wandb_server_logs_offline_in_one_line(
    tmp_path: Path, tiny_run: tuple[Path, list[str]], black_hole_url: str
) -> None:
    recipe, overrides = tiny_run
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": black_hole_url, "HOME": str(tmp_path)}
    result = run_cli_unset(
        "finetune",
        str(recipe),
        *overrides,
        cwd=tmp_path,
        unset=("WANDB_MODE",),
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    notices = [line for line in result.stdout.splitlines() if "W&B is logging offline" in line]
    assert notices and black_hole_url in notices[0], result.stdout
    assert f"{PROBE_TIMEOUT_S:g} s" in notices[0]
    assert list((tmp_path / "runs" / "net" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_cli_with_explicit_online_and_a_dead_server_stops_in_one_line(
    tmp_path: Path, tiny_run: tuple[Path, list[str]], dead_url: str
) -> None:
    recipe, overrides = tiny_run
    env = {
        "WANDB_API_KEY": FAKE_KEY,
        "WANDB_BASE_URL": dead_url,
        "WANDB_MODE": "online",
        "HOME": str(tmp_path),
    }
    result = run_cli_unset(
        "finetune", str(recipe), *overrides, cwd=tmp_path, unset=(), env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "WANDB_MODE=online" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("*"))  # nothing was trained: no folder left


def test_hub_weights_with_a_dead_hf_endpoint_fail_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str
) -> None:
    from vittune.models.backbone import create_backbone
    from vittune.recipe.schema import ModelConfig

    monkeypatch.setenv("HF_ENDPOINT", dead_url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="cannot get hub weights"):
        create_backbone(ModelConfig(name="vit_tiny_patch16_224", pretrained=True), 2)


def test_a_logging_group_reaches_the_wandb_run(no_wandb_setup: Path, tmp_path: Path) -> None:
    """Sweeps group their trials' W&B runs by the sweep name (`logging.group`)."""
    import wandb

    loggers, _ = tracking.build_loggers(LoggingConfig(group="my-sweep"), tmp_path / "run", "t")
    try:
        assert loggers[1].experiment.group == "my-sweep"
    finally:
        wandb.finish()
