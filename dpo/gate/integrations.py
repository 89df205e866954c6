"""Settings that name something outside the config, checked at the gate before any weights load:

    report_to           each backend must be installed (else transformers raises after the model loaded)
    push_to_hub         needs a token (HF_TOKEN or `hf auth login`) and a hub that is not switched off
    pad_token, eos_token  must be tokens of the tokenizer's vocabulary (else TRL fails when it pads or ends)
    max_length          above the model's position limit (or null, no limit, where the model has one), the
                        positions past it index out of range
    assistant_only_loss needs a chat template that marks the assistant's turns ({% generation %})

check_integrations(training_args) runs with the other settings (no model needed);
check_model_integrations(training_args, config, tokenizer) once the config and tokenizer are read.
"""

from __future__ import annotations

import importlib.util
import os

from dpo.errors import UserError

# report_to name -> the module its transformers callback imports
REPORTING_MODULES = {
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "azure_ml": "azureml.core",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "flyte": "flytekit",
    "neptune": "neptune",
    "codecarbon": "codecarbon",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
OFF = ("1", "true", "yes", "on")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def integration_problems(training_args) -> list[str]:
    problems = []
    report_to = getattr(training_args, "report_to", None) or []
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name in ("none", "all"):
            continue
        module = REPORTING_MODULES.get(name)
        if module is not None and not _installed(module):
            problems.append(
                f"report_to {name}: the {name} package is not installed (pip install {module.split('.')[0]})"
            )
    if getattr(training_args, "push_to_hub", False):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFF:
            problems.append("push_to_hub needs the Hub, and HF_HUB_OFFLINE is set: unset it or set push_to_hub false")
        else:
            from huggingface_hub import get_token

            if not get_token():
                problems.append("push_to_hub needs a token: `export HF_TOKEN=...` (or `hf auth login`) first")
    return problems


def check_integrations(training_args) -> None:
    if found := integration_problems(training_args):
        raise UserError("invalid setting(s): " + "; ".join(found))


def position_limit(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_integration_problems(training_args, config, tokenizer) -> list[str]:
    problems = []
    vocabulary = tokenizer.get_vocab()
    for name, fallback in (("pad_token", "pad with EOS"), ("eos_token", "keep the tokenizer's own")):
        token = getattr(training_args, name, None)
        if token is not None and token not in vocabulary:
            problems.append(f"{name} {token!r} is not a token of the tokenizer's vocabulary; unset it to {fallback}")
    limit, max_length = position_limit(config), getattr(training_args, "max_length", "unset")
    if limit is not None and max_length is None:
        problems.append(
            f"max_length is null (no limit), and the model has {limit} positions (config.json): a longer row would "
            f"run past them; set max_length {limit} or less"
        )
    elif limit is not None and isinstance(max_length, int) and max_length > limit:
        problems.append(
            f"max_length {max_length} is above the model's {limit} positions (config.json): set max_length {limit} or less"
        )
    problems += model_init_problems(getattr(training_args, "model_init_kwargs", None), config)
    if getattr(training_args, "assistant_only_loss", False):
        template = tokenizer.chat_template or ""
        named = template.get("default") or "" if isinstance(template, dict) else template  # Hermes-style names
        if "generation" not in named:
            problems.append(
                "assistant_only_loss needs a chat template that marks assistant turns with {% generation %}; "
                "this tokenizer's does not (TRL could not find the tokens to train on): set it false"
            )
    return problems


def model_init_problems(kwargs, config) -> list[str]:
    """model_init_kwargs: each key one from_pretrained takes (read from it, dpo/gate/keywords.py) or an attribute
    of the model's config, which from_pretrained sets; any other key was a TypeError after the weights loaded."""
    from dpo.gate.keywords import from_pretrained_keys

    if not isinstance(kwargs, dict):
        return []
    attributes = set(config.to_dict()) | set(vars(config))
    wrong = sorted(k for k in kwargs if k not in from_pretrained_keys() and k not in attributes)
    return [
        f"model_init_kwargs.{key} is neither a key from_pretrained takes nor an attribute of the model's config "
        f"(config.json); from_pretrained's keys: {', '.join(sorted(from_pretrained_keys()))}"
        for key in wrong
    ]


def check_model_integrations(training_args, config, tokenizer) -> None:
    if found := model_integration_problems(training_args, config, tokenizer):
        raise UserError("invalid setting(s): " + "; ".join(found))
