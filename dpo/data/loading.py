"""Preference data in: a hub dataset, a local file or a dataset folder, loaded as one split.

    raw = load_preference_data("trl-lib/ultrafeedback_binarized")   # or data.jsonl / .json / .parquet / .csv,
                                                                     # .jsonl.gz / .json.gz / .csv.gz / .jsonl.zst
    train, heldout = split_heldout(pairs, test_size=0.1, seed=42)

What happens to the rows next: dpo/data/pairs.py detects the layout and converts them, dpo/data/doctor.py
checks them.

Every problem with the user's data stops with the file, the row number and the field. Row N is
the N-th record, counted from 1: the N-th non-blank line of a .jsonl (its line number is added
when they differ), the N-th data line of a .csv (header excluded). `RowLocator` writes those
references; `text_field` / `messages_field` check one value and name it when it is wrong.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from dpo.data.datafiles import (
    COMPRESSIONS,
    LOCAL_FORMATS,
    RUN_FILES,
    check_zstd_complete,
    data_suffix,
    decompression_error,
    decompression_errors,
    folder_data_files,
    open_data_file,
)
from dpo.data.encoding import (
    blank,
    check_utf8,
    has_surrogate_escape,
    json_problem,
    json_records,
    json_type,
    json_values,
    quiet_readers,
)
from dpo.data.tools import has_calls, message_extras
from dpo.errors import UserError, hub_error
from dpo.files import confined, read_json_object
from dpo.hub import local_reason, offline_if_unreachable, offline_mode, offline_why
from dpo.progress import datasets_progress_off

# ── loading ──────────────────────────────────────────────────────────────────────────


def _looks_local(name: str) -> bool:
    """A path, not a hub id: starts like a path, has a data-file suffix, lies in a folder that is here, or
    exists on disk (dpo/hub.py)."""
    return data_suffix(Path(name))[0] in LOCAL_FORMATS or local_reason(name) is not None


def _load_file(name: str, path: Path) -> Dataset:
    """One local data file as a Dataset; a malformed file is a UserError naming its first bad line."""
    suffix, compression = data_suffix(path)
    if suffix not in LOCAL_FORMATS:
        raise UserError(
            f"{name}: unsupported file type '{''.join(path.suffixes[-2:])}'; use one of {sorted(LOCAL_FORMATS)}, "
            f"or .json/.jsonl/.csv compressed as {' or '.join(COMPRESSIONS)}"
        )
    try:  # every later read of the file decompresses it: a damaged archive is found here, once
        if compression == ".zst":
            check_zstd_complete(path)
        if path.stat().st_size == 0 or (suffix in (".json", ".jsonl", ".csv") and blank(path)):
            raise UserError(f"{name}: the file is empty")
        if suffix in (".json", ".jsonl", ".csv"):
            check_utf8(name, path)
    except decompression_errors() as err:
        raise decompression_error(name, path, err) from None
    csv_text = _csv_as_text(path) if suffix == ".csv" else {}
    try:
        with quiet_readers():
            data = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", **csv_text)
    except Exception as err:  # pyarrow / json / decompression errors: the user's file is malformed
        where = json_problem(path) if suffix in (".json", ".jsonl") else None
        if where:
            raise UserError(f"{name}, {where}") from None
        if suffix in (".json", ".jsonl"):  # valid JSON that pyarrow could not type: its values as they are
            try:
                return json_values(json_records(path))
            except Exception:  # not that either: the reader's own reason, below
                pass
        cause = err.__cause__ or err.__context__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        # pyarrow's "in row N" counts from 0 within a block of the file: never shown as a row number
        reason = re.sub(r"\s+in row \d+", "", reason)
        if "corresponds to no data" in reason:
            raise UserError(f"{name}: the file has no rows") from None
        raise UserError(f"{name}: could not be read as {suffix[1:]}{compression}: {reason}") from None
    if len(data) == 0:
        raise UserError(f"{name}: the file has no rows")
    # pyarrow drops a lone surrogate from a .json array without a word: the text would silently change
    if suffix in (".json", ".jsonl") and has_surrogate_escape(path):
        if where := json_problem(path, surrogates_only=True):
            raise UserError(f"{name}, {where}")
    return data


def _csv_as_text(path: Path) -> dict:
    """load_dataset("csv") settings that keep every cell as the text it is: "4" and "02134" stay
    strings (pandas would read numbers, and "02134" as 2134), and only an empty cell is missing
    (pandas would also read the text None, NA, null, n/a, ... as missing). A UTF-8 byte-order mark
    (Excel's "CSV UTF-8") is not part of the first column's name: utf-8-sig reads it as the mark it is
    (the JSON readers skip it already)."""
    from datasets import Features, Value

    with open_data_file(path) as f:
        header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")), [])
    if twice := sorted({name for name in header if header.count(name) > 1}):  # a dict of features keeps one
        columns = ", ".join(
            f"{name!r} (columns {', '.join(str(i + 1) for i, n in enumerate(header) if n == name)})" for name in twice
        )
        raise UserError(f"{path}, header: {columns} named twice; only one would be read. Rename or remove the other")
    return {
        "encoding": "utf-8-sig",
        "keep_default_na": False,
        "na_values": [""],
        "features": Features({column: Value("string") for column in header}),
    }


@datasets_progress_off()  # no "Generating train split" bar in front of a data error (dpo/progress.py)
def load_preference_data(
    name: str, config_name: str | None = None, split: str = "train", missing_ok: bool = False
) -> Dataset | None:
    """Split `split` of a hub dataset id, a local data file, or a local dataset folder.

    Local files: .jsonl / .json (JSON Lines or one JSON array), .parquet, .csv, and the text
    formats compressed as .gz or .zst (Anthropic HH-RLHF ships .jsonl.gz); a file is one
    split, "train". A folder is read with `load_from_disk` when it was written by `save_to_disk`,
    else as a folder of data files, split by file name as the datasets library does (train*, test*,
    ...), one file at a time, so that an error names the file and its own row. `missing_ok`: None
    instead of an error when there is no such split.
    """
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            why = local_reason(name) or f"it ends in {data_suffix(path)[0]}, a file name"
            raise UserError(
                f"dataset file not found: {name}: no such file or folder (read as a local path: {why}); "
                "pass an existing data file or folder, or a hub dataset id (org/name)"
            )
        if path.is_file():
            if split != "train" and missing_ok:
                return None
            return _load_file(name, path)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _pick_split(_load_saved(name, path), name, split, missing_ok)
        if config_name is None:
            return _load_folder(name, path, split, missing_ok)
    if not _looks_local(name):
        offline_if_unreachable()  # once, before the library's retries: a Hub that does not answer fails in seconds
    try:
        data = load_dataset(str(Path(name).expanduser()) if _looks_local(name) else name, config_name)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, offline mode
        if offline_mode() and not _looks_local(name):
            raise UserError(
                f"could not load dataset '{name}': {offline_why()}, and the datasets cache has no copy of it\n"
                f"  Offline, pass a data file or folder: save it where you have access "
                f"(`datasets.load_dataset('{name}', split='{split}').to_json('data.jsonl')`) and pass it: "
                "--dataset_name data.jsonl (the repo ships Anthropic HH-RLHF pairs in data/hh-rlhf/). "
                "With a copy in the cache, HF_HUB_OFFLINE=1 skips the network"
            ) from None
        raise hub_error(
            "dataset",
            name,
            err,
            f"If the Hub is unreachable, save the data as a .jsonl/.parquet/.csv file where you have access "
            f"(`datasets.load_dataset('{name}', split='{split}').to_json('data.jsonl')`) "
            f"and pass it: --dataset_name data.jsonl",
        ) from None
    return _pick_split(data, name, split, missing_ok)


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know

# A dataset read from a folder of files keeps, per row, its file and its row in that file, so errors
# can name them (RowLocator). dpo/data/pairs.py reads only the columns it converts; these never reach TRL.
FILE_COLUMN, FILE_ROW_COLUMN = "__dpo_file__", "__dpo_file_row__"


SAVED_FIX = "save it again with save_to_disk, or pass the data as a .jsonl/.parquet file"


def _load_saved(name: str, folder: Path):
    """A folder written by `save_to_disk`. The files its JSON lists (splits, arrow shards) are checked to lie
    inside it first; a damaged folder (cut-short shard, invalid JSON, missing file) is one line naming it."""
    fix, parts = f"{name} is damaged: {SAVED_FIX}", [folder]
    if (folder / "dataset_dict.json").exists():
        splits = read_json_object(folder / "dataset_dict.json", {"splits": (list, str)}, fix)["splits"]
        parts = [confined(folder, split, folder / "dataset_dict.json") for split in splits]
    for part in parts:
        state = read_json_object(part / "state.json", {"_data_files": (list, dict)}, fix)
        for shard in state["_data_files"]:
            confined(part, shard.get("filename"), part / "state.json")
    try:
        return load_from_disk(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name}: a save_to_disk dataset folder that cannot be read ({reason}): {SAVED_FIX}") from None


def _load_folder(name: str, folder: Path, split: str, missing_ok: bool) -> Dataset | None:
    """Split `split` of a folder of data files: each file loaded and checked alone, then concatenated."""
    from datasets import concatenate_datasets

    folder = folder.resolve()  # files are listed with absolute paths
    splits = folder_data_files(folder)
    if not splits:
        raise UserError(
            f"{name}: no data files in this folder (.jsonl, .json, .parquet, .csv, optionally .gz/.zst; files in "
            f"a training run's folder, one holding {' or '.join(RUN_FILES[:2])}, are run artifacts, not data)"
        )
    if split not in splits:
        if missing_ok:
            return None
        raise UserError(f"dataset '{name}' has no split '{split}'; it has {sorted(splits)} (from the file names)")
    parts = []
    for file in splits[split]:
        shown = str(Path(name) / Path(file).relative_to(folder))
        data = _load_file(shown, Path(file))
        data = data.add_column(FILE_COLUMN, [shown] * len(data)).add_column(FILE_ROW_COLUMN, range(1, len(data) + 1))
        if parts and data.features != parts[0].features and _same_but_text_width(data.features, parts[0].features):
            data = data.cast(parts[0].features)  # .jsonl gives large_string, .csv and .parquet string
        if parts and data.features != parts[0].features and (values := _json_folder(splits[split], folder, name)):
            return values  # valid JSON files pyarrow typed apart: all of them as their values
        if parts and data.features != parts[0].features:
            first = parts[0][FILE_COLUMN][0]
            theirs = {k: str(v) for k, v in data.features.items()}
            ours = {k: str(v) for k, v in parts[0].features.items()}
            diff = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            raise UserError(f"{shown}: columns {diff} differ from {first} (missing, or of another type)")
        parts.append(data)
    return concatenate_datasets(parts)


def _json_folder(files: list, folder: Path, name: str) -> Dataset | None:
    """A folder's JSON files read as their values (encoding.json_values), each row with its file and row; None when
    a file is not JSON, not valid, or a field holds another kind of value than in the other files (text in one,
    a number in another: columns that really differ, refused by the caller)."""
    if any(data_suffix(Path(f))[0] not in (".json", ".jsonl") or json_problem(Path(f)) for f in files):
        return None
    records, kinds = [], {}
    for file in files:
        shown = str(Path(name) / Path(file).relative_to(folder))
        rows = json_records(Path(file))
        for row in rows:
            for key, value in row.items():
                if value is not None and kinds.setdefault(key, json_type(value)) != json_type(value):
                    return None
        records += [{**r, FILE_COLUMN: shown, FILE_ROW_COLUMN: i} for i, r in enumerate(rows, start=1)]
    return json_values(records)


def _same_but_text_width(a, b) -> bool:
    """True when two files' columns differ only in Arrow's two text types, string and large_string."""
    return str(a).replace("large_string", "string") == str(b).replace("large_string", "string")


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


# ── where a problem is: file, row, line, field ──────────────────────────────────────────────────


class RowLocator:
    """'<file>, row N[ (line L)], field 'f'' for error messages; line numbers only for .jsonl files.
    For data read from a folder (`data` has FILE_COLUMN), the file of the row and its row in that file."""

    def __init__(self, source: str, data: Dataset | None = None):
        self.source = source
        self._data = data if data is not None and FILE_COLUMN in data.column_names else None
        self._lines: dict[str, list[int]] = {}

    def _line(self, source: str, row: int) -> int | None:
        path = Path(source).expanduser()
        if data_suffix(path)[0] != ".jsonl" or not path.is_file():
            return None
        if source not in self._lines:
            with open_data_file(path) as f:
                self._lines[source] = [i for i, line in enumerate(f, start=1) if line.strip()]
        lines = self._lines[source]
        return lines[row - 1] if row <= len(lines) else None

    def at(self, row: int, field: str | None = None) -> str:
        source = self.source
        if self._data is not None:  # row N of the folder is row M of one of its files
            record = self._data.select_columns([FILE_COLUMN, FILE_ROW_COLUMN])[row - 1]
            source, row = record[FILE_COLUMN], record[FILE_ROW_COLUMN]
        line = self._line(source, row)
        where = f"{source}, row {row}" + (f" (line {line})" if line and line != row else "")
        return where + (f", field '{field}'" if field else "")


def text_field(value, where: str) -> str:
    if value is None:
        raise UserError(f"{where}: missing (no value)")
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, got {type(value).__name__} ({value!r:.60})")
    return value


def messages_field(value, where: str) -> list[dict]:
    """A list of {"role": str, "content": str}, with their tool fields (dpo/data/tools.py: `tool_calls` of an
    assistant turn, whose content may then be empty or null, `tool_call_id` / `name` of a tool turn); other
    keys are not kept."""
    if value is None:
        raise UserError(f"{where}: missing (no value)")
    if not isinstance(value, list):
        raise UserError(
            f"{where}: expected a list of messages [{{'role': ..., 'content': ...}}], got {type(value).__name__} ({value!r:.60})"
        )
    out = []
    for i, message in enumerate(value, start=1):
        calls = isinstance(message, dict) and has_calls(message)
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not (isinstance(message.get("content"), str) or (calls and message.get("content") is None))
        ):
            raise UserError(f"{where}, message {i}: expected {{'role': text, 'content': text}}, got {message!r:.80}")
        if (role := message["role"]) not in ROLES:  # chat templates skip or refuse other roles
            hint = ""
            if role.lower() in ROLES:
                hint = " (roles are lower case)"
            elif role.lower() in ("human", "gpt", "bot", "model"):
                hint = " (ShareGPT-style names: map human -> user, gpt/model -> assistant)"
            raise UserError(f"{where}, message {i}: role '{role}' is not one of {list(ROLES)}{hint}")
        if role == "system" and i > 1:
            raise UserError(late_system_error(where, i))
        extras = message_extras(message, role, f"{where}, message {i}")
        out.append({"role": role, "content": message["content"] or "", **extras})
    return out


def late_system_error(where: str, i: int) -> str:
    """A system turn that is not the first message: templates paste it mid-conversation or refuse it."""
    return (
        f"{where}, message {i}: a system turn after the conversation started (chat templates render it pasted "
        f"into the conversation, or refuse it); make it the first message, or fold its text into a user turn"
    )


# ── held-out split ────────────────────────────────────────────────────────────────────


def split_heldout(data: Dataset, test_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded train/test split; the same seed always holds out the same rows."""
    if not test_size:
        return data, None
    try:
        parts = data.train_test_split(test_size=test_size, seed=seed)
    except ValueError as err:  # e.g. too few rows for this test_size
        raise UserError(f"test_size {test_size} cannot split {len(data)} rows: {str(err).splitlines()[0]}") from None
    return parts["train"], parts["test"]
