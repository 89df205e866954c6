"""The content identity of a base model, recorded by every run and checked by everything that uses the run.

A path or a hub id with a revision name says where a model was, not what it was: a folder rewritten in place,
or a hub repo whose `main` moved, is another model under the same name. So a run records

    local folder   "sha256:<hex>;config:<hex>"   over the folder's *.safetensors (each file's name and sha256),
                                                 then config.json's sha256 (the same weights under another
                                                 architecture, rope or vocabulary setting are another model)
    hub id         "commit:<hex>"                the commit huggingface_hub resolves the revision to (its snapshot)

under BASE_KEY in its settings (dpo/train/safety/runs.py run_settings: checkpoint markers, run_complete.json,
each round's records). A resume, the rounds, evaluate and export compare it with what the name holds now,
before any weights load (hashing files is not loading them): a local folder that changed is refused, naming
the artifact, both identities and the fix; a hub model is loaded at the recorded commit by evaluate and export
(a later `main` is said), and refused where a run would continue training on it. A record written before
the identity was recorded gets a warning, not a refusal: it cannot be checked, and says so. So does one written
before config.json was part of it ("sha256:<hex>" alone): its weights are checked, its config.json cannot be.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from dpo.errors import UserError
from dpo.files import file_sha256
from dpo.log import log

BASE_KEY = "base_model_identity"
CONFIG_PART = ";config:"  # a local folder's identity: weights part, then this and config.json's sha256


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """file_sha256 memoised on what changes when the file is rewritten (size, mtime, inode): a base model is
    hashed once per process however many rounds and checks ask, and again as soon as it changes."""
    return file_sha256(Path(path))


def weights_identity(folder: str | Path) -> str | None:
    """'sha256:<hex>' over a local model folder's *.safetensors (names and contents); None when it has none."""
    files = sorted(p for p in Path(folder).expanduser().glob("*.safetensors") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(
            f"{path.name}\0{_file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)}\n".encode()
        )
    return "sha256:" + digest.hexdigest()


def folder_identity(folder: str | Path) -> str | None:
    """A local model folder's identity: weights_identity, then config.json's sha256 when it has one."""
    weights = weights_identity(folder)
    config = Path(folder).expanduser() / "config.json"
    if weights is None or not config.is_file():
        return weights
    stat = config.stat()
    return weights + CONFIG_PART + _file_sha256(str(config.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def weights_only(identity: str | None) -> bool:
    """A local identity recorded before config.json was part of it."""
    return bool(identity) and identity.startswith("sha256:") and CONFIG_PART not in identity


def same_base(recorded: str | None, current: str | None, artifact: str | Path = "", name: str = "") -> bool:
    """`current` is the model `recorded` names: the same identity, or the same weights where `recorded` holds
    only those (an older record; said in a warning when `artifact` is given: its config.json cannot be checked)."""
    if recorded == current:
        return True
    if weights_only(recorded) and current and current.startswith(recorded + CONFIG_PART):
        if artifact:
            log(
                f"warning: {artifact} records only the weights of its base model {name} (written before config.json "
                "was recorded): the weights are the same, a changed config.json cannot be noticed"
            )
        return True
    return False


def hub_identity(name: str, revision: str | None) -> str | None:
    """'commit:<hex>' that `revision` of the hub model `name` resolves to now (asked of the Hub, or of the local
    cache when offline), as from_pretrained resolves it; None when it cannot be resolved (the load then fails
    with its own message)."""
    from huggingface_hub import hf_hub_download

    from dpo.hub import offline_if_unreachable

    offline_if_unreachable()
    try:
        path = Path(hf_hub_download(name, "config.json", revision=revision or "main"))
    except Exception:  # not there, private, offline without a cached copy: not ours to report here
        return None
    return "commit:" + path.parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json


def base_identity(name: str | None, revision: str | None = "main") -> str | None:
    """The content identity of the model `name` (a local folder or a hub id) as it is now; None if unknown."""
    from dpo.hub import local_reason

    if not name:
        return None
    if Path(name).expanduser().is_dir():
        return folder_identity(name)
    if local_reason(name) is not None:
        return None  # a path that is not there: the callers' own checks name it
    return hub_identity(name, revision)


def describe(identity: str | None) -> str:
    if not identity:
        return "no recorded identity"
    kind, _, value = identity.partition(":")
    if kind == "commit":
        return f"hub commit {value[:12]}"
    weights, _, config = identity.partition(CONFIG_PART)
    described = f"weights sha256 {weights.partition(':')[2][:12]}..."
    return described + (f" and config.json sha256 {config[:12]}..." if config else "")


def recorded_commit(identity: str | None) -> str | None:
    """The hub commit an identity names, else None."""
    return identity.partition(":")[2] if identity and identity.startswith("commit:") else None


def what_changed(recorded: str | None, current: str | None) -> str:
    """Why the identity `current` is not the `recorded` one, in words."""
    if not recorded or not current:
        return "one of the two is not known"
    if recorded_commit(recorded):
        return "the hub's revision now resolves to another commit"
    if recorded.partition(CONFIG_PART)[0] == current.partition(CONFIG_PART)[0]:
        return "its config.json was changed since"
    return "the folder's weights were replaced or changed since"


def changed_base(artifact: str | Path, name: str, recorded: str | None, current: str | None, fix: str) -> UserError:
    why = what_changed(recorded, current)
    return UserError(
        f"{artifact} was derived from the base model {name} with {describe(recorded)}, but {name} now has "
        f"{describe(current)} ({why}): using it would mix two models. {fix}"
    )


def unrecorded(artifact: str | Path, name: str, what: str) -> None:
    log(
        f"warning: {artifact} records no identity of its base model {name} (written before it was recorded), so "
        f"{what} cannot check that {name} still holds the weights it was trained on"
    )


def check_base(artifact: str | Path, run: dict, name: str, revision: str | None, what: str, fix: str) -> str | None:
    """For a consumer of a finished run (`run`: its recorded settings) that loads its base `name`: refuse a local
    base whose weights are not the recorded ones; for a hub base return the recorded commit to load (saying so
    when `revision` now resolves elsewhere). Returns the revision to load: the given one, or that commit."""
    recorded = run.get(BASE_KEY)
    if BASE_KEY not in run:
        unrecorded(artifact, name, what)
        return revision
    if recorded is None:
        return revision
    current = base_identity(name, revision)
    if same_base(recorded, current, artifact, name):
        return revision
    if commit := recorded_commit(recorded):
        now = f"now resolves to {describe(current)}" if current else "cannot be resolved now"
        log(f"{name}@{revision} {now}; {what} loads the commit the run was trained on, {commit[:12]}")
        return commit
    raise changed_base(artifact, name, recorded, current, fix)


def check_adapter_base(adapter: str, base: str, revision: str | None) -> None:
    """An adapter that is a finished run folder of these recipes (its run_complete.json), used as the starting
    point of another run on `base`: refused when `base` is not the model the adapter was trained on (compared
    when both identities are of one kind: a local copy of a hub model has no commit to compare)."""
    from dpo.files import read_json_object

    marker = Path(adapter).expanduser() / "run_complete.json"
    if not marker.is_file():
        return  # not one of these recipes' runs: it records nothing to compare
    run = read_json_object(marker, {"run": (dict, None)}, f"it is the record of the run that wrote {adapter}")["run"]
    if BASE_KEY not in run:
        unrecorded(marker, base, "this run")
        return
    recorded, current = run[BASE_KEY], base_identity(base, revision)
    same_kind = recorded and current and recorded.partition(":")[0] == current.partition(":")[0]
    if same_kind and not same_base(recorded, current, marker, base):
        fix = (
            f"Pass the base it was trained on ({run.get('model_name_or_path')}; a hub model: its recorded commit as "
            "--model_revision), or train the adapter again on this base"
        )
        raise changed_base(marker, base, recorded, current, fix)


def predating_base(old: dict, new: dict) -> dict:
    """A record from before the base's identity was recorded, or before its config.json was (the same weights),
    compared on the rest (its name still is)."""
    if BASE_KEY in old and not (old[BASE_KEY] != new.get(BASE_KEY) and same_base(old[BASE_KEY], new.get(BASE_KEY))):
        return old
    return {**old, BASE_KEY: new.get(BASE_KEY)}


def check_same_base(artifact: str | Path, old: dict, new: dict, name: str, fix: str) -> dict:
    """Continuing training on `artifact` (recorded settings `old`) with settings `new`: a different base identity
    is refused (never resumable: the weights under the adapter changed). Returns `old` with BASE_KEY set to the
    new value when `old` predates it (said in a warning), so that the settings comparison passes over it."""
    if BASE_KEY not in old:
        unrecorded(artifact, name, "continuing it")
        return predating_base(old, new)
    if not same_base(old[BASE_KEY], new.get(BASE_KEY), artifact, name):
        raise changed_base(artifact, name, old[BASE_KEY], new.get(BASE_KEY), fix)
    return predating_base(old, new)
