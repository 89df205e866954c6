"""Telling a full disk apart from other write errors, a file's sha256, and reading the files the tools trust:
names kept inside their folder, JSON/JSONL/YAML of the expected shape, checksums compared."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from dpo.errors import UserError


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing entry at or above `path` when it is not a folder (a file, or a link to one): no
    folder can be made at `path` under it. None when that entry is a folder, or nothing exists."""
    for entry in (Path(path), *Path(path).parents):
        if entry.exists():
            return None if entry.is_dir() else entry
    return None


def numbered_folders(folder: str | Path, prefix: str, holding: str) -> list[int]:
    """N of every `folder/<prefix>N/` that holds `holding` (round-N/round.json), in order; other names skipped."""
    found = (p.parent.name.removeprefix(prefix) for p in Path(folder).glob(f"{prefix}*/{holding}"))
    return sorted(int(n) for n in found if n.isdigit())


def with_default_permissions(folder: str | Path) -> Path:
    """Give `folder` and everything under it the modes a plain `mkdir`/`open` would under the user's umask.

    Staging folders come from mkdtemp (0700) and safetensors writes its files 0600 (a private temporary file
    renamed into place), so without this an exported model was readable by its owner only: an Ollama or
    llama.cpp server running as another user could not open it. Links are left alone (never followed)."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return folder


# ── a full disk ──────────────────────────────────────────────────────────────────────────────
# What a save writes besides the weights and the optimizer state: trainer_state.json, scheduler.pt,
# rng_state.pth, training_args.bin, adapter_config.json and README.md in a checkpoint (about 20 kB for
# the tiny test model, a few hundred kB after thousands of logged steps); resolved_config.yaml,
# final_metrics.json and training_curves.png (about 100 kB) among the final files. 1 MiB covers both.
SMALL_FILES = 2**20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def size_text(n: float) -> str:
    """Bytes for a person: 1.4 GB, 12.3 MB, 340 kB (powers of 1000, as df -H and file managers show)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(n, 0) / 1e3:.0f} kB"


def free_bytes(folder: str | Path) -> int:
    """Free space for an unprivileged writer on the disk that holds `folder` (or its nearest existing parent)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(err: BaseException) -> bool:
    """An error a full disk (or quota) raised: ENOSPC / EDQUOT, also wrapped or only in the message, as
    safetensors' writer gives it (`SafetensorError: ... No space left on device (os error 28)`).
    torch.save's zip writer only says "unexpected pos" (a short write): the callers also compare the
    free space with what they were writing."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(seen) for code in DISK_FULL_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_while_writing(err: BaseException, folder: str | Path, needed) -> int | None:
    """When writing into `folder` failed with `err` because the disk is full: the bytes the write
    needed (`needed()`, called only then); None for any other failure. Full means the error says so,
    or it is an OSError / RuntimeError (torch.save's "unexpected pos" carries no errno) and less
    than `needed()` is free now."""
    if not (is_disk_full(err) or isinstance(err, (OSError, RuntimeError))):
        return None
    size = needed()
    return size if is_disk_full(err) or free_bytes(folder) < size else None


def disk_full_message(folder: str | Path, what: str, needed: int) -> str:
    """'disk full: <folder> has M free; needed for <what>: about N'; the callers add what was kept and what to do."""
    return (
        f"disk full: {folder} has {size_text(free_bytes(folder))} free; needed for {what}: about {size_text(needed)}"
    )


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Before any weights load: refuse an output folder on a disk without room for `what` (`needed` bytes)."""
    if free_bytes(folder) < needed:
        raise UserError(f"{disk_full_message(folder, what, needed)}: free space or pick another --output_dir")


def replace_atomically(path: str | Path, write) -> Path:
    """`write(tmp)` writes the new content under a temporary name beside `path`, which is then renamed over it: a
    reader (a later command, a committed result's consumer) sees the old file whole or the new one whole, never
    one cut short by a kill or a full disk. On failure the temporary file is removed and `path` is untouched.
    `write` gets a name ending in .tmp: a writer that picks its format by extension must be told it (savefig's
    format="png")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`path`'s new text, whole or not at all (replace_atomically)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


FIGURE_MARK = "dpo-recipes"  # the PNG 'Software' text of the figures these tools write (is_our_figure)


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure saved as PNG at `path`, whole or not at all (replace_atomically), marked as ours."""
    metadata = {"Software": FIGURE_MARK}
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=metadata))


def is_our_figure(path: str | Path) -> bool:
    """`path` is a PNG that save_figure wrote (its tEXt chunk, before the image data): one a tool may replace."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG") and b"Software\x00" + FIGURE_MARK.encode() in head


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ── files the tools trust: paths kept inside their folder, JSON of the expected shape, checksums ──
# A run folder, a checkpoint or a cache folder may come from someone else (copied, unpacked, edited):
# what its own files say is read through these, so that a list of names can never reach outside the
# folder and a damaged file is one line naming it, never a traceback or a silent wrong answer.


def confined(folder: str | Path, entry, source: str | Path) -> Path:
    """`folder/entry` for a name `entry` read from the file `source`, when it stays strictly inside
    `folder` once resolved (symlinks followed, `..` applied, an absolute entry is outside). UserError
    naming `source` and the entry otherwise. Returns the path unresolved (a link inside stays a link)."""
    if not isinstance(entry, str) or not entry.strip() or "\x00" in entry:
        raise UserError(f"{source} lists {entry!r}, which is not a file name inside {folder}: the file is damaged")
    base = Path(folder).resolve()
    target = (base / entry).resolve()
    if base not in target.parents:
        raise UserError(
            f"{source} lists {entry!r}, which resolves to {target}, not inside {base}: a folder's own files only "
            "name files inside it (the file was edited or comes from elsewhere); nothing was touched"
        )
    return Path(folder) / entry


def remove_entry(folder: str | Path, entry, source: str | Path) -> Path:
    """Delete `folder/entry` (a file, a link, or a folder with what is in it) after `confined` allows it."""
    path = confined(folder, entry, source)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    return path


# Shapes: {key: (type, type of each element or None)}; an element type applies to a list's items or a
# dict's values. bool is not accepted as int (JSON true is no step count).
def _type_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(kind, kind.__name__)


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def shape_problem(data, shape: dict, optional: tuple = ()) -> str | None:
    """Why `data` (parsed JSON) is not an object of `shape`, naming the entry; None if it is."""
    if not isinstance(data, dict):
        return f"holds {_type_name(type(data))}, not an object"
    for key, (kind, element) in shape.items():
        if key not in data:
            if key in optional:
                continue
            return f"has no '{key}' entry"
        value = data[key]
        if not _is(value, kind):
            return f"entry '{key}' is {_type_name(type(value))}, not {_type_name(kind)}"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for name, item in items if element is not None else ():
            if not _is(item, element):
                return f"entry '{key}' [{name!r}] is {_type_name(type(item))}, not {_type_name(element)}"
    return None


def read_json_object(path: str | Path, shape: dict, fix: str, optional: tuple = ()) -> dict:
    """The JSON object in `path`, checked against `shape`; UserError naming the file, the line or the
    entry, and `fix` (what to do) when it is missing, not UTF-8, not JSON, or of another shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid JSON: byte {err.start} is not UTF-8; {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}"
        ) from None
    if problem := shape_problem(data, shape, optional):
        raise UserError(f"{path} {problem}; {fix}")
    return data


def read_jsonl_objects(
    path: str | Path, shape: dict, fix: str, max_chars: tuple[int, str] | None = None, optional: tuple = ()
) -> list[dict]:
    """One JSON object of `shape` (the keys in `optional` may be absent) per non-blank line of `path`; UserError
    naming the line otherwise.
    `max_chars`: (a bound on each field of `shape`, in characters as JSON writes it; why no field is longer):
    a field past it is named with its row, before anything is done with it (a 1 MB prompt was tokenized whole)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start} is not UTF-8; {fix}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON (column {err.colno}: {err.msg}); {fix}") from None
        if problem := shape_problem(row, shape, optional):
            raise UserError(f"{path}:{number}: the row {problem}; {fix}")
        for field in shape if max_chars else ():
            if (size := len(json.dumps(row.get(field), ensure_ascii=False))) > max_chars[0]:
                raise UserError(
                    f"{path}:{number}: the row's {field} is {size:,} characters long, above {max_chars[0]:,} "
                    f"({max_chars[1]}); {fix}"
                )
        rows.append(row)
    return rows


def read_yaml_mapping(path: str | Path, fix: str) -> dict:
    """The YAML mapping in `path`; UserError naming the file (and line, column) when it is not one."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes().decode())
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start} is not UTF-8; {fix}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {_type_name(type(data))}, not a mapping of settings; {fix}")
    return data


def is_sha256(text) -> bool:
    """64 lowercase hex digits, as file_sha256 writes them."""
    return isinstance(text, str) and re.fullmatch(r"[0-9a-f]{64}", text) is not None


def not_a_sha256(text) -> str:
    """What a recorded sha256 that is_sha256 refuses is instead: 'empty', or its start and length."""
    return "empty" if text in ("", None) else f"{str(text)[:16]!r}, {len(str(text))} characters, not 64 hex digits"


def sha256_mismatch(path: Path, expected: str) -> str | None:
    """Why `path` is not the file whose sha256 is `expected` (missing, unreadable, other bytes, or `expected`
    itself no sha256: an emptied or cut record); None if it is."""
    if not is_sha256(expected):
        return f"{path} has no usable recorded sha256 ({not_a_sha256(expected)})"
    try:
        actual = file_sha256(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if actual != expected:
        return f"{path} has sha256 {actual[:12]}..., {expected[:12]}... was recorded when it was written"
    return None


# ── JSON the tools write: strict, never NaN or Infinity ──────────────────────────────────────
# Python's json writes float('nan') as NaN and float('inf') as Infinity, which no strict parser (jq,
# JavaScript, Go, json.loads with parse_constant) reads: every file the tools write goes through
# json_text. Two classes of content, decided per file by its writer:
#   records (markers, round.json, rounds.json, settings, keys, locks): a tool reads them back as truth, and
#     every number in them is checked finite upstream, so a non-finite one is a bug: ValueError naming the
#     file and the entry, nothing written;
#   observations (metrics, evaluation results, benchmark results): a diverged loss or an overflowing score
#     is a legitimate measurement: written as null, and the log names each entry so written.


def non_finite_entries(data, where: str = "") -> list[tuple[str, float]]:
    """(entry path like rounds[0].heldout.reward, value) of every NaN or infinite float inside `data`."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [(where or "the value", data)]
    if isinstance(data, dict):
        return [hit for key, value in data.items() for hit in non_finite_entries(value, f"{where}.{key}".lstrip("."))]
    if isinstance(data, (list, tuple)):
        return [hit for i, value in enumerate(data) for hit in non_finite_entries(value, f"{where}[{i}]")]
    return []


def _nulled(data):
    """`data` with every non-finite float replaced by None (a new structure; `data` is not changed)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _nulled(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_nulled(value) for value in data]
    return data


def strict_json_data(data, source: str | Path, observations: bool = False):
    """`data` ready for json.dumps(allow_nan=False) into the file `source`. A NaN or infinity: with `observations`,
    replaced by null (a new structure) and said in the log; otherwise ValueError naming `source` and the entry."""
    found = non_finite_entries(data)
    if found and not observations:
        entry, value = found[0]
        raise ValueError(
            f"refusing to write {source}: its entry {entry} is {value} (JSON has no NaN or Infinity, and this file "
            f"is read back as a record); {len(found)} such value(s); nothing was written"
        )
    if found:
        from dpo.log import log

        shown = ", ".join(f"{entry} = {value}" for entry, value in found[:5]) + (", ..." if len(found) > 5 else "")
        log(f"{source}: {len(found)} non-finite value(s) written as null (JSON has no NaN or Infinity): {shown}")
        return _nulled(data)
    return data


def json_text(data, source: str | Path, observations: bool = False, **dumps) -> str:
    """`data` as strict JSON text for the file `source` (strict_json_data's rules; `dumps`: indent, sort_keys...)."""
    return json.dumps(strict_json_data(data, source, observations), allow_nan=False, **dumps)


def jsonl_text(rows: list, source: str | Path, observations: bool = False, **dumps) -> str:
    """One strict JSON line per row (an entry is named by its row: [3].reward)."""
    rows = strict_json_data(rows, source, observations)
    return "".join(json.dumps(row, allow_nan=False, **dumps) + "\n" for row in rows)
