"""Properties of the dpo/ library as a whole."""

import ast
import re
import shutil
import sys
from pathlib import Path

import trl
from helpers import ROOT


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_from_scratch_dpo_uses_plain_pytorch_only():
    """loss.py never imports TRL or transformers; loop.py imports no TRL (it may use peft)."""
    assert not imported_modules(ROOT / "dpo" / "scratch" / "loss.py") & {"trl", "transformers", "peft"}
    assert "trl" not in imported_modules(ROOT / "dpo" / "scratch" / "loop.py")


def test_trl_is_imported_only_in_compat():
    """Everything sensitive to the TRL version lives in dpo/compat.py."""
    users = sorted(p.name for p in (ROOT / "dpo").glob("*.py") if "trl" in imported_modules(p))
    assert users == ["compat.py"]


def test_loss_types_match_trl_and_our_module():
    from dpo.compat import LOSS_TYPES, TESTED_TRL
    from dpo.scratch import loss_settings

    assert trl.__version__ == TESTED_TRL
    assert set(loss_settings.LOSS_TYPES) - {"cdpo"} == set(LOSS_TYPES)
    # TRL's trainer names its accepted loss types in its unknown-loss error message
    source = (Path(trl.__file__).parent / "trainer" / "dpo_trainer.py").read_text()
    accepted = source[source.index("Unknown loss type") :][:600]
    for name in LOSS_TYPES:
        assert f"'{name}'" in accepted, name


def test_the_hub_hint_names_a_command_that_is_installed():
    """The 'could not load' message suggests `hf download`; the pinned huggingface_hub ships `hf`."""
    from dpo.train.model_checks import _fetch_error

    message = str(_fetch_error("model", "org/name", OSError("offline"), "--model_name_or_path"))
    command = message.split("`")[1].split()[0]
    assert command == "hf"
    assert shutil.which(command, path=str(Path(sys.executable).parent)) is not None


def test_no_script_in_recipes_shadows_the_library():
    """`python recipes/x.py` puts recipes/ first on sys.path: a recipes/dpo.py would be imported
    instead of the dpo package by every other recipe."""
    assert not (ROOT / "recipes" / "dpo.py").exists()


def test_the_library_never_loads_files_from_recipes():
    """dpo/ works installed without -e: recipes, notebooks, benchmarks and tests import dpo/, never the reverse."""
    offenders = []
    for path in sorted((ROOT / "dpo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("recipes", "recipes/"):
                offenders.append(f"{path.name}:{node.lineno}: path into recipes/")
            if isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "run_path"):
                offenders.append(f"{path.name}:{node.lineno}: loads a script file")
    assert offenders == []


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```")[1]
    listed = set(re.findall(r"\b(\w+\.py)\b", layout))
    modules = {p.name for p in (ROOT / "dpo").glob("*.py")} - {"__init__.py"}
    assert modules - listed == set(), "add them to README's layout section"
