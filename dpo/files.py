"""Writing output folders whole: built beside the target, swapped in only when complete."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


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
