"""Mapping settings (activation_checkpointing_kwargs, lr_scheduler_kwargs, model_init_kwargs, ...): each key is
one the function that receives it takes, read from that function (dpo/gate/keywords.py), each value of its
kind; otherwise one `error:` line naming the key and the keys taken, exit 2, before any weights load. Every
mapping-valued field of the recipes' dataclasses is checked or listed with where it is."""

import dataclasses
import typing

import pytest
import torch
from helpers import ROOT, load_recipe, one_line_error

from dpo.compat import ModelConfig
from dpo.gate.check import mapping_problems
from dpo.gate.keywords import checkpoint_keys
from dpo.gate.table import MAPPINGS, MAPPINGS_ELSEWHERE
from dpo.train.config import RecipeDPOConfig, RecipeSFTConfig

RECIPES = ("dpo_any", "dpo_phi2", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds")


def _mapping(hint) -> bool:
    if hint is dict or typing.get_origin(hint) is dict:
        return True
    return any(_mapping(arg) for arg in typing.get_args(hint))


def mapping_settings(extra=()) -> set[str]:
    classes = [
        RecipeDPOConfig,
        RecipeSFTConfig,
        ModelConfig,
        *extra,
        *(load_recipe(r).ScriptArguments for r in RECIPES),
    ]
    found = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        found |= {f.name for f in dataclasses.fields(cls) if _mapping(hints.get(f.name, f.type))}
    return found


def test_every_mapping_setting_is_checked_or_listed_with_where():
    found = mapping_settings()
    assert {"activation_checkpointing_kwargs", "model_init_kwargs", "lr_scheduler_kwargs"} <= found
    assert found - set(MAPPINGS) - set(MAPPINGS_ELSEWHERE) == set()

    @dataclasses.dataclass
    class Upgraded(RecipeDPOConfig):  # a mapping field a TRL upgrade adds is found
        new_thing_kwargs: dict | None = None

    assert mapping_settings([Upgraded]) - set(MAPPINGS) - set(MAPPINGS_ELSEWHERE) == {"new_thing_kwargs"}


def test_the_checkpoint_keys_are_the_ones_torch_takes():
    """Every key the gate lets through torch.utils.checkpoint.checkpoint takes (transformers' own two aside);
    a key it refuses torch refuses too, after the weights loaded."""
    keys = checkpoint_keys()
    assert {"use_reentrant", "preserve_rng_state", "determinism_check", "every_n_layers", "offload"} <= set(keys)
    x = torch.ones(2, requires_grad=True)
    defaults = {"use_reentrant": False, "preserve_rng_state": True, "determinism_check": "default", "debug": False}
    for key, allowed in keys.items():
        if key in ("every_n_layers", "offload") or allowed == ():  # transformers' own; context_fn a function
            continue
        value = defaults.get(key, True)
        torch.utils.checkpoint.checkpoint(torch.sin, x, **{"use_reentrant": True, key: value})
    with pytest.raises(ValueError, match="Unexpected keyword arguments: garbage"):
        torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=True, garbage=1)


def test_the_shipped_yamls_pass():
    import yaml

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert mapping_problems(yaml.safe_load(path.read_text())) == [], path


@pytest.fixture
def local(tiny_model_dir, truthy_file, tmp_path):
    return ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", tmp_path / "out"]


CASES = {  # (recipe, line added to its YAML or flags, what the one error line must say)
    # was a ValueError after the weights loaded
    "checkpoint_key_unknown": (
        "dpo_phi2",
        "activation_checkpointing_kwargs: {garbage: 1}",
        "activation_checkpointing_kwargs.garbage is not a key it takes (the keys torch.utils.checkpoint.checkpoint",
    ),
    # was accepted: 'maybe' is truthy, so the reentrant variant ran
    "checkpoint_value_kind": (
        "dpo_phi2",
        "activation_checkpointing_kwargs: {use_reentrant: maybe}",
        "activation_checkpointing_kwargs.use_reentrant takes true or false or null; got 'maybe'",
    ),
    "checkpoint_a_function": (
        "dpo_phi2",
        "activation_checkpointing_kwargs: {context_fn: noop}",
        "activation_checkpointing_kwargs.context_fn takes a Python function, which a YAML or the command line",
    ),
    "old_name_on_the_command_line": (
        "dpo_phi2",
        ['--gradient_checkpointing_kwargs={"garbage": 1}'],
        "gradient_checkpointing_kwargs.garbage is not a key it takes",
    ),
    # was a TypeError traceback while the arguments were parsed
    "accelerator_config_key_unknown": (
        "dpo_any",
        "accelerator_config: {garbage: 1}",
        "accelerator_config.garbage is not a key it takes (the keys transformers' AcceleratorConfig takes: ",
    ),
    # were silently ignored
    "scheduler_key_unknown": (
        "dpo_phi2",
        "lr_scheduler_kwargs: {garbage: 1}",
        "lr_scheduler_kwargs.garbage is not a key lr_scheduler_type constant_with_warmup takes (its keys: none",
    ),
    "sft_dataset_key_unknown": (
        "sft_phi2",
        "dataset_kwargs: {skip_prepare: true}",
        "dataset_kwargs.skip_prepare is not a key it takes (the keys TRL's SFTTrainer takes: skip_prepare_dataset)",
    ),
    # was a TypeError after the weights loaded
    "model_init_key_unknown": (
        "dpo_any",
        "model_init_kwargs: {garbage: 1}",
        "model_init_kwargs.garbage is neither a key from_pretrained takes nor an attribute of the model's config",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mapping_key_that_nothing_takes_is_one_line_before_weights_load(
    case, local, tmp_path, capsys, no_weights_load
):
    recipe_name, given, expected = CASES[case]
    flags = given if isinstance(given, list) else []
    if not flags:
        config = tmp_path / "settings.yaml"
        key = given.split(":", 1)[0]
        lines = (ROOT / "recipes" / f"{recipe_name}.yaml").read_text().splitlines()
        config.write_text("\n".join([line for line in lines if not line.startswith(f"{key}:")] + [given]) + "\n")
        flags = ["--config", config]
    line = one_line_error(load_recipe(recipe_name).main, [*local, *flags], capsys)
    assert expected in line, line


def test_keys_that_are_taken_pass(tiny_model_dir):
    """A config attribute in model_init_kwargs (from_pretrained sets it on the config), a scheduler's own key,
    a JSON file's path for accelerator_config."""
    from transformers import AutoConfig

    from dpo.gate.check import problems
    from dpo.gate.integrations import model_init_problems

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert model_init_problems({"use_cache": False, "device_map": "cpu", "dtype": "float32"}, config) == []
    assert model_init_problems({"use_cahce": False}, config) != []
    settings = {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 0.5}}
    assert problems(settings) == []
    assert mapping_problems({"accelerator_config": "accelerator.json", "activation_checkpointing_kwargs": None}) == []
    given = {"activation_checkpointing_kwargs": '{"use_reentrant": false, "every_n_layers": 2}'}
    assert mapping_problems(given) == []


def test_deepspeed_without_its_package_is_one_line(local, tmp_path, capsys, no_weights_load):
    """Was a PackageNotFoundError traceback while the arguments were parsed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    line = one_line_error(load_recipe("dpo_any").main, [*local, '--deepspeed={"train_batch_size": 8}'], capsys)
    assert "deepspeed is set but the deepspeed package is not installed" in line, line
