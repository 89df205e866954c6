"""`per_device_train_batch_size: auto` as the recipes read it (the choice itself: dpo/train/speed/autobatch.py).

transformers' per_device_train_batch_size is an int, so `auto` never reaches its parser. Before parsing, the YAML's
and the command line's values are read as given and `auto` becomes the configured micro-batch: `auto_batch_base`
(default 1), the micro-batch the run keeps where auto does not choose (no CUDA device), and with
gradient_accumulation_steps the pairs per optimizer step that auto keeps. The parsed arguments then carry
per_device_train_batch_size = auto_batch_base, and auto_batch_base set is what marks a run as `auto`.

Refused here, in one line, before any weights load:
- auto_batch_base / auto_batch_memory_gib without `auto` in the same place (YAML or command line): they would be
  silently ignored. A command-line number replacing the YAML's `auto` drops the YAML's two with it, and says so
  (the phi-2 YAML ships `auto`; `--per_device_train_batch_size 2` is the T4 setting);
- `auto` in a recipe whose config has no auto_batch_base (the SFT recipe).
Relations between the parsed settings (with DeepSpeed/FSDP, with auto_find_batch_size) are in dpo/gate/table.py.
"""

from __future__ import annotations

from dpo.errors import UserError
from dpo.gate.flags import command_line_values

BATCH = "per_device_train_batch_size"
COMPANIONS = ("auto_batch_base", "auto_batch_memory_gib")


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip() == "auto"


def _without(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == f"--{name}":
            skip = True
        elif not arg.startswith(f"--{name}="):
            out.append(arg)
    return out


def resolve_auto_batch(yaml_values: dict, argv: list[str], fields: set[str]) -> tuple[list[str], str | None]:
    """(the command line the parser gets, what was dropped or None). `fields`: the recipe's dataclass fields.
    With `auto`, the parser is given `--per_device_train_batch_size <auto_batch_base>` (and the base, default 1)."""
    cli = command_line_values(argv, (BATCH, *COMPANIONS))
    yaml_batch = yaml_values.get(BATCH)
    batch = cli.get(BATCH, yaml_batch)
    if not _is_auto(batch):
        here = [n for n in COMPANIONS if n in cli]
        if not _is_auto(yaml_batch):
            here += [n for n in COMPANIONS if yaml_values.get(n) is not None and n not in here]
        if here:
            verb = "apply" if len(here) > 1 else "applies"
            raise UserError(
                f"invalid setting(s): {' and '.join(here)} {verb} only with {BATCH}: auto (it is {batch}): "
                f"remove {'them' if len(here) > 1 else 'it'}, or set {BATCH}: auto"
            )
        dropped = [n for n in COMPANIONS if yaml_values.get(n) is not None]
        if dropped:  # the YAML's auto and its companions, replaced by the command line's number
            return argv, f"{BATCH} {batch} from the command line replaces the YAML's auto: {', '.join(dropped)} unused"
        return argv, None
    if "auto_batch_base" not in fields:
        raise UserError(
            f"invalid setting(s): {BATCH} auto is read by the DPO recipes only (this recipe's config has no "
            f"auto_batch_base): give {BATCH} a number"
        )
    base = cli.get("auto_batch_base", yaml_values.get("auto_batch_base"))
    base = "1" if base is None else str(base)
    argv = [*_without(_without(argv, BATCH), "auto_batch_base"), f"--{BATCH}", base, "--auto_batch_base", base]
    return argv, None


def drop_companions(note: str | None, *parsed) -> None:
    """After parsing, where `resolve_auto_batch` said the YAML's auto was replaced: its companions unset (the
    parser read them from the YAML; they must not mark the run as auto)."""
    if note is None:
        return
    for obj in parsed:
        for name in COMPANIONS:
            if hasattr(obj, name):
                setattr(obj, name, None)


def auto_batch_relations(get) -> str | None:
    """The parsed settings (dpo/gate/table.py RELATIONS): auto_batch_base marks `auto` (above)."""
    base, cap = get("auto_batch_base"), get("auto_batch_memory_gib")
    if base is None:
        if cap is not None:
            return f"auto_batch_memory_gib {cap} applies only with {BATCH}: auto: remove it, or set {BATCH}: auto"
        return None
    problems = []
    if get(BATCH) != base:  # arguments built in code with both numbers
        problems.append(
            f"auto_batch_base {base} marks {BATCH} auto, whose configured micro-batch it is, but {BATCH} is "
            f"{get(BATCH)}: set {BATCH} to {base} too (in a YAML or on the command line: {BATCH}: auto), or unset "
            "auto_batch_base"
        )
    if get("auto_find_batch_size"):
        problems.append(
            f"{BATCH} auto with auto_find_batch_size true: two automatic batch sizes (transformers' halves it "
            "after an out-of-memory and does not keep the pairs per step); set auto_find_batch_size: false"
        )
    if get("deepspeed") or get("fsdp"):
        which = "deepspeed" if get("deepspeed") else "fsdp"
        problems.append(
            f"{BATCH} auto with {which}: its probe runs the backward outside {which}'s engine; "
            f"give {BATCH} a number (with gradient_accumulation_steps)"
        )
    return "; ".join(problems) or None
