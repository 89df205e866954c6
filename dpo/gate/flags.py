"""Flag parse errors as one line, for the recipes' TrlParser and every `python -m dpo.*` command's argparse:
the flag, what it accepts and where the bad value came from; an unknown flag with the nearest real one
("did you mean learning_rate?"). No parser takes abbreviations (they are built with allow_abbrev=False).
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from dpo.errors import UserError


def check_repeated_flags(argv: list[str]) -> None:
    """A flag given twice: argparse keeps the last without a word (the command-line twin of a YAML key given twice)."""
    seen: set[str] = set()
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2:
            if name in seen:
                raise UserError(
                    f"{name} is given twice on the command line (the later value would silently win): keep one"
                )
            seen.add(name)


def command_line_values(argv: list[str], names) -> dict:
    """{name: text} for the flags in `names` given on the command line (--name value or --name=value)."""
    found = {}
    for at, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag[2:] in names and (eq or at + 1 < len(argv)):
            found[flag[2:]] = value if eq else argv[at + 1]
    return found


def near_names(unknown: list[str], known: list[str]) -> list[str]:
    """'x: did you mean y?' for each unknown name with a close known one."""
    out = []
    for name in unknown:
        if near := difflib.get_close_matches(name, known, n=1, cutoff=0.75):
            out.append(f"{name}: did you mean {near[0]}?")
    return out


def _parsers(parser) -> list:
    """`parser` and its subcommands' parsers (python -m dpo.cache remove)."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for action in subs for p in action.choices.values())]


def _long_flags(parser) -> list[str]:
    return sorted({o.lstrip("-") for p in _parsers(parser) for o in p._option_string_actions if o.startswith("--")})


def _unrecognized(parser, message: str) -> str:
    given = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("-")]
    hints = near_names([g.lstrip("-") for g in given], _long_flags(parser))
    return f"command line: {message}" + (f" ({'; '.join(hints)})" if hints else "") + "; see --help"


def _accepted(action) -> str:
    """What a flag takes, in words: its choices, or its type."""
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    if action.nargs == "?" and action.const is True:  # booleans: --flag, --flag true/false
        return "true or false"
    kind = {int: "a whole number", float: "a number", str: "a value"}.get(action.type, "a value")
    return kind + (" (one or more)" if action.nargs in ("+", "*") else "")


def one_line_parse_errors(parser, argv: list[str], config_path: Path | None = None):
    """Make `parser` (argparse, TrlParser) report a bad flag as one UserError line instead of its usage
    and message; `config_path`: the YAML its defaults came from, if any. Returns the parser."""
    parser.error = lambda message: _parse_error(parser, message, argv, config_path)
    return parser


def _parse_error(parser, message: str, argv: list[str], config_path: Path | None):
    """argparse's error (usage + message, exit 2) as one UserError line naming the flag, what it accepts,
    and where the bad value came from."""
    flags = re.match(r"argument ([^:]+): (.*)", message)
    if not flags:
        if message.startswith("the following arguments are required: "):
            missing = message.split(": ", 1)[1]
            where = f"in {config_path} or " if config_path else ""
            raise UserError(f"missing setting(s) {missing}: set them {where}on the command line")
        if message.startswith("unrecognized arguments: "):
            raise UserError(_unrecognized(parser, message))
        raise UserError(f"command line: {message}")
    names, reason = flags.group(1).split("/"), flags.group(2)
    # a flag by its name; a positional (a subcommand: `python -m dpo.cache clear`) by its dest or metavar
    positional = (a for a in parser._actions if not a.option_strings and names[0] in (a.dest, a.metavar))
    action = parser._option_string_actions.get(names[0]) or next(positional, None)
    reason = re.sub(r" \(choose from .*\)$", "", reason)  # the choices are listed below, once
    given = any(arg.split("=", 1)[0] in names for arg in argv)
    after = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in names]
    if reason == "expected one argument" and after and after[0].startswith("-"):
        reason += f" (a negative number goes after '=': {names[0]}={after[0]})"
    where = "on the command line" if given or config_path is None else f"in {config_path}"
    accepted = f"; accepted: {_accepted(action)}" if action is not None and "expected one of" not in reason else ""
    raise UserError(f"{names[0]} ({where}): {reason}{accepted}")


def command_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a `python -m dpo.*` command: flags in full only (no abbreviations), and a `--help` that shows
    the module docstring `doc` whole and as written, examples included (dpo/helptext.py)."""
    return argparse.ArgumentParser(
        allow_abbrev=False, prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_flags(parser, argv: list[str] | None = None):
    """`parser.parse_args(argv)` (default: sys.argv) with one-line errors; for the `python -m dpo.*` commands."""
    import sys

    given = list(sys.argv[1:] if argv is None else argv)
    check_repeated_flags(given)
    # An unknown flag first, by name: argparse would otherwise read its value as the next positional
    # (`--cache_d DIR list` was "command: invalid choice: 'DIR'").
    known = set(_long_flags(parser))
    unknown = [name for a in given if (name := a.split("=", 1)[0]).startswith("--") and name[2:] not in known | {""}]
    if unknown:
        raise UserError(_unrecognized(parser, "unrecognized arguments: " + " ".join(unknown)))
    for sub in _parsers(parser)[1:]:  # subcommands (python -m dpo.cache remove) report their own errors
        one_line_parse_errors(sub, given)
    return one_line_parse_errors(parser, given).parse_args(given)


def _plain(value):
    return getattr(value, "value", value)  # an enum (SchedulerType, IntervalStrategy) as its text


def choice_problems(parser, *arg_objects) -> list[str]:
    """Every parsed value outside its flag's `choices`. argparse checks choices on the command line only: a value
    from the YAML (TrlParser's set_defaults) reaches the dataclasses unchecked (truncation_mode: keep_middle,
    bnb_4bit_quant_type: nf5, dtype: float8 were tracebacks after the weights loaded)."""
    values = {}
    for obj in arg_objects:
        for name, value in vars(obj).items():
            values.setdefault(name, value)
    problems = []
    for action in parser._actions:
        if not action.choices or action.dest not in values:
            continue
        allowed = [str(_plain(c)) for c in action.choices]
        given = values[action.dest]
        for item in given if isinstance(given, (list, tuple)) else [given]:
            if item is not None and str(_plain(item)) not in allowed:
                problems.append(f"{action.dest} must be one of {', '.join(allowed)}; got {_plain(item)!r}")
    return problems


def _kinds(annotation) -> set[str]:
    """What a field's annotation lets a YAML value be: null, a single value, a list, a mapping."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if annotation is typing.Any or isinstance(annotation, (str, typing.TypeVar)):
        return {"null", "value", "list", "mapping"}  # nothing to go by
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(arg) for arg in typing.get_args(annotation)))
    if annotation is type(None):
        return {"null"}
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return {"list", "value"}  # one value is a list of one (lora_target_modules: all-linear)
    if origin is dict or annotation is dict:
        return {"mapping"}
    return {"value"}


def _kind(value) -> str:
    if value is None:
        return "null"
    return "list" if isinstance(value, (list, tuple)) else "mapping" if isinstance(value, dict) else "value"


KIND_WORDS = {"null": "null", "value": "a single value", "list": "a list", "mapping": "a mapping"}


def yaml_kind_problems(dataclass_types, values: dict) -> list[str]:
    """A YAML value of another kind than its field takes (a list for `beta`, null for a field with a default
    that is not null): argparse converts only text, so such a value reached the dataclasses as it was and
    failed there with a TypeError, or later. One line per key."""
    import dataclasses
    import typing

    fields = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, (hints.get(f.name, typing.Any), f.default))
    problems = []
    for key, value in values.items():
        if key not in fields:
            continue  # unknown keys are reported by the parser, with the near name
        annotation, default = fields[key]
        allowed = _kinds(annotation) | ({"null"} if default is None else set())
        if _kind(value) not in allowed:
            words = [KIND_WORDS[k] for k in ("value", "list", "mapping", "null") if k in allowed]
            want = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
            shown = "" if value is None else f" ({value!r:.60})"
            problems.append(f"{key} takes {want}; got {KIND_WORDS[_kind(value)]}{shown}")
    return problems
