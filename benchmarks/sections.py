"""BENCHMARKS.md is written by several scripts, each owning one `## ` section of it; what a section says
about the machine it was measured on."""

from __future__ import annotations

import platform
from pathlib import Path

from dpo.files import write_text_atomic


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
    write_text_atomic(path, new)  # whole or not at all: ~20 scripts' sections live in this one file


def versions() -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from dpo.compat import INSTALLED_TRL

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {INSTALLED_TRL}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
