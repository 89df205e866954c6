"""Command-line and YAML configuration for recipes, through TRL's own `TrlParser`.

Order of precedence, lowest first: dataclass defaults < hardware precision defaults
(dpo/train/hardware.py) < the YAML (`--config`, by default the YAML beside the recipe) < CLI flags.
YAML keys are dataclass field names; an unknown key or flag stops the run and is named.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from pathlib import Path

import yaml

from dpo.compat import REMOVED_OPTIONS, DPOConfig, ModelConfig, SFTConfig, TrlParser
from dpo.errors import UserError
from dpo.folders import output_kind_problem
from dpo.gate.autobatch import drop_companions, resolve_auto_batch
from dpo.gate.check import check_paths_before_parsing, check_settings, mapping_problems
from dpo.gate.credentials import check_no_secrets
from dpo.gate.flags import (
    check_repeated_flags,
    choice_problems,
    command_line_values,
    one_line_parse_errors,
    yaml_kind_problems,
)  # noqa: F401  (one_line_parse_errors: the doctor's)
from dpo.gate.integrations import check_integrations
from dpo.gate.output_dir import check_output_dir, check_output_dir_apart
from dpo.gate.table import MAPPINGS
from dpo.helptext import describe_recipe, setting
from dpo.log import log
from dpo.train.distributed import check_launch, on_main_process, topology
from dpo.train.hardware import describe, detect_precision
from dpo.train.safety import lock
from dpo.train.safety.checkpoints import PER_INVOCATION_KEYS, RunOptions, resolve_resume


@dataclasses.dataclass
class DataArguments:
    """The data fields every recipe shares (as the alignment-handbook's ScriptArguments); YAML keys = field names."""

    dataset_name: str = dataclasses.field(
        metadata={"help": "Hub dataset id or local .jsonl/.json/.parquet/.csv file or folder."}
    )
    dataset_config: str | None = setting(None, "Hub dataset configuration name.")
    dataset_train_split: str = setting("train", "Split to train on.")
    test_size: float = setting(
        0.1, "Fraction of the training rows held out (seeded) when there is no test split; 0 for none."
    )


@dataclasses.dataclass
class DPOScriptArguments(DataArguments):
    """DataArguments plus where DPO starts: a base model, or an SFT adapter on it."""

    sft_adapter_path: str | None = setting(
        None, "Start from this SFT adapter (folder or hub id): pi_ref = base + it, frozen; the policy starts as it."
    )


@dataclasses.dataclass
class RecipeDPOConfig(DPOConfig, RunOptions):
    """What the DPO recipes parse: TRL's DPOConfig, RunOptions (resume and output_dir reuse,
    dpo/train/safety/checkpoints.py), the reference cache (dpo/train/speed/refcache.py) and packed pairs
    (dpo/train/speed/packing.py). YAML keys like every other field."""

    reference_cache: bool = setting(
        False, "Compute reference log-probs once and keep them on disk for later runs (dpo/train/speed/refcache.py)."
    )
    reference_cache_dir: str | None = setting(
        None, "Folder of the reference cache; unset: $DPO_REFERENCE_CACHE or ~/.cache/dpo-recipes/reference-logps."
    )
    packing: bool = setting(
        False,
        "Run each batch's chosen and rejected sequences as one row without padding (dpo/train/speed/packing.py).",
    )
    packing_attention: str = setting(
        "auto",
        "With packing: true on an SDPA model, how attention keeps the packed sequences apart: segments (SDPA "
        "per sequence), flex (flex attention, CUDA), varlen (flash varlen, CUDA, bf16/fp16), or auto: segments on "
        "a CPU, varlen else flex on CUDA (dpo/train/speed/packed_attention.py).",
    )
    # per_device_train_batch_size: auto (dpo/gate/autobatch.py reads it, dpo/train/speed/autobatch.py decides)
    auto_batch_base: int | None = setting(
        None,
        "With per_device_train_batch_size: auto, the configured micro-batch (default 1): kept where auto "
        "does not choose (no CUDA device); x gradient_accumulation_steps = the pairs per optimizer step auto keeps.",
    )
    auto_batch_memory_gib: float | None = setting(
        None,
        "With per_device_train_batch_size: auto, the GPU memory (GiB) the run may plan for (15 for a T4); "
        "unset: the device's free memory. A margin of max(1 GiB, a tenth) is kept below it.",
    )
    # TRL's SFTConfig has it, its DPOConfig not: read by the data doctor (dpo/data/doctor.py), which renders the
    # pairs with it; the tokenizer trained and saved with the run carries it (recipes/dpo_any.py)
    chat_template_path: str | None = setting(
        None,
        "A Jinja chat template file (.jinja/.j2) for chat rows instead of the tokenizer's own, as TRL's "
        "SFTConfig takes it; e.g. one that renders tool calls (dpo/data/tools.py).",
    )

    # No __post_init__ here taking per_device_train_batch_size="auto" in code: a frame between DPOConfig's and the
    # caller would attribute TRL's deprecation warnings to this module. In code, auto is auto_batch_base=N with
    # per_device_train_batch_size=N (what the parser makes of the YAML's auto).


@dataclasses.dataclass
class RecipeSFTConfig(SFTConfig, RunOptions):
    """What recipes/sft_phi2.py parses: TRL's SFTConfig and RunOptions."""


MAPPING_FLAGS = (*MAPPINGS, "deepspeed")  # checked as given (dpo/gate/check.py mapping_problems)


class StrictYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the later value
    without a word, so the first setting would silently not apply)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first at line {seen[key]}): keep one", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


StrictYAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _unknown_key_message(keys: list[str], source: str, known: list[str] = ()) -> str:
    lines = [f"unknown {source} key(s): {', '.join(keys)}"]
    for key in keys:
        if key in REMOVED_OPTIONS:
            lines.append(f"  {key}: removed from TRL; {REMOVED_OPTIONS[key]}")
        elif near := difflib.get_close_matches(key, known, n=1, cutoff=0.75):
            lines.append(f"  {key}: did you mean {near[0]}?")
    lines.append("  valid keys are the fields of the recipe's dataclasses; see `--help`")
    return "\n".join(lines)


def yaml_error_line(path: Path, err: Exception) -> str:
    """PyYAML's error (a snippet with a caret, several lines) as one line: file:line:column, the problem,
    and where the construct it was parsing began."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # not a marked error (e.g. a reader error): its own first line
        return f"{path} is not valid YAML: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
    problem = getattr(err, "problem", None) or "syntax error"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    began = (
        f" ({context} that began at line {start.line + 1})" if context and start and start.line != mark.line else ""
    )
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{began}"


def parse_recipe_args(dataclass_types, default_config: str | Path, argv: list[str] | None = None):
    """Parse `argv` (default: sys.argv) into instances of `dataclass_types`.

    Without `--config`, the recipe's own YAML (`default_config`) is read.
    Returns (instances..., precision) where precision says what the hardware suggested.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    check_repeated_flags(argv)
    if "--config" not in argv:
        argv = ["--config", str(default_config), *argv]
    at = argv.index("--config")
    if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
        raise UserError(f"--config needs a YAML file: --config {Path(default_config).name}")
    config_path = Path(argv[at + 1])
    if not config_path.is_file():
        raise UserError(f"config file not found: {config_path}")
    try:
        values = yaml.load(config_path.read_text(), Loader=StrictYAMLLoader)
    except yaml.YAMLError as err:
        raise UserError(yaml_error_line(config_path, err)) from None
    # per_device_train_batch_size: auto becomes its configured micro-batch on the command line (dpo/gate/autobatch.py)
    argv, auto_note = resolve_auto_batch(
        values if isinstance(values, dict) else {}, argv, set(_fields(dataclass_types))
    )
    on_command_line = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}  # these override the YAML
    values = {k: v for k, v in values.items() if k not in on_command_line} if isinstance(values, dict) else {}
    if found := yaml_kind_problems(dataclass_types, values):
        raise UserError(f"{config_path}: " + "; ".join(found))
    # no empty path (dpo/gate/table.py PATHS), as TrainingArguments reads some while it is built
    check_paths_before_parsing(values, argv)
    # mapping settings (activation_checkpointing_kwargs, ...) as given, before the dataclasses take them in
    if found := mapping_problems({**values, **command_line_values(argv, MAPPING_FLAGS)}):
        raise UserError(f"invalid setting(s) ({config_path} + command line): " + "; ".join(found))

    parser = one_line_parse_errors(TrlParser(dataclass_types), argv, config_path)
    parser.allow_abbrev = False  # argparse would take --learning_rat for --learning_rate, and --max_step for max_steps
    # --help: the recipe's docstring, examples included (dpo/helptext.py)
    describe_recipe(parser, Path(default_config).with_suffix(".py"))
    precision = detect_precision()
    # logging_first_step: a short run (or one whose logging_steps exceed its steps) still logs step 1
    parser.set_defaults_with_config(**precision.as_defaults(), logging_first_step=True)
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as err:
        msg = str(err)
        if msg.startswith("Unknown arguments from config file"):
            keys = re.findall(r"'--([^']+)'", msg)
            raise UserError(
                f"{config_path}: " + _unknown_key_message(keys, "config", _fields(dataclass_types))
            ) from None
        if msg.startswith("Some specified arguments are not used"):
            keys = [k.lstrip("-").split("=", 1)[0] for k in re.findall(r"'(--[^']+)'", msg)]
            raise UserError(_unknown_key_message(keys, "command-line", _fields(dataclass_types))) from None
        raise UserError(f"invalid configuration ({config_path} + command line): {msg}") from None
    if found := choice_problems(parser, *parsed):  # the YAML's values skip argparse's choices
        raise UserError(f"invalid setting(s) ({config_path} + command line): " + "; ".join(found))
    drop_companions(auto_note, *parsed)
    return (*parsed, precision)


def _fields(dataclass_types) -> list[str]:
    return [f.name for cls in dataclass_types for f in dataclasses.fields(cls)]


def load_recipe_args(
    script_arguments_class,
    recipe_file: str | Path,
    argv: list[str] | None = None,
    training_config=RecipeDPOConfig,
    output_kind: str = "run",
):
    """The args phase of a recipe: (script_args, training_args, model_args), checked and logged.

    Reads the YAML beside `recipe_file` unless `--config` says otherwise; refuses tokens in
    the config, settings that would reverse or zero the preference, and an unwritable output_dir
    (dpo/gate/: the table, credentials.py, output_dir.py), an output_dir that is or lies in the model or adapter folder; locks output_dir for
    the run (dpo/train/safety/lock.py); resolves `--resume_from_checkpoint last` to a folder; logs the precision.
    `training_config` is RecipeDPOConfig (TRL's DPOConfig and our fields), or RecipeSFTConfig for the SFT recipe.
    `output_kind` is the kind of folder the recipe writes (dpo/folders.py OUTPUT_KINDS): an output_dir holding
    another kind, or inside a finished run or rounds folder, is refused (two runs would mix in one folder).
    """
    script_args, training_args, model_args, precision = parse_recipe_args(
        (script_arguments_class, training_config, ModelConfig), Path(recipe_file).with_suffix(".yaml"), argv
    )
    check_no_secrets(script_args, training_args, model_args)
    check_settings(script_args, training_args, model_args)
    check_integrations(training_args)  # report_to backends installed, push_to_hub reachable (dpo/gate/)
    check_output_dir(training_args.output_dir)
    check_output_dir_apart(
        training_args.output_dir, model_args.model_name_or_path, getattr(script_args, "sft_adapter_path", None)
    )
    if problem := output_kind_problem(training_args.output_dir, output_kind):  # after: names the run's own model
        raise UserError(problem)
    log(f"output_dir: {Path(training_args.output_dir).expanduser().absolute()}")  # every folder a run writes, named
    optim = getattr(training_args.optim, "value", training_args.optim)  # an OptimizerNames member after parsing
    log(
        f"hardware: {precision.reason}; using {describe(training_args.bf16, training_args.fp16, model_args.dtype, optim)}"
    )
    check_launch()
    on_main_process(
        lock.take, training_args.output_dir
    )  # held until the recipe's main ends (dpo/train/safety/lock.py)
    training_args.resume_from_checkpoint = resolve_resume(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    log(f"topology: {topology(training_args).describe()}")
    return script_args, training_args, model_args


SECRET_KEYS = ("hub_token",)  # never written, even if set (dpo.gate.credentials.check_no_secrets refuses it anyway)
HARDWARE_KEYS = ("bf16", "fp16", "use_cpu", "dtype")  # picked by dpo/train/hardware.py for the machine that ran


def to_plain(obj):
    """A dataclass as a YAML/JSON-safe dict (enums and paths as strings, secrets dropped)."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    # TrainingArguments.to_dict writes every field named *_token as "<NAME>" (meant for hub_token), so
    # pad_token / eos_token came back as the token "<PAD_TOKEN>" and the file repeated no run: their own values
    data.update({k: getattr(obj, k) for k in data if k.endswith("_token") and hasattr(obj, k)})
    data = {k: v for k, v in data.items() if k not in SECRET_KEYS}
    if data.get("auto_batch_base") is not None:  # per_device_train_batch_size: auto as written (it reads back)
        data["per_device_train_batch_size"] = "auto"
    return json.loads(json.dumps(data, default=str))


def write_resolved_config(path: str | Path, *arg_objects, notes: str = "", overrides: dict | None = None) -> Path:
    """Write every field of every argument object, as resolved, to one YAML file.

    The file is a valid `--config` for the same recipe: re-running with it repeats the run.
    `notes` are extra comment lines for the header (the launch topology); `overrides` values decided after the
    arguments were parsed (per_device_train_batch_size: auto's, dpo/train/speed/autobatch_probe.py).
    """
    merged: dict = {}
    for obj in arg_objects:
        merged.update(to_plain(obj))
    merged.update(overrides or {})
    for key in PER_INVOCATION_KEYS:  # a re-run starts fresh unless asked to resume
        merged.pop(key, None)
    header = (
        "# Every setting of this run, as resolved (YAML < --config < CLI). Re-run with:\n"
        "#   accelerate launch <recipe>.py --config <this file>\n"
        f"# {', '.join(HARDWARE_KEYS)} were picked for the hardware of the machine that ran;\n"
        "# delete those lines to let a different machine pick its own.\n"
        f"{notes}"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(merged, sort_keys=True))
    return path


def eval_strategy_for(training_args, eval_dataset) -> str:
    """The evaluation schedule a trainer can follow: the configured one, or "no" when there is nothing
    held out (test_size 0 and no test split). Trainers get it on their own copy of the arguments."""
    return "no" if eval_dataset is None else training_args.eval_strategy
