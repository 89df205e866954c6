"""Preference data: load a hub dataset or a local file, detect its layout, convert every row.

    raw = load_preference_data("trl-lib/ultrafeedback_binarized")   # or data.jsonl / .json / .parquet / .csv,
                                                                     # .jsonl.gz / .json.gz / .csv.gz / .jsonl.zst
    pairs, layout = to_pairs(raw, source="trl-lib/ultrafeedback_binarized")
    # recipes call dpo.doctor.check_data(raw, source, tokenizer): to_pairs, ensure_chat_template, checks

Layouts, detected from the column names and the first row (extra columns are ignored):

    layout           columns                                                   e.g.
    text             prompt | question | instruction, chosen, rejected: text   jondurbin/truthy-dpo-v0.1 (+ system),
                     [+ system | system_prompt]                                Intel/orca_dpo_pairs (question + system)
    conversational   chosen, rejected: message lists [{"role", "content"}]     trl-lib/ultrafeedback_binarized (implicit
                     [+ prompt: text or message list]                          prompt), HuggingFaceH4/ultrafeedback_binarized
    hh               chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..."    Anthropic/hh-rlhf (multi-turn)
                     transcripts, no prompt column

Any other column names: `Columns(prompt="query", chosen="good", ...)`, in a recipe's YAML as
`prompt_column: query`, `chosen_column: good`, ... When chosen and rejected hold the whole
conversation (hh, conversational without a prompt, or with a prompt *string* as in H4's
ultrafeedback), the prompt is the turns they share, up to the last assistant reply.

Output, one row per input row (nothing is dropped here: `problem` says what is wrong with a row
and dpo.doctor drops and counts it), in TRL's explicit-prompt format:

    prompt_format="chat" (default)  prompt/chosen/rejected are message lists; TRL renders them with the
                                    tokenizer's chat template (PLAIN_CHAT_TEMPLATE when it has none).
                                    Text rows become [system], user: prompt / assistant: answer.
    prompt_format="text"            plain strings, joined as they are: TRL trains on prompt + chosen + EOS.
                                    Text rows: "<system>\\n\\n<prompt>" (or `text_format(row)`, e.g. phi2_qa_format);
                                    hh rows: the transcript up to and including the last "\\n\\nAssistant:".

Chat rows go to TRL as messages, not as text we render: TRL then tokenizes them with the chat
template itself (no second BOS from tokenizing a rendered text, no EOS appended after the
template's own end of turn), and dpo.doctor counts tokens the same way.

Every problem with the user's data stops with the file, the row number and the field. Row N is
the N-th record, counted from 1: the N-th non-blank line of a .jsonl (its line number is added
when they differ), the N-th data line of a .csv (header excluded).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from dpo.errors import UserError, hub_error

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed text files, as datasets are often distributed (Anthropic HH-RLHF: .jsonl.gz); the
# datasets library decompresses them itself. Parquet is compressed inside, so never outer-compressed.
COMPRESSIONS = (".gz", ".zst")

# Column names tried, in order, when the YAML names none (`prompt_column:` etc.).
PROMPT_NAMES = ("prompt", "question", "instruction")
SYSTEM_NAMES = ("system", "system_prompt")

# Why a row cannot be used as it is; dpo.doctor drops these rows and counts them by reason.
NO_SHARED_PROMPT = "chosen and rejected share no prompt"
DIVERGE = "chosen and rejected differ before the last reply"

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # a turn opens the text or follows a blank line

# The documented fallback for a tokenizer without a chat template (base models: phi-2, pythia,
# gpt2). It is Anthropic HH's transcript format, so HH data looks as it was written; every
# assistant turn ends with EOS, which teaches the model to stop. The generation prompt is
# "\n\nAssistant:" with no trailing space: the reply's leading space then starts the first
# answer token, and the prompt's tokens are a prefix of prompt+answer tokens. Saved with the
# tokenizer in output_dir, so inference formats prompts the same way.
#   <system>\n\nHuman: <user>\n\nAssistant: <assistant><eos>\n\nHuman: ...\n\nAssistant:
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\n\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ '\n\n' + message['role'] | capitalize + ': ' + message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)


# ── loading ──────────────────────────────────────────────────────────────────────────


def _data_suffix(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix): ('.jsonl', '.gz') for data.jsonl.gz, ('.csv', '') for data.csv."""
    path = Path(path)
    if path.suffix in COMPRESSIONS and Path(path.stem).suffix in (".json", ".jsonl", ".csv"):
        return Path(path.stem).suffix, path.suffix
    return path.suffix, ""


def _open_data_file(path: Path):
    """A binary file object over the (decompressed) bytes of a local data file."""
    _, compression = _data_suffix(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        )
    return open(path, "rb")


def _looks_local(name: str) -> bool:
    """A path, not a hub id: starts like a path, has a data-file suffix, or exists on disk."""
    return name.startswith((".", "/", "~")) or _data_suffix(Path(name))[0] in LOCAL_FORMATS or Path(name).exists()


def _json_type(value) -> str:
    return {
        str: "text",
        list: "a list",
        dict: "an object",
        bool: "true/false",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _json_problem(path: Path) -> str | None:
    """Why a JSON / JSON Lines file does not load: the first malformed line, or the first value
    whose type differs from the field's first value ("row N (line L), field 'f': ..."), or None."""
    with _open_data_file(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    suffix = _data_suffix(path)[0]
    if suffix == ".json":
        try:
            records = json.loads(text)
            numbered = [
                (i, None, r) for i, r in enumerate(records if isinstance(records, list) else [records], start=1)
            ]
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a .json file written as JSON Lines
                return f"line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})"
            numbered = None
    if suffix == ".jsonl" or numbered is None:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((len(numbered) + 1, lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                return f"line {lineno}: malformed JSON ({err.msg}, column {err.colno})"
    first_type: dict[str, str] = {}
    for row, lineno, record in numbered:
        where = f"row {row}" + (f" (line {lineno})" if lineno and lineno != row else "")
        if not isinstance(record, dict):
            return f"{where}: expected one JSON object {{...}} per record, got {_json_type(record)}"
        for key, value in record.items():
            if value is None:
                continue
            kind = first_type.setdefault(key, _json_type(value))
            if _json_type(value) != kind:
                return f"{where}, field '{key}': expected {kind} as in the rows before, got {_json_type(value)} ({value!r:.60})"
    return None


def _blank(path: Path) -> bool:
    """True if the file holds only whitespace (read in 1 MB chunks: stops at the first character)."""
    with _open_data_file(path) as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _load_file(name: str, path: Path) -> Dataset:
    """One local data file as a Dataset; a malformed file is a UserError naming its first bad line."""
    suffix, compression = _data_suffix(path)
    if suffix not in LOCAL_FORMATS:
        raise UserError(
            f"{name}: unsupported file type '{''.join(path.suffixes[-2:])}'; use one of {sorted(LOCAL_FORMATS)}, "
            f"or .json/.jsonl/.csv compressed as {' or '.join(COMPRESSIONS)}"
        )
    if path.stat().st_size == 0 or (suffix in (".json", ".jsonl", ".csv") and _blank(path)):
        raise UserError(f"{name}: the file is empty")
    try:
        data = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    except Exception as err:  # pyarrow / json / decompression errors: the user's file is malformed
        where = _json_problem(path) if suffix in (".json", ".jsonl") else None
        if where:
            raise UserError(f"{name}, {where}") from None
        cause = err.__cause__ or err.__context__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in reason:
            raise UserError(f"{name}: the file has no rows") from None
        raise UserError(f"{name}: could not be read as {suffix[1:]}{compression}: {reason}") from None
    if len(data) == 0:
        raise UserError(f"{name}: the file has no rows")
    return data


def load_preference_data(
    name: str, config_name: str | None = None, split: str = "train", missing_ok: bool = False
) -> Dataset | None:
    """Split `split` of a hub dataset id, a local data file, or a local dataset folder.

    Local files: .jsonl / .json (JSON Lines or one JSON array), .parquet, .csv, and the text
    formats compressed as .gz or .zst (Anthropic HH-RLHF ships .jsonl.gz); a file is one
    split, "train". A folder is read with `load_from_disk` when it was written by `save_to_disk`,
    else as a folder of data files. `missing_ok`: None instead of an error when there is no such split.
    """
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"dataset file not found: {name}")
        if path.is_file():
            if split != "train" and missing_ok:
                return None
            return _load_file(name, path)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            data = load_from_disk(str(path))
            return _pick_split(data, name, split, missing_ok)
    try:
        data = load_dataset(str(Path(name).expanduser()) if _looks_local(name) else name, config_name)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, offline mode
        raise hub_error(
            "dataset",
            name,
            err,
            f"If the Hub is unreachable, save the data as a .jsonl/.parquet/.csv file where you have access "
            f"(`datasets.load_dataset('{name}', split='{split}').to_json('data.jsonl')`) "
            f"and pass it: --dataset_name data.jsonl",
        ) from None
    return _pick_split(data, name, split, missing_ok)


def _pick_split(data, name: str, split: str, missing_ok: bool = False) -> Dataset | None:
    """`data[split]` of a DatasetDict (a lone Dataset counts as "train"); UserError if it has no rows."""
    if not isinstance(data, DatasetDict) and split != "train" and missing_ok:
        return None
    if isinstance(data, DatasetDict):
        if split not in data and missing_ok:
            return None
        if split not in data:
            raise UserError(f"dataset '{name}' has no split '{split}'; it has {sorted(data)}")
        data = data[split]
    if len(data) == 0:
        raise UserError(f"dataset '{name}' (split '{split}') has no rows")
    return data


# ── row references in error messages ──────────────────────────────────────────────────


class _Rows:
    """'<source>, row N[ (line L)], field 'f'' for error messages; line numbers only for .jsonl files."""

    def __init__(self, source: str):
        self.source = source
        self._lines: list[int] | None = None

    def _line(self, row: int) -> int | None:
        path = Path(self.source).expanduser()
        if _data_suffix(path)[0] != ".jsonl" or not path.is_file():
            return None
        if self._lines is None:
            with _open_data_file(path) as f:
                self._lines = [i for i, line in enumerate(f, start=1) if line.strip()]
        return self._lines[row - 1] if row <= len(self._lines) else None

    def at(self, row: int, field: str | None = None) -> str:
        line = self._line(row)
        where = f"{self.source}, row {row}" + (f" (line {line})" if line and line != row else "")
        return where + (f", field '{field}'" if field else "")


def _text(value, where: str) -> str:
    if value is None:
        raise UserError(f"{where}: missing (no value)")
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, got {type(value).__name__} ({value!r:.60})")
    return value


def _messages(value, where: str) -> list[dict]:
    """A list of {"role": str, "content": str}; other keys (name, tool_calls) are not kept."""
    if value is None:
        raise UserError(f"{where}: missing (no value)")
    if not isinstance(value, list):
        raise UserError(
            f"{where}: expected a list of messages [{{'role': ..., 'content': ...}}], got {type(value).__name__} ({value!r:.60})"
        )
    out = []
    for i, message in enumerate(value, start=1):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise UserError(f"{where}, message {i}: expected {{'role': text, 'content': text}}, got {message!r:.80}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


# ── layouts ──────────────────────────────────────────────────────────────────────────


@dataclass
class Columns:
    """Column names when the data's differ from the usual ones; None = detect."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = None


@dataclass
class Layout:
    """What `detect_layout` found: the kind of data and the columns it reads."""

    kind: str  # "text", "conversational" or "hh"
    chosen: str
    rejected: str
    prompt: str | None = None
    prompt_kind: str | None = None  # "text" or "messages" when there is a prompt column
    system: str | None = None
    full_conversations: bool = False  # chosen/rejected start with the prompt's turns (first row)

    def describe(self) -> str:
        """e.g. 'text pairs (prompt=question, chosen, rejected, system)'."""
        used = [
            role if col == role else f"{role}={col}"
            for role, col in (
                ("prompt", self.prompt),
                ("chosen", self.chosen),
                ("rejected", self.rejected),
                ("system", self.system),
            )
            if col
        ]
        if self.kind == "conversational":
            kind = "conversational, prompt = " + (
                "shared turns"
                if self.prompt is None or (self.full_conversations and self.prompt_kind != "messages")
                else f"{self.prompt} column"
            )
        else:
            kind = {"text": "text pairs", "hh": "Human/Assistant transcripts, prompt = shared turns"}[self.kind]
        return f"{kind} ({', '.join(used)})"


def _first_value(data: Dataset, column: str):
    for value in data[:100][column]:  # the first non-null value decides the column's kind
        if value is not None:
            return value
    return None


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], key: str, source: str) -> str | None:
    if wanted:
        if wanted not in names:
            raise UserError(f"{source}: {key}: '{wanted}' is not a column; the data has {names}")
        return wanted
    return next((c for c in candidates if c in names), None)


def detect_layout(data: Dataset, source: str, columns: Columns | None = None) -> Layout:
    """Which layout `data` is in, from its column names and first row; UserError if none fits."""
    columns = columns or Columns()
    names = list(data.column_names)
    prompt = _pick(names, columns.prompt, PROMPT_NAMES, "prompt_column", source)  # named columns are checked first
    system = _pick(names, columns.system, SYSTEM_NAMES, "system_column", source)
    chosen = _pick(names, columns.chosen, ("chosen",), "chosen_column", source)
    rejected = _pick(names, columns.rejected, ("rejected",), "rejected_column", source)
    missing = [f for f, c in (("chosen", chosen), ("rejected", rejected)) if c is None]
    if missing:
        raise UserError(
            f"{source}: missing field(s) {missing}; the data has {names}. "
            f"If yours are named differently, set chosen_column: / rejected_column: in the YAML"
        )
    first = _first_value(data, chosen)
    prompt_value = _first_value(data, prompt) if prompt else None
    prompt_kind = None if prompt is None else ("messages" if _is_messages(prompt_value) else "text")
    if _is_messages(first):
        return Layout(
            "conversational", chosen, rejected, prompt, prompt_kind, system, first[0].get("role") != "assistant"
        )
    if isinstance(first, str):
        if prompt is not None:
            if prompt_kind == "messages":
                raise UserError(
                    f"{source}: column '{prompt}' holds messages but '{chosen}' holds text; use one kind for both"
                )
            return Layout("text", chosen, rejected, prompt, "text", system)
        if "Assistant:" in first and "Human:" in first:
            return Layout("hh", chosen, rejected, None, None, system)
        raise UserError(
            f"{source}: no prompt column (looked for {list(PROMPT_NAMES)}) and '{chosen}' is not a "
            f"Human/Assistant transcript; name the prompt column in the YAML: prompt_column: <name>"
        )
    if first is None:
        raise UserError(f"{_Rows(source).at(1, chosen)}: missing (no value)")
    raise UserError(
        f"{_Rows(source).at(1, chosen)}: expected text or a list of messages, got {type(first).__name__} ({first!r:.60})"
    )


# ── conversions ──────────────────────────────────────────────────────────────────────


def split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict], str]:
    """Implicit prompt: the messages chosen and rejected share, up to the last assistant reply.

    Returns (prompt, chosen reply, rejected reply, problem); problem is "" for a usable row.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # a shared reply belongs to the answer
        n -= 1
    prompt, chosen_reply, rejected_reply = chosen[:n], chosen[n:], rejected[n:]
    if not any(m["role"] == "user" for m in prompt):
        return prompt, chosen_reply, rejected_reply, NO_SHARED_PROMPT
    return prompt, chosen_reply, rejected_reply, _reply_problem(chosen_reply, rejected_reply)


def _reply_problem(chosen: list[dict], rejected: list[dict]) -> str:
    return DIVERGE if any(m["role"] != "assistant" for m in chosen + rejected) else ""


def parse_hh(transcript: str) -> list[dict]:
    """An HH transcript ("\\n\\nHuman: q\\n\\nAssistant: a...") as messages; text before the first turn is a system message."""
    parts = _HH_TURN.split(transcript)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def split_hh_text(chosen: str, rejected: str) -> tuple[str, str, str, str]:
    """HH in text form: the prompt is the shared transcript up to and including the last "\\n\\nAssistant:".

    Returns (prompt, chosen reply, rejected reply, problem); the replies keep their leading space.
    """
    shared = os.path.commonprefix([chosen, rejected])
    k = shared.rfind(HH_ASSISTANT)
    if k < 0 or (HH_HUMAN not in shared[:k] and not shared.startswith("Human:")):
        return "", chosen, rejected, NO_SHARED_PROMPT
    cut = k + len(HH_ASSISTANT)
    prompt, chosen_reply, rejected_reply = chosen[:cut], chosen[cut:], rejected[cut:]
    if HH_HUMAN in chosen_reply or HH_HUMAN in rejected_reply:
        return prompt, chosen_reply, rejected_reply, DIVERGE
    return prompt, chosen_reply, rejected_reply, ""


def plain_text_format(row: dict) -> dict:
    """Text rows in text format: the strings as they are, the system text (if any) opening the prompt.

    <system>\\n\\n<prompt> | <chosen> | <rejected>; TRL appends EOS to each answer.
    """
    system = row.get("system") or ""
    return {
        "prompt": f"{system}\n\n{row['prompt']}" if system.strip() else row["prompt"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
    }


def phi2_qa_format(row: dict) -> dict:
    """phi-2's documented QA format; the system text, when present, opens the instruction.

    Instruct: <system>\\n\\n<prompt>\\nOutput: <answer>

    phi-2 has no chat template. The answer starts with a space after "Output:", and TRL
    appends the EOS token to each completion.
    """
    system = (row.get("system") or "").strip()
    instruction = f"{system}\n\n{row['prompt'].strip()}" if system else row["prompt"].strip()
    return {
        "prompt": f"Instruct: {instruction}\nOutput:",
        "chosen": " " + row["chosen"].strip(),
        "rejected": " " + row["rejected"].strip(),
    }


def _system_message(system) -> list[dict]:
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _convert_row(raw: dict, layout: Layout, rows: _Rows, n: int, chat: bool, text_format) -> dict:
    """One input row -> {prompt, chosen, rejected, problem}; UserError on a schema error."""
    system = None
    if layout.system is not None and raw.get(layout.system) is not None:
        system = _text(raw[layout.system], rows.at(n, layout.system))

    if layout.kind == "text":
        fields = {"system": system or ""}
        for role, column in (("prompt", layout.prompt), ("chosen", layout.chosen), ("rejected", layout.rejected)):
            fields[role] = _text(raw[column], rows.at(n, column))
        if not chat:
            return {**text_format(fields), "problem": ""}
        return {
            "prompt": _system_message(system) + [{"role": "user", "content": fields["prompt"]}],
            "chosen": [{"role": "assistant", "content": fields["chosen"]}],
            "rejected": [{"role": "assistant", "content": fields["rejected"]}],
            "problem": "",
        }

    if layout.kind == "hh":
        chosen = _text(raw[layout.chosen], rows.at(n, layout.chosen))
        rejected = _text(raw[layout.rejected], rows.at(n, layout.rejected))
        if not chat:
            prompt, chosen, rejected, problem = split_hh_text(chosen, rejected)
            if system and system.strip():
                prompt = system + prompt
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem}
        prompt, chosen, rejected, problem = split_shared_prompt(parse_hh(chosen), parse_hh(rejected))
        if prompt and prompt[0]["role"] != "system":
            prompt = _system_message(system) + prompt
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem}

    # conversational
    chosen = _messages(raw[layout.chosen], rows.at(n, layout.chosen))
    rejected = _messages(raw[layout.rejected], rows.at(n, layout.rejected))
    if layout.prompt_kind == "messages":
        prompt = _messages(raw[layout.prompt], rows.at(n, layout.prompt))
        k = len(prompt)
        if chosen[:k] == prompt and rejected[:k] == prompt:  # full conversations: cut the prompt off
            chosen, rejected = chosen[k:], rejected[k:]
        problem = NO_SHARED_PROMPT if not prompt else _reply_problem(chosen, rejected)
    elif layout.prompt_kind == "text" and chosen and chosen[0]["role"] == "assistant":
        # prompt string + answer-only message lists
        prompt = [{"role": "user", "content": _text(raw[layout.prompt], rows.at(n, layout.prompt))}]
        problem = _reply_problem(chosen, rejected)
    else:
        # implicit prompt (trl-lib) or prompt string + full conversations (HuggingFaceH4): shared turns
        prompt, chosen, rejected, problem = split_shared_prompt(chosen, rejected)
    if prompt and prompt[0]["role"] != "system":
        prompt = _system_message(system) + prompt
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem}


def to_pairs(
    data: Dataset,
    source: str,
    columns: Columns | None = None,
    prompt_format: str = "chat",
    text_format=None,
    progress: bool | None = None,
) -> tuple[Dataset, Layout]:
    """Convert every row of `data` to TRL's explicit-prompt format; see the module docstring.

    Returns (pairs, layout). `pairs` has one row per input row, in order, with columns
    prompt, chosen, rejected, row (1-based input row number) and problem ("" or why the row is
    unusable). Schema errors (missing value, wrong type, malformed message) raise UserError
    naming the source, row and field. `text_format(row)` formats text rows in text format
    (default `plain_text_format`); it takes {system, prompt, chosen, rejected} strings.
    """
    if prompt_format not in ("chat", "text"):
        raise UserError(f"prompt_format: '{prompt_format}' is not one of ['chat', 'text']")
    if len(data) == 0:
        raise UserError(f"{source}: the data has no rows")
    layout = detect_layout(data, source, columns)
    chat = prompt_format == "chat"
    if not chat and layout.kind == "conversational":
        raise UserError(f"{source}: conversational data (message lists) needs prompt_format: chat")
    if text_format is not None and layout.kind != "text":
        raise UserError(
            f"{source}: this recipe's prompt format takes single-turn text rows (prompt, chosen, rejected); "
            f"this data is {layout.describe()}. Use recipes/dpo_any.py, which reads every supported layout"
        )
    text_format = text_format or plain_text_format
    rows = _Rows(source)
    wanted = [c for c in (layout.prompt, layout.chosen, layout.rejected, layout.system) if c]
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "row": [], "problem": []}
    batch_size = 1000
    from tqdm.auto import tqdm

    show = len(data) >= 20_000 if progress is None else progress
    n = 0
    for batch in tqdm(
        data.select_columns(wanted).iter(batch_size=batch_size),
        total=-(-len(data) // batch_size),
        desc="converting rows (batches of 1000)",
        disable=not show,
        file=sys.stderr,
    ):
        for values in zip(*(batch[c] for c in wanted)):
            n += 1
            pair = _convert_row(dict(zip(wanted, values)), layout, rows, n, chat, text_format)
            for key in ("prompt", "chosen", "rejected", "problem"):
                out[key].append(pair[key])
            out["row"].append(n)
    assert n == len(data), "every input row gives exactly one output row"
    return Dataset.from_dict(out), layout


def is_chat(pairs: Dataset) -> bool:
    """True when the pairs are message lists (chat format), False for plain strings."""
    feature = pairs.features["chosen"]
    return getattr(feature, "dtype", None) not in ("string", "large_string")


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template PLAIN_CHAT_TEMPLATE, with a warning; True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    print(
        "warning: the tokenizer has no chat template; using the plain Human/Assistant template "
        "(dpo/data.py: PLAIN_CHAT_TEMPLATE, saved with the tokenizer). For a chat model, pass its own "
        "tokenizer; for data already formatted as text, set prompt_format: text",
        file=sys.stderr,
        flush=True,
    )
    return True


def split_heldout(data: Dataset, test_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded train/test split; the same seed always holds out the same rows."""
    if not test_size:
        return data, None
    try:
        parts = data.train_test_split(test_size=test_size, seed=seed)
    except ValueError as err:  # e.g. too few rows for this test_size
        raise UserError(f"test_size {test_size} cannot split {len(data)} rows: {str(err).splitlines()[0]}") from None
    return parts["train"], parts["test"]
