"""dpo/helptext.py: every command's --help is whole: its module docstring with every example, no sentence
left hanging on a ':' (the doctor's help used to stop at "...with the recipes' flag names:")."""

import importlib
import re

import pytest
from helpers import ENTRY_MODULES, ROOT, load_recipe

from dpo.helptext import script_docstring

# python -m dpo.<command> runs the `main` of the module that holds its code (dpo/<command>.py only calls it)
COMMANDS = ENTRY_MODULES
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
SECTIONS = re.compile(r"^(usage|positional arguments|options|optional arguments|[\w ]+ arguments):")


def rendered_help(main, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def squeeze(text: str) -> str:
    return " ".join(text.split())


def hanging_colons(help_text: str) -> list[str]:
    """Lines of prose that end in ':' with nothing after them before the next argparse section."""
    lines = help_text.splitlines()
    hanging = []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith(":") or SECTIONS.match(line):
            continue
        rest = [later for later in lines[i + 1 :] if later.strip()]
        if not rest or SECTIONS.match(rest[0]):
            hanging.append(line)
    return hanging


def check_whole(help_text: str, doc: str):
    assert doc.strip(), "the command has no docstring to show"
    examples = [line.strip() for line in doc.splitlines() if line.strip().startswith(("python ", "accelerate "))]
    missing = [example for example in examples if example not in help_text]
    assert not missing, f"examples missing from --help: {missing}"
    assert squeeze(doc) in squeeze(help_text), "--help does not show the whole docstring"
    assert not hanging_colons(help_text)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_dpo_command_help_shows_its_whole_docstring(command, capsys):
    module = importlib.import_module(COMMANDS[command])
    check_whole(rendered_help(module.main, capsys), module.__doc__)
    assert importlib.import_module(f"dpo.{command}").main is module.main  # the entry module runs this main


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_help_shows_its_whole_docstring_and_where_settings_come_from(recipe, capsys, no_weights_load):
    help_text = rendered_help(load_recipe(recipe).main, capsys)
    check_whole(help_text, script_docstring(ROOT / "recipes" / f"{recipe}.py"))
    assert f"{recipe}.yaml" in help_text and "--config FILE" in help_text


def test_a_help_cut_after_a_colon_is_caught():
    cut = "usage: x [-h]\n\nThe data doctor: checks pairs, alone, with the flag names:\n\noptions:\n  -h, --help\n"
    assert hanging_colons(cut) == ["The data doctor: checks pairs, alone, with the flag names:"]
    whole = cut.replace("names:\n", "names:\n\n    python -m dpo.doctor data.jsonl\n")
    assert hanging_colons(whole) == []
