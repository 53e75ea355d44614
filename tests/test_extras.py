"""Which optional extra each command needs is said everywhere a user meets it: the error hint,
the README's Use section, and the installs `make demo` and the Docker image do."""

from __future__ import annotations

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as a package
    import tomli as tomllib

import re
import sys

import pytest
from helpers import ROOT

from vittune.errors import VittuneError

EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# command (as in the README's Use section) -> the extra it needs
NEEDED = {"export": "export", "prepare-data": "stream", "serve": "serve", "sweep": "sweep"}


def named_extras(text: str) -> set[str]:
    """The extras a pip line names: 'vittune[a,b]' or '.[a,b]'."""
    return {
        e.strip()
        for group in re.findall(r"(?:vittune|\.)\[([\w, -]+)\]", text)
        for e in group.split(",")
    }


def test_the_extras_named_exist() -> None:
    assert set(NEEDED.values()) <= set(EXTRAS)


@pytest.mark.parametrize(
    ("module", "check", "extra"),
    [
        ("litdata", "vittune.data.streaming:require_litdata", "stream"),
        ("onnx", "vittune.deploy.formats:require_extra", "export"),
    ],
)
def test_a_missing_package_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, check: str, extra: str
) -> None:
    """The package made unimportable (None in sys.modules), the hint says which extra to install."""
    import importlib

    monkeypatch.setitem(sys.modules, module, None)
    path, name = check.split(":")
    with pytest.raises(VittuneError) as caught:
        getattr(importlib.import_module(path), name)()
    assert f"pip install 'vittune[{extra}]'" in str(caught.value)


def test_readme_use_section_marks_the_extra_of_each_command() -> None:
    use = (ROOT / "README.md").read_text().split("## Use", 1)[1].split("\n## ", 1)[0]
    for command, extra in NEEDED.items():
        lines = [line for line in use.splitlines() if f"vittune {command} " in line]
        assert lines and all(f"[{extra}]" in line for line in lines), (command, lines)
    assert {"export", "stream"} <= named_extras(use)


def test_make_demo_and_docker_install_every_command_extra() -> None:
    install = re.search(r"^install:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert install and set(NEEDED.values()) <= named_extras(install.group(1))
    docker = re.search(r"^ARG EXTRAS=([\w,]+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert docker and set(NEEDED.values()) <= set(docker.group(1).split(","))
    assert '".[$EXTRAS]"' in (ROOT / "Dockerfile").read_text()
