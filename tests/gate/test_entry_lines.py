"""An entry point's one `error:` line stands alone and the command line is read once: TRL's FutureWarnings
for a YAML that omits activation_checkpointing are held (dpo/errors.py), and `--config` given twice is refused
by every recipe (dpo/gate/flags.py check_repeated_flags), as any flag given twice is by every command."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, load_recipe, one_line_error

RECIPES = ("dpo_any", "dpo_phi2", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds")


@pytest.mark.slow
def test_a_yaml_without_activation_checkpointing_prints_the_error_line_alone(tiny_model_dir, truthy_file, tmp_path):
    """As a user runs it (no warning filters). Leaving activation_checkpointing out of the YAML made TRL's
    DPOConfig set the deprecated gradient_checkpointing, and two FutureWarning lines printed ahead of the error."""
    lines = (ROOT / "recipes" / "dpo_any.yaml").read_text().splitlines()
    config = tmp_path / "settings.yaml"
    config.write_text("\n".join(line for line in lines if not line.startswith("activation_checkpointing")) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    flags = ["--config", config, "--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file]
    flags += ["--output_dir", tmp_path / "out", "--learning_rate", "-1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dpo_any.py"), *map(str, flags)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    shown = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(shown) == 1, proc.stderr[-2000:]
    assert shown[0].startswith("error: invalid setting(s): learning_rate must be > 0"), shown


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
