"""The settings gate's table (dpo/gate/table.py): no numeric setting escapes it, and every bound in it
is enforced at the real entry points, before any weights load, as one `error:` line."""

import argparse
import dataclasses
import math
import typing

import pytest
from helpers import ENTRY_MODULES, load_recipe

from dpo.compat import ModelConfig
from dpo.gate.check import problems
from dpo.gate.rules import Bound, Choice, Each, Named
from dpo.gate.table import DELEGATED, TABLE, UNCHECKED
from dpo.train.config import RecipeDPOConfig, RecipeSFTConfig

RECIPES = ("dpo_any", "dpo_phi2", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds")
COMMANDS = ENTRY_MODULES


def _numeric(hint) -> bool:
    if hint in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(hint) if arg is not type(None))


class _Parsed(Exception):
    pass


def command_parser(module_name: str) -> argparse.ArgumentParser:
    """The parser a command's main builds, caught as it parses (no command runs)."""
    import importlib

    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = catch
    try:
        module.main(["x"])
    except _Parsed as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module_name}.main never parsed its flags")


def numeric_settings(extra=()) -> dict[str, str]:
    """name -> where, for every int/float (or list of them) setting of the dataclasses and commands."""
    found = {}
    classes = [RecipeDPOConfig, RecipeSFTConfig, ModelConfig, *extra]
    classes += [load_recipe(r).ScriptArguments for r in RECIPES]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if _numeric(hints.get(field.name, field.type)):
                found.setdefault(field.name, cls.__name__)
    for command, module in COMMANDS.items():
        parsers = [command_parser(module)]
        for parser in parsers:  # subcommands' parsers too (python -m dpo.cache remove)
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers += list(action.choices.values())
                elif action.type in (int, float):
                    found.setdefault(action.dest, f"python -m dpo.{command}")
    return found


def unknown_to_the_gate(found: dict[str, str]) -> list[str]:
    return sorted(
        f"{name} ({where})" for name, where in found.items() if name not in {**TABLE, **DELEGATED, **UNCHECKED}
    )


def test_every_numeric_setting_is_in_the_table_or_listed_with_its_reason():
    found = numeric_settings()
    assert len(found) > 40  # TRL's and transformers' fields were really enumerated
    assert {"num_prompts", "max_new_tokens", "seed", "learning_rate", "lora_r", "test_size", "unused_days"} <= set(
        found
    )
    missing = unknown_to_the_gate(found)
    assert not missing, f"settings the gate does not know; add each to dpo/gate/table.py: {missing}"
    assert all(rule.why for rule in TABLE.values()) and all(DELEGATED.values()) and all(UNCHECKED.values())


def test_the_enumeration_catches_a_field_added_by_an_upgrade():
    """A new numeric DPOConfig field, as a TRL upgrade would add, is reported as unknown to the gate."""

    @dataclasses.dataclass
    class Upgraded(RecipeDPOConfig):
        new_upgrade_coef: float = 0.5

    assert unknown_to_the_gate(numeric_settings(extra=[Upgraded])) == ["new_upgrade_coef (Upgraded)"]


def outside_cases():
    for name, rule in sorted(TABLE.items()):
        for value in rule.outside():
            yield pytest.param(name, value, id=f"{name}={value}")


def _flags(name, value) -> list[str]:
    if isinstance(value, list):  # one entry, after '=' so that a negative number is not read as a flag
        return [f"--{name}={value[0]}"]
    return [f"--{name}={value}"]


def _where(name) -> str:
    """The entry point that takes `name`: the generic DPO recipe, the SFT recipe, or a command."""
    if name in {a.dest for a in command_parser("dpo.evaluation.export")._actions}:
        return "export"
    for recipe in ("dpo_any", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds"):
        r = load_recipe(recipe)
        config = RecipeSFTConfig if recipe == "sft_phi2" else RecipeDPOConfig
        if any(name in {f.name for f in dataclasses.fields(c)} for c in (r.ScriptArguments, config, ModelConfig)):
            return recipe
    return "cache" if name == "unused_days" else "evaluate"  # the one flag of python -m dpo.cache remove


@pytest.mark.parametrize("name, value", list(outside_cases()))
def test_each_bound_is_refused_just_outside_it_before_weights_load(
    name, value, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    where = _where(name)
    if where in ("evaluate", "export"):
        from dpo.evaluation.evaluate import main as evaluate
        from dpo.evaluation.export import main as export

        main = export if where == "export" else evaluate
        argv = [str(tmp_path / "run"), *_flags(name, value)]
    elif where == "cache":
        from dpo.train.speed.refcache_admin import main

        argv = ["--cache_dir", str(tmp_path), "remove", *_flags(name, value)]
    else:
        main = load_recipe(where).main
        argv = ["--output_dir", str(tmp_path / "out"), *_flags(name, value)]
        if where not in ("dpo_sentiment_tiny", "dpo_rounds"):  # the demos make their own model and data
            argv += ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    # the gate's table, or transformers' own check of the same bound while parsing: one line naming the setting
    assert name in lines[0] and ("invalid setting" in lines[0] or "invalid configuration" in lines[0]), lines[0]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_default_and_the_bound_itself_pass(name):
    rule = TABLE[name]
    if isinstance(rule, Choice):
        assert all(rule.ok(v) for v in rule.values)
    elif isinstance(rule, Each):
        assert rule.ok(None) and rule.ok([0.0, 1.0]) and rule.ok([1.0])
    elif isinstance(rule, Named):
        assert rule.ok(None) and all(rule.ok(v) for v in rule.names())
    else:
        assert isinstance(rule, Bound)
        for end, is_open in ((rule.low, rule.low_open), (rule.high, rule.high_open)):
            if end is not None and not is_open:
                assert rule.ok(int(end) if rule.whole else end), (name, end)
        assert all(rule.ok(u) for u in rule.unset)


def test_the_shipped_defaults_pass_the_table():
    config = RecipeDPOConfig(output_dir="x", use_cpu=True, bf16=False)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(RecipeDPOConfig)}
    values.update({f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)})
    assert problems(values) == []


def test_nan_and_inf_are_refused_for_every_real_bound():
    for name, rule in TABLE.items():
        if isinstance(rule, Bound) and not rule.whole:
            assert not rule.ok(math.nan) and not rule.ok(math.inf) and not rule.ok(-math.inf), name


def test_attention_names_are_the_ones_transformers_takes(tiny_model_dir):
    """The gate's attn_implementation rule against transformers' own check (from_pretrained runs it): every
    name the gate passes is one transformers knows (a missing package, as flash_attn here, is another
    error), a hub kernel id passes to transformers' kernel loader, and a misspelling both refuse."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rule = TABLE["attn_implementation"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))

    def transformers_refuses_the_name(name) -> bool:
        try:
            model.get_correct_attn_implementation(name)
        except ValueError as err:
            return "is not supported" in str(err)
        except ImportError:  # known, but its package is not installed here
            pass
        return False

    assert {"eager", "sdpa", "flash_attention_2"} <= set(rule.names())
    assert not any(transformers_refuses_the_name(name) for name in rule.names())
    assert rule.ok("kernels-community/flash-attn2") and rule.ok("org/repo@v2:attention")
    for wrong in ("sdpx", "Eager", "flash_attention2", "org/", "eager_fp32_scores"):  # the last: the recipes' own
        assert not rule.ok(wrong), wrong
    assert transformers_refuses_the_name("sdpx") and transformers_refuses_the_name("flash_attention2")
