"""Every command the tools write for a user to run works: resolved_config.yaml is a valid --config for the
recipe that wrote it and repeats every setting, and a model card's "Reproduce" command, run as written,
trains the same run again.

Was: TrainingArguments.to_dict writes every field named *_token as "<NAME>", so each resolved_config.yaml
held `pad_token: <PAD_TOKEN>`; the card's command then stopped at "pad_token '<PAD_TOKEN>' is not a token"
and the demo's own file at a ValueError traceback."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, cli, load_recipe

from dpo.compat import ModelConfig
from dpo.evaluation.model_card import model_card, recipe_of
from dpo.train.config import RecipeDPOConfig, RecipeSFTConfig, parse_recipe_args, write_resolved_config

RECIPES = ["dpo_phi2", "dpo_any", "dpo_sentiment_tiny", "dpo_rounds", "sft_phi2"]


def recipe_types(name):
    training = RecipeSFTConfig if name.startswith("sft") else RecipeDPOConfig
    return (load_recipe(name).ScriptArguments, training, ModelConfig)


@pytest.mark.parametrize("name", RECIPES)
def test_resolved_config_is_a_config_that_repeats_every_setting(name, tmp_path):
    """The recipe's own YAML, a token setting given, written out and read back: every field the same."""
    types, yaml_file = recipe_types(name), ROOT / "recipes" / f"{name}.yaml"
    first = parse_recipe_args(types, yaml_file, ["--output_dir", str(tmp_path / "run"), "--pad_token", "<|pad|>"])
    written = write_resolved_config(tmp_path / "resolved_config.yaml", *first[:3])
    again = parse_recipe_args(types, yaml_file, ["--config", str(written)])
    assert recipe_of(yaml.safe_load(written.read_text())) == f"recipes/{name}.py"
    for before, after in zip(first[:3], again[:3]):
        for field in dataclasses.fields(before):
            assert getattr(after, field.name) == getattr(before, field.name), field.name
    assert again[1].pad_token == "<|pad|>"


@pytest.mark.slow
def test_the_demo_cards_reproduce_command_runs_as_written(tmp_path):
    """The demo (shortened), then its card's command, run as the card says from a folder holding the
    recipes and the run's resolved_config.yaml: it exits 0 and trains the same run (same settings and data)."""
    out = tmp_path / "demo"
    tiny = cli(sft_examples=64, sft_steps=2, pair_prompts=16, heldout_pair_prompts=16, eval_prompts=8, max_steps=2)
    load_recipe("dpo_sentiment_tiny").main([*tiny, "--output_dir", str(out)])
    first = json.loads((out / "run_complete.json").read_text())
    card = model_card(out)
    commands = re.findall(r"## Reproduce\n\n```bash\n(.*?)\n```", card, re.S)
    assert len(commands) == 1, card
    command = shlex.split(commands[0], comments=True)
    assert command[:2] == ["accelerate", "launch"], command
    here = tmp_path / "user"
    here.mkdir()
    (here / "recipes").symlink_to(ROOT / "recipes")
    (here / "resolved_config.yaml").write_bytes((out / "resolved_config.yaml").read_bytes())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *command[2:]],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "error:" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    again = json.loads((out / "run_complete.json").read_text())
    assert again["run"] == first["run"]  # every setting that shapes the weights, and the pairs' sha256
