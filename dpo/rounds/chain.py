"""What each round started from, recorded and checked, so that no round is kept on top of a start that changed.

Round N samples with, and trains from, round N-1's adapter (round 1: the starting model). Before it does
anything, round-N/round_start.json records the content identity of that start: the adapter's sha256 (None for a
fresh LoRA adapter) and the base model's identity (dpo/train/safety/identity.py). A rerun compares every round
folder's record with what its start holds now, before the round is read back or continued:

  - round N-1 was run again (its folder deleted, as an error tells a user to do, and rebuilt) and holds another
    adapter: round N derives from weights that no longer exist, so it is run again; its folder is moved aside
    to round-N.stale-K (nothing is deleted), said in the log. Round N+1 then meets the new round N the same way,
    so every round downstream of the change is run again; a round whose start came out bitwise the same is kept.
  - the base model or the SFT adapter the run started from changed (not the rounds' own doing): refused in one
    line naming the record, both identities and the fix, before any weights load.

A round folder from before round_start.json existed is checked against its DPO run's own record (the adapter it
trained from, and the base), or, without either, used with a warning that it cannot be checked.
"""

from __future__ import annotations

from pathlib import Path

from dpo.errors import UserError
from dpo.files import file_sha256, read_json_object
from dpo.log import log
from dpo.train.adapters import adapter_weights
from dpo.train.safety.checkpoints import write_json_atomic
from dpo.train.safety.identity import BASE_KEY, base_identity, changed_base, same_base
from dpo.train.safety.runs import finished_run

START_RECORD = "round_start.json"
START_SHAPE = {"adapter": ((str, type(None)), None), "adapter_sha256": ((str, type(None)), None)}
ROUND_FILES = ("round.json", "samples.jsonl", "pairs.jsonl", "run_complete.json")  # what a round writes


def start_of(ctx, n: int) -> dict:
    """What round n starts from now: the adapter (round n-1's, the SFT adapter, or none), its sha256, the base."""
    adapter = ctx.adapter_before(n)
    model_args = ctx.model_args
    return {
        "adapter": adapter,
        "adapter_sha256": file_sha256(adapter_weights(adapter)) if adapter else None,
        BASE_KEY: base_identity(model_args.model_name_or_path, model_args.model_revision),
    }


def write_start(ctx, n: int, folder: Path) -> dict:
    """round-n/round_start.json, written when the round begins (kept when it is there: it is checked first)."""
    path = folder / START_RECORD
    start = start_of(ctx, n)
    if not path.is_file():
        write_json_atomic(path, start)
    return start


def recorded_start(folder: Path) -> tuple[Path, dict] | None:
    """(where, what) round `folder` recorded as its start: round_start.json, else its finished DPO run's settings
    (a round from before round_start.json: the adapter it trained from and, when recorded, the base); None."""
    path = folder / START_RECORD
    if path.exists():
        fix = f"delete {folder} to run that round (and the later ones) again"
        return path, read_json_object(path, START_SHAPE, fix, optional=(BASE_KEY,))
    finished = finished_run(folder)
    if finished is None:
        return None
    run = finished["run"]
    start = {"adapter_sha256": run.get("sft_adapter_sha256")}
    if BASE_KEY in run:
        start[BASE_KEY] = run[BASE_KEY]
    return folder / "run_complete.json", start


def stale_round(ctx, n: int) -> str | None:
    """Why round n's folder holds work derived from a start that changed since (round n-1 was run again), or
    None when it holds nothing, or what it holds started from what round n starts from now. A changed base
    model or SFT adapter is refused (UserError)."""
    folder = ctx.output_dir / f"round-{n}"
    found = recorded_start(folder) if folder.is_dir() else None
    if found is None:
        if folder.is_dir() and any((folder / name).exists() for name in ROUND_FILES):
            log(f"warning: {folder} records nothing of what round {n} started from (a folder from an older version)")
        return None
    where, recorded = found
    now = start_of(ctx, n)
    name = ctx.model_args.model_name_or_path
    # silent for a record of the weights alone: rounds_settings.json's check says that once (recipes/dpo_rounds.py),
    # not once per round folder at every rerun
    if BASE_KEY in recorded and not same_base(recorded[BASE_KEY], now[BASE_KEY]):
        fix = f"Put the model the rounds started from back at {name}, or use another --output_dir"
        raise changed_base(where, name, recorded[BASE_KEY], now[BASE_KEY], fix)
    was, sha = recorded["adapter_sha256"], now["adapter_sha256"]
    if was == sha:
        return None
    if n == 1:
        raise UserError(
            f"{where}: round 1 started from the SFT adapter with sha256 {(was or 'none')[:12]}..., but "
            f"{ctx.sft_adapter} now has sha256 {(sha or 'none')[:12]}... (replaced or changed since): the rounds "
            "would continue on another starting model. Put the original adapter back, or use another --output_dir"
        )
    return (
        f"it started from round {n - 1}'s adapter with sha256 {(was or 'none')[:12]}..., and round {n - 1} now "
        f"holds {(sha or 'none')[:12]}... (round {n - 1} was run again)"
    )


def set_aside(output_dir: Path, n: int) -> Path:
    """Move round-n/ (a folder this recipe wrote: it holds its records) to round-n.stale-K, the first K free."""
    folder = output_dir / f"round-{n}"
    k = 1
    while (output_dir / f"round-{n}.stale-{k}").exists():
        k += 1
    target = output_dir / f"round-{n}.stale-{k}"
    folder.rename(target)
    return target


def check_round_start(ctx, n: int) -> None:
    """Before round n is read back or continued: a folder derived from an old start is moved aside, saying so."""
    why = stale_round(ctx, n)
    if why is None:
        return
    moved = set_aside(ctx.output_dir, n)
    log(
        f"round {n}: {why}, so its samples and training derive from weights that are gone: round {n} is run again "
        f"(and every later round whose start changes with it); its old files were moved to {moved}"
    )
