"""Importing vittune opens no network connection: an offline machine (a cluster node, a
hospital network) must not wait on a library's version check at every start."""

from __future__ import annotations

import os
import subprocess
import sys

# Records every name lookup and connection (Python's audit events fire before the socket call,
# so a lookup is caught whether or not this machine can reach the network).
IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
calls = []
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        calls.append(f"{event} {args!r:.200}")
sys.addaudithook(hook)
import vittune
names = [m.name for m in pkgutil.walk_packages(vittune.__path__, "vittune.")]
for name in names:
    importlib.import_module(name)
print(len(names))
for call in calls:
    print(call)
"""


def test_importing_every_vittune_module_looks_up_no_host() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported, *calls = result.stdout.splitlines()
    assert int(imported) > 100  # the whole package, not an empty walk
    assert calls == [], calls
