"""The command line is read once: `--config` given twice is refused by every recipe, in both spellings, and any
flag given twice by every command (dpo/gate/flags.py check_repeated_flags), in one `error:` line."""

import pytest
from helpers import ROOT, load_recipe, one_line_error

RECIPES = ("dpo_any", "dpo_phi2", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds")


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("form", ["--config a.yaml --config b.yaml", "--config=a.yaml --config b.yaml"])
def test_config_given_twice_is_refused_by_every_recipe(recipe_name, form, tmp_path, capsys, no_weights_load):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text((ROOT / "recipes" / f"{recipe_name}.yaml").read_text())
    argv = [
        arg.replace("a.yaml", str(tmp_path / "a.yaml")).replace("b.yaml", str(tmp_path / "b.yaml"))
        for arg in form.split()
    ]
    line = one_line_error(load_recipe(recipe_name).main, [*argv, "--output_dir", tmp_path / "out"], capsys)
    assert "--config is given twice on the command line" in line, line


TWICE = {  # each command of helpers.ENTRY_MODULES, one of its flags given twice
    "doctor": ["pairs.jsonl", "--max_length", "8", "--max_length=9"],
    "evaluate": ["run", "--seed", "1", "--seed=2"],
    "export": ["run", "--merged", "a", "--merged", "b"],
    "tiny": ["out", "--seed", "1", "--seed", "2"],
    "models": ["smollm2-135m-instruct", "--help", "--help"],  # its one flag
    "cache": ["--cache_dir", "a", "--cache_dir", "b", "list"],
}


def test_every_command_has_a_case():
    from helpers import ENTRY_MODULES

    assert set(TWICE) == set(ENTRY_MODULES)


@pytest.mark.parametrize("command", sorted(TWICE))
def test_a_flag_given_twice_is_refused_by_every_command(command, tmp_path, capsys, monkeypatch):
    import importlib

    from helpers import ENTRY_MODULES

    argv = TWICE[command]
    monkeypatch.chdir(tmp_path)
    flag = next(a.split("=")[0] for a in argv if a.startswith("--"))
    line = one_line_error(importlib.import_module(ENTRY_MODULES[command]).main, argv, capsys)
    assert f"{flag} is given twice on the command line" in line, line
