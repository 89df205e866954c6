"""The reference cache's files (dpo/train/speed/refcache.py): part files written whole, each with its
sha256 beside it, and read back only when whole, finite and complete.

A cache folder outlives runs and can be copied, shared or edited. Every part-*.parquet is written to
a temporary name, its sha256 written to part-*.parquet.sha256, and only then renamed into place;
on load each part must match its sha256, hold the columns it should, and finite values, else the
run stops in one line naming the part (delete it: its pairs are computed again). A part never
holds a row that was not computed, nor a non-finite value. A folder that already holds every pair
is only read (a read-only or shared cache works); one that lacks pairs must be writable, which
is checked before anything is computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpo.errors import UserError
from dpo.files import file_sha256, is_sha256, json_text, not_a_sha256, sha256_mismatch
from dpo.folders import read_marker, write_marker
from dpo.signals import saving

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PART_COLUMNS = ("row", *COLUMNS, "seconds")
CHECKSUM = ".sha256"  # part-X.parquet's sha256 (hex) lives in part-X.parquet.sha256
KEPT = "Run the same command again: the reference values in that part are reused"
KIND = "reference cache"  # its folders' marker (dpo/folders.py)


def row_hash(token_ids) -> str:
    """A pair's row id (the `row` column): a hash of its prompt, chosen and rejected token ids (three int64
    numpy arrays, in that order), each preceded by its length."""
    h = hashlib.blake2b(digest_size=16)
    for ids in token_ids:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(ids.tobytes())
    return h.hexdigest()


def _damaged(part: Path, why: str) -> UserError:
    return UserError(
        f"reference cache part {part} {why}: delete it (its pairs are computed again on the next run), or set "
        "reference_cache: false"
    )


def cache_folder(base: Path, key: str) -> Path:
    """`base/key`, refused in one line when `base` (or a folder above it) is a file."""
    for path in (base, *base.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(
                    f"reference_cache_dir {base}: {path} is a file, not a folder; point reference_cache_dir at a "
                    "folder (it is created if missing), or set reference_cache: false"
                )
            break
    return base / key


def unwritable_reason(folder: Path) -> str | None:
    """Why nothing can be written into `folder` (created if missing), None if a file can be: found by
    creating and removing a temporary file, which permission bits alone do not tell (root, read-only mounts)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def key_of(parts: dict) -> str:
    """The key of a cache folder: a hash of what its values depend on (refcache.cache_key's `parts`)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def is_cache_folder(folder: Path) -> bool:
    """`folder` is a key folder the reference cache made: it holds the cache's marker (dpo/folders.py) naming
    this key, or (a cache from before markers) a key.json whose hash is the folder's name. A folder merely
    named like a key (24 hex digits: a MongoDB ObjectId, say) is neither."""
    record = read_marker(folder, KIND)
    if record is not None:
        return record.get("key") == folder.name
    key_file = folder / "key.json"
    if folder.is_symlink() or key_file.is_symlink() or not key_file.is_file():
        return False
    try:
        parts = json.loads(key_file.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(parts, dict) and key_of(parts) == folder.name


def write_key(folder: Path, parts: dict) -> None:
    """key.json (what the key hashes, for a person reading the folder), written once: a full cache is never
    written; then the cache's marker, which lets `python -m dpo.cache remove` delete the folder."""
    if not (folder / "key.json").is_file():
        tmp = folder / f".key.json.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json_text(parts, folder / "key.json", indent=2, sort_keys=True, default=str))
        os.replace(tmp, folder / "key.json")
    if read_marker(folder, KIND) is None:
        write_marker(folder, KIND, key=folder.name)


def mark_used(folder: Path) -> None:
    """key.json's time is the key's last use (python -m dpo.cache lists it, `remove --unused_days` reads it):
    set it to now on every use, a full hit included. A cache this user cannot write (read-only, shared) keeps
    its time: nothing in it is written."""
    try:
        os.utime(folder / "key.json", follow_symlinks=False)  # a link's own time, never its target's
    except OSError:
        pass


@dataclass
class Store:
    """The rows of one key folder: row id -> (ref chosen, ref rejected, seconds it took, part file)."""

    folder: Path
    rows: dict = field(default_factory=dict)

    def load(self) -> Store:
        """Every part, each verified (its sha256, its columns, finite values); UserError naming a damaged one."""
        rows = {}
        for part in sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []:
            checksum = part.with_name(part.name + CHECKSUM)
            try:
                expected = checksum.read_text().strip()
            except OSError:
                raise _damaged(part, f"has no readable checksum ({checksum.name})") from None
            if not is_sha256(expected):  # emptied or cut: said as such, not as a file of other bytes
                raise _damaged(part, f"has no usable checksum ({checksum.name}: {not_a_sha256(expected)})")
            if mismatch := sha256_mismatch(part, expected):
                raise _damaged(part, f"is not the file that was written ({mismatch.removeprefix(str(part) + ' ')})")
            try:
                table = pq.read_table(part)
                columns = [table[k].to_pylist() for k in PART_COLUMNS]
            except (OSError, KeyError, pa.ArrowException) as err:
                raise _damaged(part, f"cannot be read ({str(err).splitlines()[0] if str(err) else err})") from None
            for row, c, r, s in zip(*columns):
                if not (isinstance(c, float) and isinstance(r, float) and math.isfinite(c) and math.isfinite(r)):
                    raise _damaged(part, f"holds a non-finite reference log-prob ({c}, {r}) for pair {row}")
                rows[row] = (c, r, s, part.name)
        return Store(self.folder, rows)

    def write(self, rows: list[str], chosen: list, rejected: list, seconds: list, env: dict, expected: int) -> str:
        """A new part file, written whole or not at all (temporary name, its sha256, then an atomic rename);
        returns its name. Refused unless it holds exactly the `expected` rows that were computed, each with
        finite values."""
        counts = {len(rows), len(chosen), len(rejected), len(seconds)}
        if counts != {expected}:
            raise RuntimeError(
                f"reference cache: {sorted(counts)} values computed for {expected} pairs; nothing stored"
            )
        for row, c, r in zip(rows, chosen, rejected):
            if c is None or r is None or not (math.isfinite(c) and math.isfinite(r)):
                raise UserError(
                    f"the reference model gives a non-finite log-prob ({c}, {r}) for a pair (row id {row}); nothing "
                    "was stored in the reference cache. The reference itself is broken (weights, dtype overflow: "
                    "try float32) or the pair is degenerate"
                )
        table = pa.table(
            {
                "row": rows,
                COLUMNS[0]: pa.array(chosen, pa.float32()),
                COLUMNS[1]: pa.array(rejected, pa.float32()),
                "seconds": seconds,
            }
        ).replace_schema_metadata({"environment": json_text(env, "a reference-cache part's environment")})
        name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        # a Ctrl-C waits for the part (dpo.signals), then stops the run: the values computed are kept
        with saving(f"reference cache part {self.folder / name}", "cache-part", advice=KEPT):
            tmp = self.folder / f".{name}.tmp"
            pq.write_table(table, tmp)
            checksum_tmp = self.folder / f".{name}{CHECKSUM}.tmp"
            checksum_tmp.write_text(file_sha256(tmp) + "\n")
            os.replace(checksum_tmp, self.folder / (name + CHECKSUM))  # the checksum first: a part never lacks one
            os.replace(tmp, self.folder / name)
        return name

    def environment_of(self, part: str) -> dict:
        meta = pq.read_schema(self.folder / part).metadata or {}
        return json.loads(meta.get(b"environment", b"{}"))
