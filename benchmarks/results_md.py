"""Shared by the benchmark scripts: the machine line and rewriting one `## ` section of RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach `##` section is written by one script in `benchmarks/` (see README.md).\n"


def write_section(section: str, text: str) -> Path:
    """Replace the section whose heading starts with `section` (or append it); keep the rest."""
    head, *rest = (RESULTS.read_text() if RESULTS.exists() else HEADER).split("\n## ")
    sections = ["## " + part.rstrip() for part in rest]
    mine = [i for i, s in enumerate(sections) if s.startswith(section)]
    if mine:
        sections[mine[0]] = text.strip()
    else:
        sections.append(text.strip())
    RESULTS.write_text(head.rstrip() + "\n\n" + "\n\n".join(sections) + "\n")
    return RESULTS


def machine() -> str:
    """The CPU's model name (Linux), its core count, the GPU if any, and the library versions."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        name = models[0] if models else name
    import lightning
    import timm
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{name}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, lightning"
        f" {lightning.__version__}, timm {timm.__version__}, Python {platform.python_version()}"
    )
