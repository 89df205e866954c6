"""The settings gate: every setting of a recipe or command, checked against the declared tables
before any weights load. One call per entry point:

    check_settings(script_args, training_args, model_args)   the recipes (dpo.train.config.load_recipe_args)
    check_flags(args)                                         python -m dpo.doctor (after its own checks)
    parse_and_check_flags(parser, argv)                       python -m dpo.{evaluate,export,cache,models,tiny}

Beside the tables, the gate checks what a table cannot declare: a token under any key (credentials.py) and
the output folder on the file system (output_dir.py), both called by the recipes and the trainer builder.

Both apply dpo/gate/table.py (each setting's bound, and the relations between settings) and, for a
DPO config, the loss table (dpo/scratch/loss_settings.py, restricted to TRL's loss types). Every
problem is named at once, in one line: "invalid setting(s): a ...; b ...".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os

from dpo.errors import UserError
from dpo.folders import empty_path_problem
from dpo.gate.flags import command_line_values, parse_flags
from dpo.gate.table import ENV_PATHS, MAPPINGS, PATHS, RELATIONS, TABLE


def settings_of(*arg_objects) -> dict:
    """name -> value over dataclass instances, argparse namespaces and dicts; the first object wins."""
    values: dict = {}
    for obj in arg_objects:
        if obj is None:
            continue
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, argparse.Namespace):
            items = vars(obj).items()
        else:
            items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        for name, value in items:
            values.setdefault(name, value)
    return values


def _shown(value) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _whole(rule, value) -> str:
    """ " and a whole number" where the value was refused for its fraction (seed: 1.5)."""
    fraction = isinstance(value, float) and value == value and abs(value) != float("inf") and not value.is_integer()
    return " and a whole number" if getattr(rule, "whole", False) and fraction else ""


def table_problems(values: dict) -> list[str]:
    """A line per tabled setting outside its bound, then per relation that fails."""
    problems = [
        f"{name} {rule.describe()}{_whole(rule, values[name])}; got {_shown(values[name])} ({rule.why})"
        for name, rule in TABLE.items()
        if name in values and not rule.ok(values[name])
    ]
    for _, relation in RELATIONS:
        if message := relation(values.get):
            problems.append(message)
    return problems


def mapping_problems(values: dict) -> list[str]:
    """The mapping settings (table MAPPINGS) as given, in the YAML or as JSON on the command line, before the
    dataclasses parse them: each key one the receiving function takes, each value of its kind."""
    found = []
    for name, rule in MAPPINGS.items():
        value = values.get(name)
        if isinstance(value, str) and value.lstrip().startswith("{"):  # transformers reads such text as JSON
            try:
                value = json.loads(value)
            except ValueError:
                continue  # transformers names the broken JSON while parsing
        if message := rule.problem(name, value):
            found.append(message)
    if values.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:  # was a traceback while parsing
        found.append("deepspeed is set but the deepspeed package is not installed: pip install deepspeed, or unset it")
    return found


def loss_problems(values: dict) -> list[str]:
    if "beta" not in values:  # not a DPO config (the SFT recipe's SFTConfig has no preference loss)
        return []
    from dpo.compat import LOSS_TYPES  # TRL's loss types (no cdpo)
    from dpo.scratch.loss_settings import DEFAULT_DISCOPOP_TAU, DEFAULT_F_ALPHA, loss_settings_error

    message = loss_settings_error(
        list(values["loss_type"]),
        values.get("loss_weights"),
        values["beta"],
        values["label_smoothing"],
        values["f_divergence_type"],
        values.get("f_alpha_divergence_coef", DEFAULT_F_ALPHA),
        values.get("discopop_tau", DEFAULT_DISCOPOP_TAU),
        known=LOSS_TYPES,
        use_weighting=values.get("use_weighting", False),
    )
    return [message] if message else []


def path_problems(values: dict) -> list[str]:
    """A line per path setting (PATHS) or environment variable (ENV_PATHS) that is empty or blank."""
    found = [empty_path_problem(values.get(name), name) for name in PATHS]
    found += [empty_path_problem(os.environ.get(name), f"the environment variable {name}") for name in ENV_PATHS]
    return [p for p in found if p]


def check_paths_before_parsing(yaml_values: dict, argv: list[str]) -> None:
    """The path rule (path_problems) on the YAML's values and the command line as given: transformers'
    TrainingArguments acts on some paths while it is built (deepspeed: ' ' imports DeepSpeed), before the gate."""
    _raise(path_problems({**yaml_values, **command_line_values(argv, PATHS)}))


def problems(*arg_objects) -> list[str]:
    values = settings_of(*arg_objects)
    return path_problems(values) + table_problems(values) + loss_problems(values)


def _raise(found: list[str]) -> None:
    if found:
        raise UserError("invalid setting(s): " + "; ".join(p.rstrip(".") for p in found))


def check_settings(*arg_objects) -> None:
    """Raise one UserError naming every setting of the recipe's argument objects that breaks a rule."""
    _raise(problems(*arg_objects))


def check_flags(args: argparse.Namespace) -> None:
    """The same tables for a command's parsed flags (`--num_prompts`, `--seed`, ...)."""
    _raise(problems(args))


def parse_and_check_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """A command's flags parsed strictly (dpo/gate/flags.py: one-line errors, none unknown or given twice), then
    checked against the tables: what every `python -m dpo.*` command's `main` starts with."""
    args = parse_flags(parser, argv)
    check_flags(args)
    return args
