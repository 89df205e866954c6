"""Credentials in the settings: a token belongs in the HF_TOKEN environment variable, never in the YAML, a flag or
a checkpoint (every checkpoint's training_args.bin is a pickle of the settings). Part of the settings gate: the
recipes call it beside check_settings (dpo/train/config.py), and the trainer builder again for notebooks and
scripts that skip the recipes' parsing (dpo/train/trainer.py). It looks at every value, at any depth, rather than
a table's names: a token can hide under any key (model_init_kwargs.token)."""

from __future__ import annotations

import dataclasses
import re

from dpo.errors import UserError

# A Hugging Face access token: "hf_" + 30 or more letters and digits (user tokens have 34).
HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# Keys whose (text) value is a credential, whatever it looks like.
SECRET_KEY_NAMES = {"token", "hub_token", "hf_token", "use_auth_token", "api_key", "access_token", "password"}


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
