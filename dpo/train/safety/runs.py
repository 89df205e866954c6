"""One run per output_dir: settings fingerprints, refusing to mix runs, final files that are
complete or visibly not, and whole-run metrics after a resume.

A run's settings are every field of DPOConfig and ModelConfig that can change what is trained
(IGNORED lists the ones that cannot: where and how often to log, save or evaluate) plus a
sha256 of the training pairs. Each checkpoint's marker and the finished output_dir's
`run_complete.json` record them; a resume or a reuse with different ones is refused, listing
the differences, unless --resume_with_different_settings / --overwrite_output_dir.

The final files (adapter, tokenizer, resolved_config.yaml, final_metrics.json, trainer_state.json,
training_curves.png) are written to output_dir/.final-staging/, then the old run_complete.json
and the old final files are removed, the new ones moved in, and run_complete.json written last.
A kill at any point leaves either a finished run or a folder without run_complete.json: never a
new adapter beside an old run's metrics or config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from dpo.compat import continue_token_count
from dpo.errors import UserError
from dpo.files import (
    confined,
    disk_full_message,
    disk_full_while_writing,
    file_sha256,
    numbered_folders,
    read_json_object,
    remove_entry,
    sha256_mismatch,
)
from dpo.log import log
from dpo.train.adapters import adapter_weights
from dpo.train.config import HARDWARE_KEYS, to_plain
from dpo.train.safety.checkpoints import (
    MARKER,
    PER_INVOCATION_KEYS,
    checkpoint_problems,
    checkpoint_run,
    checkpoint_step,
    checkpoints_in,
    kill_point,
    newest_complete_checkpoint,
    trainer_save_sizes,
    write_json_atomic,
)
from dpo.train.safety.identity import BASE_KEY, base_identity, check_same_base, predating_base, what_changed

RUN_MARKER = "run_complete.json"
STAGING = ".final-staging"
# run_complete.json: the run's settings, its final files (names inside output_dir) and the sha256 of
# each file among them (folders such as ref/ by their files' relative paths), checked by evaluate,
# export and a reuse of the folder. README.md is left out: export writes the adapter's model card there.
RUN_SHAPE = {"run": (dict, None), "files": (list, str), "global_step": (int, None), "sha256": (dict, str)}
NOT_HASHED = ("README.md",)
# Settings that do not change the trained weights: output, logging, saving, evaluation, hub.
IGNORED = {
    *PER_INVOCATION_KEYS,
    "reference_cache",  # where pi_ref's log-probs come from, not what they are (checked each epoch)
    "reference_cache_dir",
    "output_dir",
    "run_name",
    "report_to",
    "disable_tqdm",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "dataloader_num_workers",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_pin_memory",
    "local_rank",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "push_to_hub",
}
IGNORED_PREFIXES = ("logging_", "save_", "eval_", "hub_", "include_")


def data_sha256(rows) -> str:
    """sha256 of the training pairs (a list of dicts or a datasets.Dataset), row by row."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run_settings(training_args, model_args, train_rows, sft_adapter: str | None = None) -> dict:
    """What a run trains from. Starting from an SFT adapter, its weights count too (sha256 of its
    safetensors, not its path: an adapter replaced in place is another starting point and reference); so
    does the base model's content identity (dpo/train/safety/identity.py), not only its name."""
    settings = {}
    for obj in (training_args, model_args):
        settings.update(to_plain(obj))
    settings = {k: v for k, v in settings.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)}
    settings["training_data_sha256"] = data_sha256(train_rows)
    settings[BASE_KEY] = base_identity(
        getattr(model_args, "model_name_or_path", None), getattr(model_args, "model_revision", "main")
    )
    if sft_adapter:
        settings["sft_adapter_sha256"] = file_sha256(adapter_weights(sft_adapter))
    return settings


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs (or exists on one side only)."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
    # the base's two hashes alone do not say what changed
    why = {BASE_KEY: f" ({what_changed(old[BASE_KEY], new[BASE_KEY])})"} if BASE_KEY in old.keys() & new.keys() else {}
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}{why.get(k, '')}" for k in keys]


def _listing(diffs: list[str]) -> str:
    hardware = [d for d in diffs if d.split(":")[0] in HARDWARE_KEYS]
    note = " (bf16/fp16/dtype follow the hardware: set them to the old values on the new machine)" if hardware else ""
    return "\n  " + "\n  ".join(diffs) + note


def finished_run(output_dir: Path) -> dict | None:
    """The validated run_complete.json of `output_dir`; None when there is none. A damaged one (not JSON,
    an entry missing or of another type, a file name outside the folder), or an entry of that name that is
    no file (a folder), is one UserError naming it."""
    marker = Path(output_dir) / RUN_MARKER
    if marker.exists() and not marker.is_file():  # a folder (or a pipe, a device) under the marker's name
        what = "a folder" if marker.is_dir() else "not a regular file"
        raise UserError(
            f"{marker} is {what}, not a file: the record a finished run writes last is a JSON file, so this entry "
            f"cannot be read, replaced or deleted by a run. Remove it (the run then counts as unfinished: finish it "
            "with --resume_from_checkpoint last), or use another folder"
        )
    if not marker.is_file():
        return None
    fix = (
        f"the folder's record of its finished run is damaged: delete {marker} (the run then counts as unfinished) "
        "or use another folder"
    )
    data = read_json_object(marker, RUN_SHAPE, fix, optional=("global_step", "sha256"))
    for name in [*data["files"], *data.get("sha256", {})]:
        confined(output_dir, name, marker)
    return data


def final_file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex), README.md at its top excepted."""
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in NOT_HASHED
    }


def verify_finished_run(folder: str | Path, command: str) -> dict:
    """For evaluate and export, after require_finished_run: every file run_complete.json hashed is there with
    the bytes the run wrote (an adapter replaced by a checkpoint's, an edited config or held-out file is
    named). Returns the marker."""
    folder = Path(folder)
    marker = finished_run(folder)
    hashes = marker.get("sha256")
    if not hashes:  # a run finished before the hashes were recorded: usable, but said out loud
        log(
            f"warning: {folder / RUN_MARKER} records no sha256 of the run's files (a run from before they were "
            f"recorded), so {command} cannot check that its adapter is the one the run wrote; rerun the training "
            "for a verifiable folder"
        )
        return marker
    for name, expected in sorted(hashes.items()):
        if problem := sha256_mismatch(confined(folder, name, folder / RUN_MARKER), expected):
            raise UserError(
                f"{problem} ({RUN_MARKER}): the run folder changed after the run finished (a file replaced, e.g. "
                f"the adapter by a checkpoint's, edited or deleted), so {command} would use something the run did "
                "not write. Put the run's own file back, or rerun the training"
            )
    return marker


def require_finished_run(folder: str | Path, command: str) -> None:
    """For `command` (dpo.evaluation.evaluate, dpo.evaluation.export), before any weights load: refuse a run folder without
    run_complete.json (killed, still running, or killed while writing its final files), saying why and
    how to finish it, and a checkpoint folder given instead of its run folder. A folder that is no run
    at all (no checkpoints, no adapter) is left to the caller, which names the file it lacks."""
    folder = Path(folder)
    if finished_run(folder) is not None:
        return
    if checkpoint_step(folder) is not None and (folder / MARKER).is_file():
        raise UserError(
            f"{folder} is a checkpoint; {command} takes a finished run folder ({folder.parent}, with "
            f"{RUN_MARKER}): checkpoints hold neither the held-out pairs nor the resolved config"
        )
    rounds = numbered_folders(folder, "round-", RUN_MARKER)
    if rounds:  # recipes/dpo_rounds.py's output: each round's DPO run is a run folder of its own
        raise UserError(
            f"{folder} holds on-policy rounds (recipes/dpo_rounds.py), each a finished run folder of its own: "
            f"{command} takes one of them, e.g. {folder / f'round-{rounds[-1]}'} (the last round's policy)"
        )
    newest = newest_complete_checkpoint(folder, warn=False)
    if newest is None and not checkpoints_in(folder) and not (folder / "adapter_config.json").is_file():
        return
    finish = (
        f"finish it: run the same training command again with --resume_from_checkpoint last (it continues from "
        f"{newest.name})"
        if newest
        else "it has no complete checkpoint to continue from: run the training command again"
    )
    raise UserError(
        f"{folder} has no {RUN_MARKER}: the run did not finish (stopped, killed, or still running), so its "
        f"adapter and metrics may be missing, partial or from an earlier run; {finish}"
    )


def prepare_output_dir(training_args, run: dict, sft_adapter: str | None = None) -> None:
    """Before any weights load: refuse to resume a checkpoint of a different run, or to reuse an
    output_dir holding a different run; with --overwrite_output_dir delete that run's files.
    A checkpoint trained from other SFT adapter weights is never resumed: the reference would change
    under the policy (and a reference cache would no longer match it)."""
    output_dir, resume = Path(training_args.output_dir), training_args.resume_from_checkpoint
    allow = getattr(training_args, "resume_with_different_settings", False)
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if resume:
        base = run.get("model_name_or_path") or "the base model"  # a changed base is never resumed, whatever the flags
        old = check_same_base(resume, checkpoint_run(resume), run, base, RESUME_ON_OTHER_BASE)
        was, now = old.get("sft_adapter_sha256"), run.get("sft_adapter_sha256")
        if was != now:
            started = f"the SFT adapter with sha256 {was[:12]}..." if was else "no recorded SFT adapter"
            given = f"the SFT adapter {sft_adapter} has sha256 {now[:12]}..." if now else "no SFT adapter is given"
            raise UserError(
                f"{resume} was trained from {started}, but {given} (replaced or changed since): resuming would "
                "train against another reference. Put the original adapter back, or start anew in another --output_dir"
            )
        diffs = differences(old, run)
        if diffs and not allow:
            raise UserError(
                f"{resume} was written by a run with different settings; resuming would mix two runs. Differences "
                f"(checkpoint -> now):{_listing(diffs)}\n  pass --resume_with_different_settings true to resume anyway"
            )
        if diffs:
            log(f"warning: resuming {resume} with different settings:{_listing(diffs)}")
    finished = finished_run(output_dir)
    complete = [] if resume else [c for c in checkpoints_in(output_dir) if not checkpoint_problems(c)]
    others = [c for c in complete if predating_base(checkpoint_run(c), run) != run]
    # this run's own checkpoints and no run_complete.json: it was stopped (during its final save, perhaps);
    # starting at step 0 would silently redo it, so say how to finish it
    unfinished = [c for c in complete if c not in others] if finished is None else []
    diffs = differences(predating_base(finished["run"], run), run) if finished else []
    if (diffs and not (resume and allow)) or others or unfinished:
        if unfinished and not others and not overwrite:
            raise UserError(unfinished_run_message(output_dir, unfinished[-1]))
        if not overwrite:
            what = (
                f"a finished run with different settings:{_listing(diffs)}"
                if diffs
                else f"checkpoints of another run ({others[-1].name})"
            )
            raise UserError(
                f"--output_dir {output_dir} holds {what}\n  use another --output_dir, --resume_from_checkpoint last, or "
                "--overwrite_output_dir true to delete that run's files"
            )
        removed = remove_run(output_dir, finished) if PartialState().is_main_process else []
        log(f"--overwrite_output_dir: deleted the previous run's {len(removed)} files and checkpoints in {output_dir}")
    elif finished and not resume:  # the same command again: said, not silently trained over
        log(
            f"{output_dir} holds this same run, finished at step {finished.get('global_step')}: it is trained again "
            "from the start and its files are replaced when this run ends (Ctrl-C now keeps them as they are)"
        )


RESUME_ON_OTHER_BASE = (
    "Put the original model back at that path (a hub model: pass the recorded commit as --model_revision, with "
    "--resume_with_different_settings true), or start anew in another --output_dir"
)


def unfinished_run_message(output_dir: Path, checkpoint: Path) -> str:
    """One line: output_dir holds a complete checkpoint of this very run but no run_complete.json."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, last = state["global_step"], state.get("max_steps")
    except (OSError, ValueError, KeyError):
        step, last = checkpoint.name.rsplit("-", 1)[-1], None
    when = (
        "during its final save (the checkpoint is at its last step: resuming writes the final files only)"
        if last and step >= last
        else f"after step {step}" + (f" of {last}" if last else "") + " was saved"
    )
    return (
        f"--output_dir {output_dir} holds a complete checkpoint of this run ({checkpoint.name}) but no {RUN_MARKER}: "
        f"the run was stopped {when}. Finish it with --resume_from_checkpoint last, or start over with "
        "--overwrite_output_dir true"
    )


def remove_run(output_dir: Path, finished: dict | None) -> list[Path]:
    """Delete a finished run's marker and files, every checkpoint and any staging folder: each only when it
    lies inside output_dir (dpo.files.confined), all checked before the first is deleted."""
    names = [RUN_MARKER, STAGING, *(c.name for c in checkpoints_in(output_dir)), *(finished or {}).get("files", [])]
    for name in names:
        confined(output_dir, name, output_dir / RUN_MARKER)
    return [remove_entry(output_dir, name, output_dir / RUN_MARKER) for name in names]


def write_final_outputs(trainer, run: dict, write_into) -> Path:
    """`write_into(folder)` writes the final files; they reach output_dir as described above.
    Every process calls this (saving a sharded model needs all of them)."""
    accelerator, output_dir = trainer.accelerator, Path(trainer.args.output_dir)
    staging, step = output_dir / STAGING, trainer.state.global_step
    if accelerator.is_main_process:
        if staging.is_symlink() or staging.is_file():  # a link planted there: removed as a link, its target untouched
            staging.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        write_into(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _move_in(staging, output_dir, run, step)
    except Exception as err:
        needed = disk_full_while_writing(err, output_dir, lambda: trainer_save_sizes(trainer)["final"])
        if not needed:
            raise
        shutil.rmtree(staging, ignore_errors=True)  # copies of what the trainer holds: frees their space
        last = newest_complete_checkpoint(output_dir, warn=False)
        then = (
            f"the newest complete checkpoint is {last.name}: free space, then rerun with --resume_from_checkpoint last"
            if last
            else "no complete checkpoint was saved (save_strategy), so the trained weights are lost: free space and rerun"
        )
        raise UserError(f"{disk_full_message(output_dir, 'the final files', needed)}; {then}") from None
    accelerator.wait_for_everyone()
    return output_dir


def _move_in(staging: Path, output_dir: Path, run: dict, step: int) -> list[str]:
    """The main process's part of write_final_outputs: fsync the staged files, remove the old run's
    marker and files, move the new ones in, write run_complete.json last. Returns the names moved in."""
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        if (staging / name).is_file():
            fd = os.open(staging / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    kill_point("final-staged", step)
    hashes = final_file_hashes(staging)
    old = finished_run(output_dir)
    doomed = sorted({*(old or {}).get("files", []), *names})
    for name in doomed:  # every name checked before the first deletion
        confined(output_dir, name, output_dir / RUN_MARKER)
    (output_dir / RUN_MARKER).unlink(missing_ok=True)  # from here on the folder is visibly unfinished
    for name in doomed:
        remove_entry(output_dir, name, output_dir / RUN_MARKER)
    kill_point("final-cleared", step)
    for name in names:
        os.replace(staging / name, output_dir / name)
    staging.rmdir()
    kill_point("final-moved", step)
    write_json_atomic(output_dir / RUN_MARKER, {"global_step": step, "files": names, "run": run, "sha256": hashes})
    return names


def whole_run_metrics(metrics: dict, log_history: list[dict], resumed_at: int, global_step: int) -> dict:
    """transformers' train metrics cover only this session's steps after a resume; rebuild
    train_loss over the whole run from the logged losses (each the mean since the previous log)
    up to the resume step, and report the last num_tokens."""
    metrics = dict(metrics)
    train_logs = [h for h in log_history if "loss" in h and "step" in h]
    if train_logs and "num_tokens" in train_logs[-1]:
        metrics["num_tokens"] = train_logs[-1]["num_tokens"]
    if not resumed_at:
        return metrics
    total, covered = 0.0, 0
    for entry in (h for h in train_logs if h["step"] <= resumed_at):
        total += entry["loss"] * (entry["step"] - covered)
        covered = entry["step"]
    session_steps = global_step - resumed_at
    metrics["train_loss"] = (total + metrics.get("train_loss", 0.0) * session_steps) / max(covered + session_steps, 1)
    metrics["train_resumed_at_step"] = resumed_at
    return metrics


class ContinueCounters(TrainerCallback):
    """On a resume, TRL's num_tokens carries on from the checkpoint instead of restarting at 0."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        continue_token_count(self.trainer)
