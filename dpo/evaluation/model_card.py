"""A Hugging Face model card (README.md) for a run folder, built offline from what the run wrote.

Front matter (base_model, license, datasets, library_name, tags) in the Hub's metadata keys: base_model
is the Hub id the base came from (never a local path: see `base_hub_id`), license the base's own.
Then: the method and loss, held-out metrics (final_metrics.json), the evaluation
(eval/metrics.json, when `python -m dpo.evaluate` ran), every setting (resolved_config.yaml),
and the command that reproduces the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dpo.evaluation.report import evaluation_of_run

# What `python -m dpo.models` (dpo/offline/pip_models.py, a layer above this one: read as a file) records
# in a folder it built: {"hub_id", "license", ...}.
BUILD_RECORD = "materialized.json"

# A Hub repository id: owner/name, letters, digits, '.', '_' and '-' (huggingface_hub's validate_repo_id).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_hub_id(name) -> bool:
    return isinstance(name, str) and bool(HUB_ID.match(name)) and ".." not in name


def _json_file(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _card_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (README.md), {} when there is none or it is not valid."""
    try:
        text = readme.read_text()
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    try:
        front = yaml.safe_load(text.split("---")[1])
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}


def base_hub_id(base: str) -> str | None:
    """The Hub id the base model came from, for the card's `base_model` (the Hub accepts only ids there):
    `base` itself when it names no local folder and reads as an id; for a folder, the id dpo.models
    recorded when it built it, else its config.json's `_name_or_path` when that is an id; else None."""
    folder = Path(base).expanduser()
    if not folder.exists():
        return base if _is_hub_id(base) else None
    recorded = _json_file(folder / BUILD_RECORD).get("hub_id")
    if _is_hub_id(recorded):
        return recorded
    name = _json_file(folder / "config.json").get("_name_or_path")
    return name if _is_hub_id(name) and not Path(name).expanduser().exists() else None


def base_weights_origin(base: str) -> str | None:
    """A card line for a base folder that dpo.models built from a GGUF file shipped in a pip package: its weights
    are that file's dequantized ones (e.g. Q4_1), not the Hub model the card's `base_model` names."""
    record = _json_file(Path(base).expanduser() / BUILD_RECORD) if Path(base).expanduser().is_dir() else {}
    requirement, _, filename = str(record.get("source", "")).partition(":")
    if not filename.endswith(".gguf"):
        return None
    digest = f", sha256 {record['sha256'][:16]}..." if isinstance(record.get("sha256"), str) else ""
    hub = f"`{record['hub_id']}`'s original weights" if _is_hub_id(record.get("hub_id")) else "the original weights"
    return (
        f"- Base weights: dequantized from the GGUF file `{filename}` (pip package `{requirement}`{digest}), "
        f"not {hub}; the adapter was trained on, and fits, these."
    )


def base_license(base: str) -> str | None:
    """The base model's license: for a local folder, its card's front matter (README.md), its config.json,
    or what dpo.models recorded when it built it; for a Hub id, its card on the Hub when reachable."""
    folder = Path(base).expanduser()
    if folder.exists():
        found = (
            _card_front_matter(folder / "README.md").get("license")
            or _json_file(folder / "config.json").get("license")
            or _json_file(folder / BUILD_RECORD).get("license")
        )
        return str(found) if found else None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(base).data.to_dict().get("license")
    except Exception:  # offline, private, no card: the card says so instead
        return None


def recipe_of(resolved: dict) -> str:
    """Which recipe wrote resolved_config.yaml, from the script fields only that recipe has."""
    if "completion_only_loss" in resolved:
        return "recipes/sft_phi2.py"
    if "samples_per_prompt" in resolved:  # a round of on-policy rounds: its file is the rounds run's --config
        return "recipes/dpo_rounds.py"
    if "task_seed" in resolved:
        return "recipes/dpo_sentiment_tiny.py"
    if "prompt_format" in resolved:
        return "recipes/dpo_any.py"
    return "recipes/dpo_phi2.py"


def method(resolved: dict) -> str:
    if "completion_only_loss" in resolved:
        return "Supervised fine-tuning (TRL SFTTrainer), loss on the answer tokens only"
    losses = " + ".join(resolved.get("loss_type") or ["sigmoid"])
    start = (
        f"starting from the SFT adapter `{resolved['sft_adapter_path']}` (the reference: base + that adapter, frozen)"
        if resolved.get("sft_adapter_path")
        else "reference: the base model (adapters disabled)"
    )
    return f"Direct Preference Optimization (TRL DPOTrainer), loss {losses}, beta {resolved.get('beta')}, {start}"


def model_card(output_dir: str | Path, merged: bool = False) -> str:
    """README.md text for the adapter in `output_dir` (or, `merged`, the model merged from it)."""
    out = Path(output_dir)
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    base = resolved["model_name_or_path"]
    metrics_file = out / "final_metrics.json"
    eval_file, _ = evaluation_of_run(out)  # eval/ of this very run, else left out (export says why: once)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    dataset = resolved.get("dataset_name")
    hub_id = base_hub_id(base)
    named = f"`{hub_id}`" if hub_id else f"a local model (`{base}`)"
    front = {
        **({"base_model": hub_id} if hub_id else {}),
        "license": base_license(base) or "other",
        "library_name": "transformers" if merged else "peft",
        "tags": ["trl", "dpo" if "beta" in resolved and "completion_only_loss" not in resolved else "sft", "qlora"],
    }
    if dataset and not Path(dataset).exists():
        front["datasets"] = [dataset]
    quant = "4-bit NF4 base (QLoRA)" if resolved.get("load_in_4bit") else "base in its own dtype"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {out.resolve().name}",
        "",
        f"{'A merged model' if merged else 'A LoRA adapter'} for {named}, trained with dpo-recipes on `{dataset}`.",
        "",
        *filter(None, [base_weights_origin(base)]),
        f"- Method: {method(resolved)}.",
        f"- Training: LoRA r={resolved.get('lora_r')}, alpha={resolved.get('lora_alpha')} on "
        f"{resolved.get('lora_target_modules')}, {quant}.",
        f"- License: {front['license']} (the base model's; check its card).",
    ]
    if merged:
        lines.append("- The adapter is merged into the base loaded in 16/32-bit, not into 4-bit weights.")
    held = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    if held:
        lines += ["", "## Held-out metrics (end of training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(held.items()) if isinstance(v, int | float)]
    if eval_file is not None:
        from dpo.evaluation.report import summary_lines

        lines += [
            "",
            "## Evaluation (`python -m dpo.evaluate`)",
            "",
            *summary_lines(json.loads(eval_file.read_text())),
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"accelerate launch {recipe_of(resolved)} --config resolved_config.yaml   # the file below",
        "```",
        "",
        "## Every setting (resolved_config.yaml)",
        "",
        "```yaml",
        yaml.safe_dump(resolved, sort_keys=True).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
