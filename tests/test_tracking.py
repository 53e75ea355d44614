"""W&B goes offline by itself (no key, no network) and `logging.wandb: false` turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from vittune import tracking
from vittune.recipe.schema import LoggingConfig


@pytest.fixture
def no_wandb_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A user without `wandb login`: no key in the environment, no ~/.netrc."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_no_key_means_offline_without_touching_the_network(no_wandb_setup: Path) -> None:
    assert not tracking.wandb_key_available()
    mode, reason = tracking.resolve_wandb_mode(LoggingConfig())
    assert mode == "offline" and "no W&B API key" in reason


def test_a_key_in_netrc_counts_and_an_unreachable_host_means_offline(
    no_wandb_setup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = no_wandb_setup / ".netrc"
    netrc.write_text(f"machine {tracking.WANDB_HOST}\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert tracking.wandb_key_available()
    # `.invalid` never resolves (RFC 2606), so this answers at once on any machine
    assert tracking.host_reachable("wandb.invalid", timeout=2.0) is False
    monkeypatch.setattr(tracking, "host_reachable", lambda: False)
    mode, reason = tracking.resolve_wandb_mode(LoggingConfig())
    assert mode == "offline" and "not reachable" in reason


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
    assert [type(x) for x in loggers] == [tracking.AppendingCSVLogger, WandbLogger]
    assert "logging offline" in message and "wandb sync" in message
