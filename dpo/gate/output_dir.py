"""The output folder a run will write, checked on the file system before any weights load: that it is a folder (or
can be made) and writable, and that it is not, nor lies inside, the model or SFT adapter folder the run reads
(the run's README.md, tokenizer files and adapter would overwrite the user's). Part of the settings gate: the
recipes call it (dpo/train/config.py), and the trainer builder again for notebooks and scripts
(dpo/train/trainer.py). The table's path rule (dpo/gate/check.py path_problems) has already refused an empty path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dpo.errors import UserError
from dpo.files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter file; a folder holding it (and no config.json) is an adapter
# the entries read from it (dpo/train/adapters.py), when present; PEFT may write a null base
ADAPTER_SHAPE = {"base_model_name_or_path": ((str, type(None)), None), "peft_type": (str, None)}


def read_adapter_config_file(path: str | Path) -> dict:
    """The adapter_config.json at `path`, checked: the one reader of that file (the output_dir check here and
    dpo/train/adapters.py), so a broken one is the same one-line error naming it, whoever reads it first."""
    return read_json_object(
        path,
        ADAPTER_SHAPE,
        "it must be the JSON object PEFT saves with the adapter: copy the adapter folder again, or pass another",
        optional=tuple(ADAPTER_SHAPE),
    )


def check_output_dir(output_dir: str | Path) -> None:
    """output_dir must be a folder, or creatable, and writable: checked by creating (and removing) a
    temporary folder in it or in its nearest existing parent, so nothing is left behind."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {output_dir} is a file, not a folder; pick another --output_dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output_dir {output_dir}: {parent} is a file, so no folder can be made there")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dpo-write-check-", dir=parent))
    except OSError as err:
        raise UserError(
            f"output_dir {output_dir} is not writable ({parent}: {err.strerror}); pick another --output_dir"
        ) from None


def _folder(name: str | None) -> Path | None:
    path = Path(name).expanduser() if name else None
    return path.resolve() if path is not None and path.is_dir() else None


def check_output_dir_apart(output_dir: str | Path, model_name_or_path: str | None, sft_adapter: str | None) -> None:
    """output_dir must not be, nor lie inside, a local model folder or SFT adapter folder: the run's
    README.md, tokenizer files and adapter would overwrite the user's. An adapter folder given as the
    model (dpo/train/adapters.py) protects the local base it names as well."""
    out = Path(output_dir).expanduser().resolve()
    protected = [("model", model_name_or_path), ("SFT adapter", sft_adapter)]
    model = _folder(model_name_or_path)
    if model is not None and (model / ADAPTER_CONFIG).is_file() and not (model / "config.json").is_file():
        protected.append(
            ("base model", read_adapter_config_file(model / ADAPTER_CONFIG).get("base_model_name_or_path"))
        )
    for what, name in protected:
        folder = _folder(name)
        if folder is not None and (out == folder or folder in out.parents):
            where = "is the" if out == folder else "lies inside the"
            raise UserError(
                f"--output_dir {output_dir} {where} {what} folder {name}: the run would overwrite its files "
                "(README.md, tokenizer files, adapter); pick an --output_dir outside it"
            )
