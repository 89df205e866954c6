"""List and clear the reference log-prob cache (dpo/train/speed/refcache.py): `python -m dpo.cache`.

    python -m dpo.cache                          # list: size, model, pairs, data fingerprint, last use
    python -m dpo.cache remove 3f2a9c1b          # one cache, by its key (or a unique start of it)
    python -m dpo.cache remove --unused_days 30  # those no run has used for 30 days
    python -m dpo.cache remove --all
    python -m dpo.cache --cache_dir /other/reference-logps   # default: $DPO_REFERENCE_CACHE or ~/.cache/...

Each recipe run with `reference_cache: true` keeps its reference log-probs in one folder per model
and settings (a key); pairs of every data set it saw share that folder, so it grows with each new
data set. A key folder holds key.json (what the key hashes: model config, weights hash, max_length,
...; its time is set by every run that uses it, a full hit included, so it is the last use) and part-*.parquet files
(one row per pair), and the cache's marker (.dpo-folder.json, dpo/folders.py) naming its key. Other files
and folders are tolerated and left alone. Removing deletes whole key folders, only direct children of the
cache folder that the cache made (its marker, or a key.json whose hash is the folder's name: a folder only
named like a key, a MongoDB ObjectId say, is never touched), never through a link; nothing read from a file is
used as a path. An empty --cache_dir or $DPO_REFERENCE_CACHE is refused, never read as the current folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dpo.errors import UserError, exit_on_user_error
from dpo.files import file_in_the_way
from dpo.folders import given_path, read_marker, remove_marked, write_marker
from dpo.gate.check import parse_and_check_flags
from dpo.gate.flags import command_parser
from dpo.train.speed.refcache import default_cache_dir
from dpo.train.speed.refstore import KIND, is_cache_folder

KEY = re.compile(r"^[0-9a-f]{24}$")  # refcache.cache_key: blake2b, 12 bytes, as hex
DAY = 86_400  # seconds


@dataclass(frozen=True)
class CacheEntry:
    key: str
    size: int  # bytes, every file of the folder
    pairs: int  # distinct pairs stored
    fingerprint: str  # of the set of stored pairs: equal for caches of the same data
    last_use: float  # seconds since the epoch
    model: str


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _stored_rows(folder: Path) -> set[str]:
    import pyarrow.parquet as pq

    rows: set[str] = set()
    for part in sorted(folder.glob("part-*.parquet")):
        if part.is_symlink():
            continue
        try:
            rows.update(pq.read_table(part, columns=["row"])["row"].to_pylist())
        except Exception:  # a damaged part: the cache itself re-checks its files; listing goes on
            continue
    return rows


def _describe_model(parts: dict) -> str:
    """A short description of the model a key was made for, from key.json (whatever keys it has)."""
    config = parts.get("config") if isinstance(parts.get("config"), dict) else {}
    names = config.get("architectures") or [config.get("model_type") or "unknown model"]
    bits = [str(names[0]) if isinstance(names, list) and names else str(names)]
    layers, width = config.get("num_hidden_layers"), config.get("hidden_size")
    if layers and width:
        bits.append(f"{layers} layers x {width}")
    if parts.get("dtype"):
        bits.append(str(parts["dtype"]).removeprefix("torch."))
    quant = parts.get("quantization_config")
    if isinstance(quant, dict) and quant.get("load_in_4bit"):
        bits.append("4-bit")
    if parts.get("max_length"):
        bits.append(f"max_length {parts['max_length']}")
    if isinstance(parts.get("weights"), str):
        bits.append(f"weights {parts['weights'][:8]}")
    return ", ".join(bits)


def read_entry(folder: Path) -> CacheEntry:
    key_file = folder / "key.json"
    try:
        parts = json.loads(key_file.read_text()) if not key_file.is_symlink() else {}
    except (OSError, ValueError):
        parts = {}
    files = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()]
    last = key_file.lstat().st_mtime if key_file.is_file() else max((p.lstat().st_mtime for p in files), default=0)
    rows = _stored_rows(folder)
    fingerprint = hashlib.blake2b("\n".join(sorted(rows)).encode(), digest_size=4).hexdigest() if rows else "-"
    return CacheEntry(
        folder.name,
        _size(folder),
        len(rows),
        fingerprint,
        last,
        _describe_model(parts if isinstance(parts, dict) else {}),
    )


def key_folders(cache_dir: Path) -> list[Path]:
    """The cache's key folders: direct children named like a key, real folders (not links), that the cache
    made (refstore.is_cache_folder): a folder only named like one is not a key folder."""
    if not cache_dir.is_dir():
        return []
    return sorted(
        p
        for p in cache_dir.iterdir()
        if KEY.match(p.name) and p.is_dir() and not p.is_symlink() and is_cache_folder(p)
    )


def list_caches(cache_dir: Path) -> list[CacheEntry]:
    return [read_entry(folder) for folder in key_folders(cache_dir)]


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(cache_dir: Path, entries: list[CacheEntry]) -> str:
    where = f"{cache_dir} ($DPO_REFERENCE_CACHE moves it)"
    if not entries:
        return f"no reference caches in {where}"
    total = human_size(sum(e.size for e in entries))
    lines = [
        f"{len(entries)} reference cache(s) in {where}, {total} in all:",
        f"{'key':24}  {'size':>9}  {'pairs':>7}  {'data':8}  {'last use':16}  model",
    ]
    for e in sorted(entries, key=lambda e: e.last_use, reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use))
        lines.append(f"{e.key:24}  {human_size(e.size):>9}  {e.pairs:>7,}  {e.fingerprint:8}  {used:16}  {e.model}")
    lines.append("remove: python -m dpo.cache remove KEY | --unused_days N | --all")
    return "\n".join(lines)


def choose(cache_dir: Path, keys: list[str], all_: bool, unused_days: float | None, now: float) -> list[Path]:
    """The key folders a remove command names; UserError for a key that names none or several."""
    folders = key_folders(cache_dir)
    if all_:
        return folders
    if unused_days is not None:
        return [f for f in folders if read_entry(f).last_use < now - unused_days * DAY]
    chosen = []
    for key in keys:
        found = [f for f in folders if f.name.startswith(key.lower())] if key else []
        if len(found) != 1:
            known = ", ".join(f.name for f in folders) or "none"
            what = "no cache" if not found else f"{len(found)} caches"
            raise UserError(
                f"{key!r}: {what} in {cache_dir} has that key; keys: {known} (python -m dpo.cache lists them)"
            )
        chosen.append(found[0])
    return list(dict.fromkeys(chosen))  # a key named twice (or by two of its starts) is removed once


def remove(cache_dir: Path, folders: list[Path]) -> int:
    """Delete `folders` (key folders of `cache_dir`, checked again here); returns the bytes freed."""
    root = cache_dir.resolve()
    freed = 0
    for folder in folders:
        if folder.is_symlink() or folder.parent.resolve() != root or not is_cache_folder(folder):
            raise AssertionError(f"{folder} is not a key folder of {cache_dir}")  # choose() returns only those
        size = _size(folder)
        if read_marker(folder, KIND) is None:  # made before markers (its key.json names it): marked, then removed
            write_marker(folder, KIND, key=folder.name)
        if remove_marked(cache_dir, folder, KIND):
            freed += size
    return freed


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m dpo.cache", __doc__)
    parser.add_argument("--cache_dir", help="the cache folder (default: $DPO_REFERENCE_CACHE or ~/.cache/...)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="list the caches (the default)")
    rm = commands.add_parser("remove", allow_abbrev=False, help="remove caches: by key, --unused_days N or --all")
    rm.add_argument("keys", nargs="*", help="keys (or unique starts of keys) as listed")
    rm.add_argument("--unused_days", type=float, help="remove those no run has used for this many days")
    rm.add_argument("--all", action="store_true", help="remove every cache")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[CacheEntry]:
    args = parse_and_check_flags(
        _parser(), argv
    )  # the settings gate (dpo/gate/): --unused_days >= 0 and finite, no empty --cache_dir
    cache_dir = given_path(args.cache_dir, "--cache_dir") or default_cache_dir()
    if (blocker := file_in_the_way(cache_dir)) is not None:  # was "no reference caches in" a file
        raise UserError(f"--cache_dir {cache_dir}: {blocker} is a file, not a folder; name the cache folder")
    if args.command == "remove":
        given = sum([bool(args.keys), args.all, args.unused_days is not None])
        if given != 1:
            raise UserError("remove needs exactly one of: KEY..., --unused_days N, --all")
        folders = choose(cache_dir, args.keys, args.all, args.unused_days, time.time())
        freed = remove(cache_dir, folders)
        print(f"removed {len(folders)} reference cache(s) from {cache_dir}, {human_size(freed)} freed")
    entries = list_caches(cache_dir)
    print(table(cache_dir, entries))
    return entries


if __name__ == "__main__":
    main()
