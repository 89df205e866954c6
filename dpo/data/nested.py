"""Layouts whose prompt and answers sit in nested fields: each field is read as a column named by its path.

    layout                               fields                                        read as
    OpenAI preference fine-tuning        input: {messages: [...], tools: [...]?}       prompt = input.messages,
    (platform.openai.com, DPO jobs)      preferred_output: [{role: assistant, ...}]    tools = input.tools (or a
                                         non_preferred_output: [...]                   top-level tools column),
                                                                                       chosen / rejected

A layout is recognised by its top-level columns (NESTED, a table: a new layout is a new entry) unless the
YAML names the prompt / chosen / rejected columns itself. dpo/data/pairs.py then reads the path-named columns
as any conversational data, so an error names the field by its path: "data.jsonl, row 3, field 'input.messages'".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dpo.data.loading import FILE_COLUMN, FILE_ROW_COLUMN, RowLocator
from dpo.data.tools import without_nulls
from dpo.errors import UserError

TOP_LEVEL_TOOLS = "tools"  # some exports put the tools beside `input` rather than in it


@dataclass(frozen=True)
class Nested:
    name: str
    marks: tuple[str, ...]  # the top-level columns that identify the layout
    fields: dict  # role (prompt, chosen, rejected, tools) -> "column" or "column.key"


NESTED = (
    Nested(
        "OpenAI preference fine-tuning",
        ("input", "preferred_output", "non_preferred_output"),
        {
            "prompt": "input.messages",
            "tools": "input.tools",
            "chosen": "preferred_output",
            "rejected": "non_preferred_output",
        },
    ),
)


def _kept_text(value):
    """`value` as datasets' Json type must be given it to read back text as that text: it parses a string that is
    JSON (tools given as JSON text are read exactly by dpo/data/tools.py, nulls and all)."""
    return json.dumps(value) if isinstance(value, str) else value


def unnest(data, source: str, named: bool):
    """(data, {role: column}) with each nested field of a NESTED layout as a column of its own, or
    (data, None) when no layout matches or the caller named its columns (`named`)."""
    names = [c for c in data.column_names if c not in (FILE_COLUMN, FILE_ROW_COLUMN)]
    layout = next((n for n in NESTED if all(c in names for c in n.marks)), None)
    if layout is None or named:
        return data, None
    from datasets import Dataset, Features, Json, concatenate_datasets

    rows = RowLocator(source, data)
    tools_beside = data[TOP_LEVEL_TOOLS] if TOP_LEVEL_TOOLS in names else None
    paths = [path for path in layout.fields.values() if "." in path]
    parents = sorted({path.split(".", 1)[0] for path in paths})
    values: dict[str, list] = {path: [] for path in paths}
    for n, record in enumerate(data.select_columns(parents), start=1):
        for parent in parents:
            if not isinstance(record[parent], dict):
                got = "missing (no value)" if record[parent] is None else f"got {type(record[parent]).__name__}"
                optional = {layout.fields.get("tools")}  # a row may offer no tools
                keys = ", ".join(
                    p.split(".", 1)[1] + (" (optional)" if p in optional else "")
                    for p in paths
                    if p.startswith(parent + ".")
                )
                raise UserError(f"{rows.at(n, parent)}: expected an object with {keys}; {got}")
        for path in paths:
            parent, key = path.split(".", 1)
            value = record[parent].get(key)
            # tools as JSON text are read exactly (dpo/data/tools.py); datasets' Json would parse text that is JSON
            values[path].append(_kept_text(value) if path == layout.fields.get("tools") else value)
        if TOP_LEVEL_TOOLS in names and layout.fields.get("tools") in values:  # tools beside the input, not in it
            given, beside = values[layout.fields["tools"]][-1], tools_beside[n - 1]
            differ = without_nulls(given) != without_nulls(beside)  # less the keys Parquet adds (dpo/data/tools.py)
            if given not in (None, []) and beside not in (None, []) and differ:
                raise UserError(
                    f"{rows.at(n, TOP_LEVEL_TOOLS)}: tools given twice, here and in '{layout.fields['tools']}', and "
                    "they differ; keep one"
                )
            if given in (None, []):
                values[layout.fields["tools"]][-1] = _kept_text(beside)
    # JSON values as they are: Arrow would give every message the keys of all the others
    nested = Dataset.from_dict(values, features=Features({path: Json() for path in paths}))
    removed = [*parents, *([TOP_LEVEL_TOOLS] if tools_beside is not None else [])]  # now read into `nested`
    flat = concatenate_datasets([data.remove_columns(removed), nested], axis=1)
    return flat, dict(layout.fields)
