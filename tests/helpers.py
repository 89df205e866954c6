"""What several test modules share: the repository root, recipe and script loading, row builders.

Recipes and benchmarks are scripts, not a package (dpo/ never imports them), so tests load them
from their files here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Real human preferences: Anthropic HH-RLHF harmless-base test split, the original file (data/hh-rlhf/README.md).
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def load_script(path: str | Path, name: str | None = None):
    """Import a script file (a recipe, a benchmark) as a module without running its `__main__`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """recipes/<name>.py as a module: its ScriptArguments and main."""
    return load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")
