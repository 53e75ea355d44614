"""The Dockerfile's promises, read from the file (the image itself is built where a Docker
daemon runs: docs/docker.md), and the constraints file against the tested environment."""

from __future__ import annotations

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as a package
    import tomli as tomllib

import re
from importlib.metadata import PackageNotFoundError, version

from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# every optional extra but the developers' own: the image carries them all
EXTRAS = [
    name
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    if name != "dev"
]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(name): pinned for name, pinned in found}


def test_the_image_runs_as_a_user_not_root() -> None:
    steps = instructions()
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [kind for kind, _ in steps].index("ENTRYPOINT") > [k for k, _ in steps].index("USER")


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    """A code change reuses the layer that installed torch and the other dependencies."""
    steps = instructions()
    code = steps.index(("COPY", "vittune ./vittune"))
    before = " ".join(args for kind, args in steps[:code] if kind == "RUN")
    assert "-c constraints.txt" in before and '".[$EXTRAS]"' in before
    assert ("ARG", f"EXTRAS={','.join(EXTRAS)}") in steps  # every extra, in pyproject's order
    after = [args for kind, args in steps[code:] if kind == "RUN"]
    assert after and "--no-deps" in after[0]


def test_constraints_pin_every_dependency_at_the_tested_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    wanted = [*project["dependencies"], *(r for extra in EXTRAS for r in optional[extra])]
    pinned = pins()
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])
    for name, pinned_version in pinned.items():
        try:
            installed = version(name).split("+")[0]  # torch 2.x.y+cpu: the pin has no label
        except PackageNotFoundError:
            continue  # an extra this environment does not install
        assert installed == pinned_version, (
            f"{name}: tested with {installed}, pinned {pinned_version}"
        )
