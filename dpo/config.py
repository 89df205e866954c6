"""Command-line and YAML configuration for recipes, through TRL's own `TrlParser`.

Order of precedence, lowest first: dataclass defaults < hardware precision defaults
(dpo/hardware.py) < the YAML (`--config`, by default the YAML beside the recipe) < CLI flags.
YAML keys are dataclass field names; an unknown key or flag stops the run and is named.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import yaml
from transformers.trainer_utils import get_last_checkpoint

from dpo.compat import REMOVED_OPTIONS, DPOConfig, ModelConfig, TrlParser
from dpo.errors import UserError
from dpo.hardware import describe, detect_precision
from dpo.log import log

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclasses.dataclass
class RecipeDPOConfig(DPOConfig):
    """TRL's DPOConfig plus this repo's own switches (YAML keys like every other field)."""

    reference_cache: bool = dataclasses.field(
        default=False,
        metadata={"help": "Compute reference log-probs once and keep them on disk for later runs (dpo/refcache.py)."},
    )
    reference_cache_dir: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Folder of the reference cache; unset: $DPO_REFERENCE_CACHE or ~/.cache/dpo-recipes/reference-logps."
        },
    )


def load_script(path: str | Path, name: str | None = None):
    """Import a script file (a recipe, a benchmark) as a module without running its `__main__`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """recipes/<name>.py as a module (its ScriptArguments and main). recipes/ is a folder of
    scripts, not a package, so notebooks, the demo and tests import recipes through this."""
    return load_script(RECIPES_DIR / f"{name}.py", f"recipe_{name}")


def _unknown_key_message(keys: list[str], source: str) -> str:
    lines = [f"unknown {source} key(s): {', '.join(keys)}"]
    for key in keys:
        if key in REMOVED_OPTIONS:
            lines.append(f"  {key}: removed from TRL; {REMOVED_OPTIONS[key]}")
    lines.append("  valid keys are the fields of the recipe's dataclasses; see `--help`")
    return "\n".join(lines)


def parse_recipe_args(dataclass_types, default_config: str | Path, argv: list[str] | None = None):
    """Parse `argv` (default: sys.argv) into instances of `dataclass_types`.

    Without `--config`, the recipe's own YAML (`default_config`) is read.
    Returns (instances..., precision) where precision says what the hardware suggested.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
    at = argv.index("--config")
    if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
        raise UserError("--config needs a YAML file: --config recipes/dpo_phi2.yaml")
    config_path = Path(argv[at + 1])
    if not config_path.is_file():
        raise UserError(f"config file not found: {config_path}")
    try:
        yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{config_path} is not valid YAML: {err}") from None

    parser = TrlParser(dataclass_types)
    precision = detect_precision()
    parser.set_defaults_with_config(**precision.as_defaults())
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as err:
        msg = str(err)
        if msg.startswith("Unknown arguments from config file"):
            keys = re.findall(r"'--([^']+)'", msg)
            raise UserError(f"{config_path}: " + _unknown_key_message(keys, "config")) from None
        if msg.startswith("Some specified arguments are not used"):
            keys = [k.lstrip("-") for k in re.findall(r"'(--[^']+)'", msg)]
            raise UserError(_unknown_key_message(keys, "command-line")) from None
        raise UserError(f"invalid configuration ({config_path} + command line): {msg}") from None
    return (*parsed, precision)


def load_recipe_args(script_arguments_class, recipe_file: str | Path, argv: list[str] | None = None):
    """The args phase of a recipe: (script_args, training_args, model_args), checked and logged.

    Reads the YAML beside `recipe_file` unless `--config` says otherwise; refuses tokens in
    the config; resolves `--resume_from_checkpoint last` to a folder; logs the precision.
    """
    script_args, training_args, model_args, precision = parse_recipe_args(
        (script_arguments_class, RecipeDPOConfig, ModelConfig), Path(recipe_file).with_suffix(".yaml"), argv
    )
    check_no_token_in_config(training_args)
    training_args.resume_from_checkpoint = resolve_resume(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    log(f"hardware: {precision.reason}; using {describe(training_args.bf16, training_args.fp16, model_args.dtype)}")
    return script_args, training_args, model_args


def check_no_token_in_config(training_args) -> None:
    """Tokens belong in the HF_TOKEN environment variable, never in YAML, flags or checkpoints."""
    if getattr(training_args, "hub_token", None):
        raise UserError(
            "hub_token was given in the config or on the command line; it would be saved in every "
            "checkpoint's training_args.bin. Remove it and `export HF_TOKEN=...` instead."
        )


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint` accepts a checkpoint folder, or `last` for the newest in output_dir."""
    if value in (None, "", "false", "False"):
        return None
    if value in ("last", "true", "True"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}")
        return last
    if not Path(value).is_dir():
        raise UserError(f"--resume_from_checkpoint: checkpoint folder not found: {value}")
    return value


SECRET_KEYS = ("hub_token",)  # never written, even if set (check_no_token_in_config refuses it anyway)
HARDWARE_KEYS = ("bf16", "fp16", "use_cpu", "dtype")  # picked by dpo/hardware.py for the machine that ran


def to_plain(obj):
    """A dataclass as a YAML/JSON-safe dict (enums and paths as strings, secrets dropped)."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    data = {k: v for k, v in data.items() if k not in SECRET_KEYS}
    return json.loads(json.dumps(data, default=str))


def write_resolved_config(path: str | Path, *arg_objects) -> Path:
    """Write every field of every argument object, as resolved, to one YAML file.

    The file is a valid `--config` for the same recipe: re-running with it repeats the run.
    """
    merged: dict = {}
    for obj in arg_objects:
        merged.update(to_plain(obj))
    merged.pop("resume_from_checkpoint", None)  # a re-run starts fresh unless asked to resume
    header = (
        "# Every setting of this run, as resolved (YAML < --config < CLI). Re-run with:\n"
        "#   accelerate launch <recipe>.py --config <this file>\n"
        f"# {', '.join(HARDWARE_KEYS)} were picked for the hardware of the machine that ran;\n"
        "# delete those lines to let a different machine pick its own.\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(merged, sort_keys=True))
    return path
