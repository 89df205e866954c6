"""What benchmarks/results/frontier.csv was measured from, recorded beside it and checked by its consumers.

The offline reward-KL frontier (benchmarks/frontier_sentiment.py) is measured from one pi_ref on one set of
held-out prompts. benchmarks/rounds_sentiment.py and rounds_sweep.py place on-policy rounds on it: a frontier of
another pi_ref (other SFT settings, task or seed) or of other held-out prompts is another curve, and a round
above or below it would mean nothing. So frontier_sentiment.py writes frontier_made_from.json beside the CSV:

  frontier_csv_sha256       the CSV it describes (a CSV written or edited after it no longer matches)
  pi_ref_settings_sha256    pi_ref's identity: the settings its marker records (task, its tones, SFT settings,
                            seed, precision: dpo/offline/sentiment.py reference_settings), which also decide the
                            held-out prompts (task.prompts("heldout", eval_prompts, seed + 2))
  eval_prompts, max_new_tokens   how many held-out prompts were scored, and the longest answer

A consumer reads it before its runs (read_record: the CSV must be the one recorded; a CSV from before the record
is used with a warning that it cannot be checked) and compares its own pi_ref and settings with it before it
writes anything (check_same_start). pi_ref's settings identify it, not its weights' hash: the same settings give
other float32 weights on another CPU, and the comparison is statistical (95% intervals) anyway.
"""

from __future__ import annotations

from pathlib import Path

from dpo.errors import UserError
from dpo.files import file_sha256, json_text, read_json_object, write_text_atomic
from dpo.folders import MODEL_KIND, read_marker
from dpo.log import log

RECORD = "frontier_made_from.json"
SHAPE = {
    "frontier_csv_sha256": (str, None),
    "pi_ref_settings_sha256": (str, None),
    "eval_prompts": (int, None),
    "max_new_tokens": (int, None),
}
RERUN = "rerun python benchmarks/frontier_sentiment.py to measure the frontier again"


def pi_ref_identity(folder: Path) -> str:
    """The settings sha256 that the marker of the pi_ref in `folder` records (dpo/offline/sentiment.py)."""
    record = read_marker(Path(folder), MODEL_KIND) or {}
    if not isinstance(record.get("settings_sha256"), str):
        raise UserError(f"{folder} is not a pi_ref with recorded settings (its marker): it cannot be compared")
    return record["settings_sha256"]


def write_record(csv_path: Path, pi_ref: Path, eval_prompts: int, max_new_tokens: int) -> dict:
    """frontier_made_from.json beside `csv_path`, written whole after the CSV."""
    record = {
        "frontier_csv_sha256": file_sha256(csv_path),
        "pi_ref_settings_sha256": pi_ref_identity(pi_ref),
        "eval_prompts": eval_prompts,
        "max_new_tokens": max_new_tokens,
    }
    path = csv_path.parent / RECORD
    write_text_atomic(path, json_text(record, path, indent=1) + "\n")
    return record


def read_record(csv_path: Path) -> dict | None:
    """The record of `csv_path`, checked against it; None (with a warning) for a CSV from before records."""
    path = csv_path.parent / RECORD
    if not path.exists():
        log(
            f"warning: {csv_path} has no {RECORD} (measured before it was recorded): the rounds are compared with it "
            "on the assumption that it came from the same pi_ref and held-out prompts, which cannot be checked"
        )
        return None
    record = read_json_object(path, SHAPE, RERUN)
    if record["frontier_csv_sha256"] != file_sha256(csv_path):
        raise UserError(f"{csv_path} is not the frontier {path} records (written or edited since): {RERUN}")
    return record


def check_same_start(record: dict | None, csv_path: Path, pi_ref: Path, eval_prompts: int, max_new_tokens: int):
    """Refuse (before anything is written) rounds whose pi_ref or held-out scoring is not the frontier's."""
    if record is None:
        return
    now = {"pi_ref_settings_sha256": pi_ref_identity(pi_ref), "eval_prompts": eval_prompts}
    now["max_new_tokens"] = max_new_tokens
    differ = [f"{k}: {record[k]} (frontier) vs {v} (rounds)" for k, v in now.items() if record[k] != v]
    if differ:
        raise UserError(
            f"the rounds in {pi_ref.parent} did not start where {csv_path} was measured ({'; '.join(differ)}): placing "
            f"them on it would compare two curves; nothing was written. Run the rounds with the frontier's settings, "
            f"or {RERUN} with theirs"
        )
