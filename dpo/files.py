"""Writing output folders whole (built beside the target, swapped in only when complete), telling
a full disk apart from other write errors, and a file's sha256."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from dpo.errors import UserError


def replace_folder(target: str | Path, write) -> Path:
    """Build a folder with `write(tmp_folder)` next to `target`, then swap it in.

    If `write` fails, the temporary folder is removed and `target` is left as it was: nothing
    half-written. An existing `target` is replaced only after `write` succeeded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
