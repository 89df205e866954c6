"""A rerun of the rounds recipe in a folder that holds an earlier attempt: what is kept, what starts over.

* Same settings: the run continues (dpo/rounds/loop.py).
* Other settings, and no round finished and no DPO run started (a round stopped by an error about its
  pairs, its rewards or its training plan, whose advice was to change a setting): round 1 starts over with
  the new settings. Its samples are kept when only settings applied after sampling changed, else deleted
  with its pairs, and the sentiment task's starting model is trained again when its own settings changed.
* Other settings otherwise: refused (recipes/dpo_rounds.py), the refusal naming --overwrite_output_dir.
* --overwrite_output_dir true: everything the rounds recipe wrote in the folder is deleted (remove_rounds),
  nothing else, and the run starts over.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpo.files import remove_entry
from dpo.log import log
from dpo.train.safety.checkpoints import checkpoints_in
from dpo.train.safety.lock import LOCK_NAME
from dpo.train.safety.runs import RUN_MARKER, STAGING, finished_run, remove_run

ROUND = re.compile(r"round-\d+")
# Rounds settings applied after round 1's answers were sampled and scored: changing them keeps the samples.
AFTER_SAMPLING = ("pairing", "min_margin", "min_pairs", "keep_pairs", "test_size", "reference", "rounds")
# Training settings that shape round 1's samples: the starting model as loaded and the sampling seed. The
# others (optimizer, loss, LoRA, lengths) apply from the DPO run on.
SAMPLING_TRAINING = (
    "model_name_or_path",
    "model_revision",
    "dtype",
    "trust_remote_code",
    "attn_implementation",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "bnb_4bit_quant_storage",
    "seed",
    "bf16",
    "fp16",
    "use_cpu",
)
# What the sentiment task's starting model (output_dir/sft_reference, dpo/rounds/sentiment.py) is trained from.
SENTIMENT_MODEL = ("task_seed", "heldout_topics", "sft_examples", "sft_steps", "sft_batch_size", "sft_learning_rate")
SENTIMENT_REFERENCE = "sft_reference"
# README.md: the model card TRL's trainer writes into its output_dir at every checkpoint save
ROUND_FILES = (
    "samples.jsonl",
    "pairs.jsonl",
    "samples.jsonl.tmp",
    "pairs.jsonl.tmp",
    "round.json",
    "round_start.json",  # what the round derives from (dpo/rounds/chain.py)
    "README.md",
    LOCK_NAME,
)
SUMMARY_FILES = ("rounds.json", "rounds.md", "rounds.png", "rounds_settings.json")


def changed(recorded: dict, header: dict) -> tuple[set[str], set[str]]:
    """(rounds settings, training settings) whose values differ between the record and this run."""

    def keys(old: dict, new: dict) -> set[str]:
        return {k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")}

    return keys(recorded["settings"], header["settings"]), keys(recorded.get("training", {}), header["training"])


def round_folders(output_dir: Path) -> list[Path]:
    return sorted(p for p in Path(output_dir).iterdir() if p.is_dir() and ROUND.fullmatch(p.name))


def rounds_written(output_dir: Path) -> list[Path]:
    """Round folders holding anything the rounds recipe writes there (a folder of other files is not a round)."""
    return [
        f
        for f in round_folders(output_dir)
        if any((f / n).exists() for n in (*ROUND_FILES, RUN_MARKER, STAGING)) or checkpoints_in(f)
    ]


def started_dpo_runs(output_dir: Path) -> list[Path]:
    """Round folders whose DPO run has begun to save (a checkpoint, staged or final files): work a restart
    would throw away, so it is deleted only when asked (--overwrite_output_dir)."""
    return [
        f
        for f in round_folders(output_dir)
        if checkpoints_in(f) or (f / RUN_MARKER).exists() or (f / STAGING).exists()
    ]


def start_unfinished_over(output_dir: Path, recorded: dict, header: dict, sentiment_model: bool) -> list[str]:
    """No round finished and no DPO run started, and the settings changed: delete what the new settings would
    not produce (round 1's pairs always; its samples unless only AFTER_SAMPLING/optimizer settings changed; the
    sentiment starting model when `sentiment_model` (the run trains it) and its settings changed). Returns the
    changed settings, for the log."""
    rounds_keys, training_keys = changed(recorded, header)
    resample = bool(rounds_keys - set(AFTER_SAMPLING)) or bool(training_keys & set(SAMPLING_TRAINING))
    names = [n for n in ROUND_FILES if resample or not n.startswith("samples.")]
    for folder in round_folders(output_dir):
        for name in names:
            remove_entry(folder, name, output_dir / "rounds_settings.json")
    retrain = sentiment_model and bool(rounds_keys & {*SENTIMENT_MODEL, "seed"} or training_keys & {"seed"})
    if retrain:
        remove_entry(output_dir, SENTIMENT_REFERENCE, output_dir / "rounds_settings.json")
    what = "its samples kept (only settings applied after sampling changed)" if not resample else "sampled again"
    log(
        f"{output_dir}: no round finished there and the settings changed ({', '.join(sorted(rounds_keys | training_keys))}): "
        f"round 1 starts over, {what}{'; the starting model is trained again' if retrain else ''}"
    )
    return sorted(rounds_keys | training_keys)


def remove_rounds(output_dir: Path, keep: str | None) -> list[str]:
    """--overwrite_output_dir: delete every file the rounds recipe writes in output_dir (the summary, the settings
    record, each round's samples, pairs, round.json and DPO run, the sentiment starting model unless it is `keep`,
    the model this run starts from); other entries stay. Returns the names of what was deleted."""
    output_dir = Path(output_dir)
    source, removed = output_dir / "rounds_settings.json", []
    for folder in round_folders(output_dir):
        remove_run(folder, finished_run(folder))  # its marker, final files, staging and checkpoints
        for name in ROUND_FILES:
            remove_entry(folder, name, source)
        if left := sorted(p.name for p in folder.iterdir()):  # entries the recipe did not write stay
            log(f"--overwrite_output_dir: kept {folder}: it holds {', '.join(left)}, not written by the rounds recipe")
        else:
            folder.rmdir()
        removed.append(folder.name)
    reference = output_dir / SENTIMENT_REFERENCE
    names = [*SUMMARY_FILES]
    if keep is None or Path(keep).resolve() != reference.resolve():
        names.append(SENTIMENT_REFERENCE)
    for name in names:
        if (output_dir / name).exists() or (output_dir / name).is_symlink():
            remove_entry(output_dir, name, source)
            removed.append(name)
    return removed
