"""BENCHMARKS.md is written by several scripts, each owning one `## ` section of it."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str, heading: str) -> None:
    """Replace the section `heading` of `path` (from that line to the next `## `) by `text`, which
    starts with the heading, or append it; every other section stays as it is."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading in old:
        start = old.index(heading)
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
