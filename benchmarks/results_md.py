"""Shared by every benchmark script: rewrite one `## ` section of RESULTS.md in place."""

from __future__ import annotations

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
