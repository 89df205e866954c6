"""Settings checks that run right after parsing, before any weights load.

Bounds of single settings and relations between them are declared in the settings table
(dpo/gate/table.py; check_settings applies it). What stays here: credentials and output folders.
The classes the table and these checks catch (the table says why for each of its settings):

    beta <= 0                      reverses (or zeroes) the preference; DPO's rewards are beta * log-ratio
    label_smoothing out of range   >= 0.5 flips the labels (robust, aot); exo_pair takes log(eps), so > 0;
                                   set with a loss that ignores it (sigmoid: TRL drops it silently)
    unknown loss_type, loss_weights of another length, f-divergence with a loss that has none
    learning_rate <= 0             0 trains nothing; < 0 climbs the loss
    batch sizes, accumulation, lora_r < 1; lora_dropout outside [0, 1)
    lora_alpha <= 0                the LoRA update is scaled by lora_alpha / lora_r: 0 trains nothing
    max_length < 1                 every row would be dropped as too long (null: no limit)
    max_steps 0                    transformers reads 0 as "unset" and trains num_train_epochs instead
    a token anywhere in the config (hub_token, model_init_kwargs.token, any "hf_..." value): it would be
                                   pickled into every checkpoint's training_args.bin
    output_dir that is a file, under a file, or not writable; output_dir that is, or lies inside, the
                                   model folder or the SFT adapter folder (its README.md, tokenizer files
                                   and adapter would be overwritten)

Each raises dpo.errors.UserError (one line, exit status 2 in a recipe). The loss rules are
dpo.scratch.loss_settings.loss_settings_error, shared with the from-scratch loss, restricted to TRL's loss types.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

from dpo.errors import UserError

# A Hugging Face access token: "hf_" + 30 or more letters and digits (user tokens have 34).
HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# Keys whose (text) value is a credential, whatever it looks like.
SECRET_KEY_NAMES = {"token", "hub_token", "hf_token", "use_auth_token", "api_key", "access_token", "password"}


def check_settings(*arg_objects) -> None:
    """Raise UserError naming every setting that breaks a rule of the settings gate (dpo/gate/)."""
    from dpo.gate.check import check_settings as gate

    gate(*arg_objects)


def find_secrets(*arg_objects) -> list[str]:
    """Dotted names of every field holding a credential: a secret key name with a text value, or
    any text that looks like a Hugging Face token, at any depth (dicts, lists). Never the values."""
    found: list[str] = []

    def walk(value, where: str, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k), str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", key)
        elif isinstance(value, str) and value:
            if key.lower() in SECRET_KEY_NAMES or HF_TOKEN_PATTERN.search(value):
                found.append(where)

    for obj in arg_objects:
        fields = obj if isinstance(obj, dict) else {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        walk(fields, "", "")
    return found


def check_no_secrets(*arg_objects) -> None:
    """Tokens belong in the HF_TOKEN environment variable, never in YAML, flags or checkpoints."""
    if found := find_secrets(*arg_objects):
        raise UserError(
            f"a token was given in the config or on the command line ({', '.join(found)}); it would be saved "
            "in resolved_config.yaml and every checkpoint's training_args.bin. Remove it and "
            "`export HF_TOKEN=...` instead."
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
    from dpo.train.adapters import ADAPTER_CONFIG

    out = Path(output_dir).expanduser().resolve()
    protected = [("model", model_name_or_path), ("SFT adapter", sft_adapter)]
    model = _folder(model_name_or_path)
    if model is not None and (model / ADAPTER_CONFIG).is_file() and not (model / "config.json").is_file():
        try:
            base = json.loads((model / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None  # dpo.train.adapters reports an unreadable adapter_config.json
        protected.append(("base model", base))
    for what, name in protected:
        folder = _folder(name)
        if folder is not None and (out == folder or folder in out.parents):
            where = "is the" if out == folder else "lies inside the"
            raise UserError(
                f"--output_dir {output_dir} {where} {what} folder {name}: the run would overwrite its files "
                "(README.md, tokenizer files, adapter); pick an --output_dir outside it"
            )
