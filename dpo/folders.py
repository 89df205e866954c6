"""Folders recognised by what they hold, never by their name's shape or by where they are.

A tool deletes, replaces or reuses only a folder it marked itself: `write_marker` writes MARKER
(`.dpo-folder.json`: its kind, what it was made from, optionally every file's sha256) last, by an atomic
rename, so a folder killed while being written has none; `marker_problem` reads it back (a regular
file, JSON of its shape, the kind asked for, each recorded file whole) and says what is wrong.
`write_marked_folder` builds a folder beside its target and renames it into place with its marker
inside: the target is either absent, or whole and marked. `remove_marked` deletes a marked folder
inside the root it was given, and nothing else.

A path is never empty: `given_path` refuses "" or blanks from a flag or an environment variable
(Path("") is the current folder, "~" the home folder: a cache there would be written among the user's
files). `output_kind_problem` refuses to write one kind of tool output into a folder that holds
another kind, or into a folder inside a finished run or rounds folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dpo.errors import UserError
from dpo.files import confined, file_sha256, json_text, sha256_mismatch, shape_problem, with_default_permissions
from dpo.signals import saving

MARKER = ".dpo-folder.json"
MODEL_KIND = "model"  # a model folder written for reuse (pi_ref of the demo and the rounds, a tiny model)
MARKER_SHAPE = {"kind": (str, None), "sha256": (dict, str)}

# Each kind of tool output folder and the files only that kind holds (written by the tool that made it).
OUTPUT_KINDS = {
    "rounds": ("rounds_settings.json", "rounds.json"),  # recipes/dpo_rounds.py
    "run": ("run_complete.json",),  # a finished training run: the recipes' output, each round's DPO run
    MODEL_KIND: ("materialized.json",),  # python -m dpo.models (dpo/offline/pip_models.py); others carry MARKER
}
KIND_NAMES = {
    "rounds": "an on-policy rounds run (recipes/dpo_rounds.py)",
    "run": "a finished training run",
    MODEL_KIND: "a model folder made by these tools",
}


def empty_path_problem(value, source: str) -> str | None:
    """What is wrong with `value`, a path from `source` (a setting, a flag, an environment variable), when it
    is an empty or blank text; None for any other value (None is unset: the default applies)."""
    if isinstance(value, str) and not value.strip():
        return (
            f"{source} is {value!r}, an empty path (it would be read as the current folder): name a file or folder, "
            "or leave it unset for the default"
        )
    return None


def given_path(value, source: str) -> Path | None:
    """`value` (a flag's or an environment variable's text) as a path, ~ expanded; None when unset (None).
    UserError naming `source` when it is empty or blank (empty_path_problem)."""
    if problem := empty_path_problem(value, source):
        raise UserError(problem)
    return None if value is None else Path(value).expanduser()


def env_path(name: str, default: str | Path) -> Path:
    """The folder the environment variable `name` names, else `default`; a set but blank variable is refused."""
    return given_path(os.environ.get(name, str(default)), f"the environment variable {name}")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MARKER)


def write_marker(folder: str | Path, kind: str, hash_files: bool = False, **facts) -> Path:
    """Mark `folder` as one `kind` of folder of these tools; write it after everything else in it. With
    `hash_files`, the sha256 of every file in it is recorded and checked by `marker_problem`."""
    folder = Path(folder)
    hashes = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)} if hash_files else {}
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
    marker = {**facts, "kind": kind, "sha256": hashes}
    tmp.write_text(json_text(marker, folder / MARKER, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MARKER)
    return folder / MARKER


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def read_marker(folder: str | Path, kind: str) -> dict | None:
    """The marker of `folder` when it is a `kind` marker these tools wrote (a regular file, of its shape)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file() or Path(folder).is_symlink():
        return None
    found = _read_json(path)
    return found if shape_problem(found, MARKER_SHAPE) is None and found["kind"] == kind else None


def marker_problem(folder: str | Path, kind: str) -> str | None:
    """Why `folder` is not a whole `kind` folder these tools wrote (no marker: never finished, or not
    theirs; a recorded file changed or missing); None when it is."""
    folder = Path(folder)
    record = read_marker(folder, kind)
    if record is None:
        return f"{folder} holds no {MARKER} of a {kind} (it was not finished, or these tools did not make it)"
    for name, expected in record["sha256"].items():
        if problem := sha256_mismatch(confined(folder, name, folder / MARKER), expected):
            return f"{problem} ({folder / MARKER})"
    return None


def write_marked_folder(target: str | Path, write, kind: str, **facts) -> Path:
    """Build a folder with `write(staging)` beside `target`, mark it (every file's sha256), then rename it
    into place: `target` is absent or whole. An existing `target` is replaced only when it is empty, a link (the
    link, never what it points to), or a folder of the same kind these tools marked; anything else is refused,
    before `write` runs."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is not a folder; move it away, or pick another folder")
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()) and read_marker(target, kind) is None:
        raise UserError(
            f"{target} exists and holds no {MARKER} of a {kind} written by these tools (it was not finished, or is "
            "not theirs): nothing was overwritten; delete or move it, or pick another folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        write_marker(staging, kind, hash_files=True, **facts)  # last: the marker says the folder is whole
        with_default_permissions(staging)  # mkdtemp's 0700 and safetensors' 0600: readable as any saved file
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # the swap, with stop signals held (dpo.signals): a Ctrl-C between moving the old folder aside and renaming
    # the new one in would leave neither; one during `write` stops at once, its staging folder removed above
    with saving(str(target), "folder"):
        if target.is_symlink():  # a link is replaced, never what it points to
            target.unlink()
        if target.is_dir():  # empty, or ours (checked above): moved aside, then deleted
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    return target


def remove_marked(root: str | Path, folder: str | Path, kind: str) -> bool:
    """Delete `folder` when it lies inside `root` (not a link) and holds a `kind` marker; False, touching
    nothing, otherwise."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or read_marker(folder, kind) is None:
        return False
    if Path(root).resolve() not in folder.resolve().parents:
        return False
    shutil.rmtree(folder)  # never follows links inside it
    return True


def output_kind(folder: str | Path) -> str | None:
    """The kind of tool output `folder` holds, by its marker files (OUTPUT_KINDS) or its MARKER (a model folder,
    a cache folder these tools made); None for none."""
    folder = Path(folder)
    found = next((kind for kind, names in OUTPUT_KINDS.items() if any((folder / n).is_file() for n in names)), None)
    if found is None and (folder / MARKER).is_file():
        record = _read_json(folder / MARKER)
        found = str(record.get("kind")) if isinstance(record, dict) else "marked"
    return found


def _kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, f"a {kind} folder made by these tools")


def inside_output_problem(path: str | Path, flag: str) -> str | None:
    """Why nothing may be written at `path`: it lies inside a folder holding a tool's output (a finished run, a
    rounds run, a model these tools made); None when it does not."""
    out = Path(path).expanduser().absolute()
    if parent := next((p for p in out.parents if output_kind(p) is not None), None):
        return (
            f"{flag} {path} lies inside {parent}, which holds {_kind_name(output_kind(parent))}: writing there would "
            f"mix outputs in one folder; pick a place outside it"
        )
    return None


def output_kind_problem(output_dir: str | Path, kind: str, flag: str = "--output_dir") -> str | None:
    """Why a tool that writes `kind` must not write into `output_dir`: it holds another kind of output, or it
    lies inside a folder holding any kind (a finished run's or a rounds run's folder); None when it may."""
    out = Path(output_dir).expanduser().absolute()
    found = output_kind(out)
    if found is not None and found != kind:
        return (
            f"{flag} {output_dir} holds {_kind_name(found)}, not {_kind_name(kind)}: writing there would mix two "
            f"runs in one folder; pick another {flag}"
        )
    for parent in out.parents:
        if (found := output_kind(parent)) is not None:
            return (
                f"{flag} {output_dir} lies inside {parent}, which holds {_kind_name(found)}: writing there would mix "
                f"runs in one folder; pick an {flag} outside it"
            )
    return None
