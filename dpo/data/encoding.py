"""A data file's bytes and JSON records, checked before a reader sees them (dpo/data/loading.py calls these):
UTF-8 with the byte, line and row of the first bad byte; JSON records with the 1-based row and field of the
first that is not an object, cannot be parsed, or holds a lone UTF-16 surrogate (which pyarrow reports at a
0-based row, or drops); the readers' own log lines kept quiet while they run.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from dpo.data.datafiles import data_suffix, open_data_file
from dpo.errors import UserError


def json_type(value) -> str:
    return {
        str: "text",
        list: "a list",
        dict: "an object",
        bool: "true/false",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _numbered_records(path: Path) -> tuple[list, str | None]:
    """([(row, line or None, record), ...], None), or ([], the first malformed line)."""
    with open_data_file(path) as f:
        text = f.read().decode("utf-8-sig", errors="replace")  # a byte-order mark is no JSON: the readers skip it
    suffix = data_suffix(path)[0]
    if suffix == ".json":
        try:
            records = json.loads(text)
            numbered = [
                (i, None, r) for i, r in enumerate(records if isinstance(records, list) else [records], start=1)
            ]
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a .json file written as JSON Lines
                return [], f"line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})"
            numbered = None
    if suffix == ".jsonl" or numbered is None:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((len(numbered) + 1, lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                return [], f"line {lineno}: malformed JSON ({err.msg}, column {err.colno})"
    return numbered, None


def json_problem(path: Path, surrogates_only: bool = False) -> str | None:
    """Why a JSON / JSON Lines file does not load: the first malformed line, or the first value
    whose type differs from the field's first value, or that holds a lone surrogate ("row N (line L),
    field 'f': ..."), or None. `surrogates_only`: look for lone surrogates alone."""
    numbered, problem = _numbered_records(path)
    if problem:
        return problem
    first_type: dict[str, str] = {}
    for row, lineno, record in numbered:
        where = f"row {row}" + (f" (line {lineno})" if lineno and lineno != row else "")
        if not isinstance(record, dict):
            return f"{where}: expected one JSON object {{...}} per record, got {json_type(record)}"
        for key, value in record.items():
            if (half := lone_surrogate(key) or lone_surrogate(value)) is not None:
                return (
                    f"{where}, field '{printable(key)}': the escape \\u{ord(half):04x} is half of a UTF-16 "
                    f"surrogate pair with no other half (not a character); remove it or write the whole pair"
                )
            if value is None or surrogates_only:
                continue
            kind = first_type.setdefault(key, json_type(value))
            if json_type(value) != kind:
                return f"{where}, field '{key}': expected {kind} as in the rows before, got {json_type(value)} ({value!r:.60})"
    return None


def json_records(path: Path) -> list[dict]:
    """The records of a JSON / JSON Lines file that json_problem passes, in order."""
    return [record for _, _, record in _numbered_records(path)[0]]


def json_values(records: list[dict]):
    """Records of JSON files that json_problem passes, as a Dataset of their values as they are: text columns as
    text, every other column as JSON values (datasets' Json). For valid files pyarrow cannot type: it infers types
    from the first 10 MiB of a file, so keys or types that first appear later (a tool call's arguments of other
    names) fail there with a message that names no row; and files of one folder it typed apart may differ."""
    from datasets import Dataset, Features, Json, Value

    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {name: [record.get(name) for record in records] for name in names}

    def feature(values: list):
        if all(v is None or isinstance(v, str) for v in values):
            return Value("string")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # row numbers, ids
            return Value("int64")
        return Json()

    return Dataset.from_dict(columns, features=Features({n: feature(v) for n, v in columns.items()}))


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 .. \udfff: half of a pair, or a lone one


def has_surrogate_escape(path: Path) -> bool:
    """True if the file's text holds a surrogate escape (pairs, as json.dumps writes emoji, or lone ones);
    read in 1 MB chunks, each searched with the 5 bytes before it (an escape cut by a chunk's end)."""
    tail = b""
    with open_data_file(path) as f:
        while chunk := f.read(1 << 20):
            if _SURROGATE_ESCAPE.search(tail + chunk):
                return True
            tail = chunk[-5:]
    return False


def lone_surrogate(value) -> str | None:
    """The first lone UTF-16 surrogate (json.loads reads "\\ud800" as one; it is no character and
    pyarrow refuses it) in a decoded JSON value, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return value[err.start]
        return None
    items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        for part in item if isinstance(value, dict) else (item,):
            if (half := lone_surrogate(part)) is not None:
                return half
    return None


def printable(text: str) -> str:
    return text.encode("utf-8", errors="backslashreplace").decode()


@contextmanager
def quiet_readers():
    """The datasets library's file readers log their error ("Failed to load JSON from file ...") before
    raising it; the caller reports it as one line naming the file and row, so the log line would be a
    second, raw message (with pyarrow's 0-based, per-block row number)."""
    names = [f"datasets.packaged_modules.{kind}.{kind}" for kind in ("json", "csv", "parquet")]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def blank(path: Path) -> bool:
    """True if the file holds only whitespace (read in 1 MB chunks: stops at the first character)."""
    with open_data_file(path) as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def check_utf8(name: str, path: Path) -> None:
    """UserError naming the row, line and byte offset of the first byte that is not UTF-8 (pyarrow reads
    such a .jsonl without complaint and fails later, in the middle of a row)."""
    offset, line, carry = 0, 1, b""  # bytes and newlines before `carry + chunk`
    with open_data_file(path) as f:
        while chunk := f.read(1 << 20):
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as err:
                if err.reason == "unexpected end of data" and len(data) - err.start < 4:  # cut at the chunk's end
                    carry, data = data[err.start :], data[: err.start]
                else:
                    line += data.count(b"\n", 0, err.start)
                    not_utf8(name, path, offset + err.start, line, data[err.start])
            offset, line = offset + len(data), line + data.count(b"\n")
    if carry:  # the file ends inside a character
        not_utf8(name, path, offset, line, carry[0])


def not_utf8(name: str, path: Path, offset: int, line: int, byte: int):
    suffix, compression = data_suffix(path)
    if suffix == ".jsonl":  # row = non-blank lines up to this one
        with open_data_file(path) as f:
            row = sum(1 for _, text in zip(range(line), f) if text.strip())
        where = f"row {row}" + (f" (line {line})" if row != line else "")
    elif suffix == ".csv":  # the header is line 1 (a cell spanning lines shifts this)
        where = f"row {line - 1} (line {line})"
    else:
        where = f"line {line}"
    uncompressed = " (uncompressed)" if compression else ""
    raise UserError(
        f"{name}, {where}, byte offset {offset}{uncompressed}: not UTF-8 (byte 0x{byte:02x}); "
        f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 in{suffix} > out{suffix}"
    )
