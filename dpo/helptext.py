"""What `--help` shows: a command's whole module docstring (its examples included), laid out as written.

argparse re-wraps a description into one paragraph unless told otherwise, and a description cut at
the first paragraph drops the examples. Every entry point (python -m dpo.doctor, dpo.evaluate,
dpo.export, dpo.tiny, dpo.models, dpo.cache) passes its module docstring whole, with
RawDescriptionHelpFormatter (dpo.gate.flags.command_parser); recipes, parsed by TRL's TrlParser, get theirs
through `describe_recipe`, and their settings' help through `setting`.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


class RecipeHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default (what TrlParser shows by itself)."""


def script_docstring(path: str | Path) -> str:
    """The module docstring of a Python file, read without running it ("" when it has none)."""
    return ast.get_docstring(ast.parse(Path(path).read_text()), clean=True) or ""


def describe_recipe(parser: argparse.ArgumentParser, recipe_file: str | Path) -> argparse.ArgumentParser:
    """Give a recipe's parser the recipe's docstring as its description and say where settings come from.
    Returns the parser, unchanged when there is no such file (a YAML parsed without its recipe)."""
    recipe_file = Path(recipe_file)
    if not recipe_file.is_file():
        return parser
    parser.prog = recipe_file.name
    parser.description = script_docstring(recipe_file)
    parser.epilog = (
        f"Every option above can also be set in {recipe_file.with_suffix('.yaml').name} beside the recipe\n"
        "(read by default) or in another YAML given with --config FILE; a flag overrides both."
    )
    parser.formatter_class = RecipeHelpFormatter
    return parser


def setting(default, help: str):
    """A settings dataclass field (recipes' YAML keys and flags) whose `help` is what `--help` shows for it:
    HfArgumentParser and TrlParser read it from the field's metadata."""
    import dataclasses

    return dataclasses.field(default=default, metadata={"help": help})
