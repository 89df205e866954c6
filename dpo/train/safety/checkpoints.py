"""Checkpoints that are whole or visibly not: a completion marker, resume from the newest
complete one, rotation that never deletes the last good one.

transformers writes checkpoint-<step>/ file by file; a kill -9 in the middle leaves a folder
that looks like a checkpoint and is not. After transformers' writer returns we write
`checkpoint_complete.json` (every file, its size and its sha256, the run's settings) with an atomic
rename, last. A folder without it, or whose files no longer match it, is incomplete: `last`
skips it with a warning and an explicit path to it is refused. Sizes are compared wherever
checkpoints are listed; the sha256 of every file before a resume loads one (a file overwritten
at the same size is caught there). Rotation (`save_total_limit`)
runs only after the marker, and only over complete checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from dpo.errors import UserError
from dpo.files import (
    SMALL_FILES,
    check_free_space,
    confined,
    disk_full_message,
    disk_full_while_writing,
    file_sha256,
    json_text,
    sha256_mismatch,
    shape_problem,
    size_text,
)
from dpo.log import log
from dpo.signals import kill_point
from dpo.train.safety.identity import predating_base

MARKER = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# What a resumable checkpoint holds besides the marker: the model weights (*.safetensors),
# the optimizer, the scheduler, the trainer state and the RNG states (rng_state*.pth).
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
MARKER_SHAPE = {"files": (dict, int), "run": (dict, None), "sha256": (dict, str)}


@dataclass
class RunOptions:
    """Options for resuming and reusing an output_dir (recipes parse them with DPOConfig's or SFTConfig's fields)."""

    resume_with_different_settings: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint even if it was written with different settings (listed when refused)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Reuse an output_dir that holds a different run: its final files and checkpoints are deleted."
        },
    )


PER_INVOCATION_KEYS = ("resume_from_checkpoint", *(f.name for f in fields(RunOptions)))  # not part of a run's settings


def checkpoint_step(folder: Path) -> int | None:
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(data, path, indent=2, sort_keys=True))  # a record: a NaN is refused
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def list_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path -> size), the marker itself excepted."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")
    }


def mark_complete(folder: Path, run: dict) -> None:
    """Flush every file of a freshly written checkpoint to disk and hash it, then write the marker."""
    files = list_files(folder)
    hashes = {}
    for name in files:
        _fsync(folder / name)
        hashes[name] = file_sha256(folder / name)
    marker = {"step": checkpoint_step(folder), "files": files, "run": run, "sha256": hashes}
    write_json_atomic(folder / MARKER, marker)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, None if it is. Reads the header only (cheap at any
    size): the 8-byte header length, the JSON header, and exactly the tensor bytes it announces, which
    is what safetensors itself checks when the weights load (its "incomplete metadata")."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, less than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"{size:,} bytes, its header length alone says {8 + n:,}"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "its header is not safetensors JSON"
    if size != 8 + n + end:
        return f"{size:,} bytes, its header announces {8 + n + end:,}"
    return None


def checkpoint_problems(folder: str | Path, verify: bool = False) -> list[str]:
    """Why `folder` is not a complete, readable checkpoint ([] if it is). `verify`: also compare every
    file's sha256 with the marker's (reads every byte: done before a resume loads it)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        missing = [n for n in REQUIRED if not (folder / n).is_file()]
        return [f"no {MARKER} (the save was interrupted)"] + ([f"missing {', '.join(missing)}"] if missing else [])
    except (OSError, ValueError):
        return [f"{MARKER} unreadable"]
    if problem := shape_problem(marker, MARKER_SHAPE, optional=() if verify else ("sha256",)):
        return [f"{MARKER} {problem}"]
    problems = []
    for name in [*marker["files"], *marker.get("sha256", {})]:
        try:
            confined(folder, name, folder / MARKER)
        except UserError:
            return [f"{MARKER} names {name!r}, which is not inside the checkpoint"]
    for name, size in marker["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    names = set(marker.get("files", {}))
    problems += [f"{n} never written" for n in REQUIRED if n not in names]
    if not any(n.endswith(".safetensors") for n in names):
        problems.append("no model weights (*.safetensors)")
    if not any(Path(n).name.startswith("rng_state") for n in names):
        problems.append("no RNG state (rng_state*.pth)")
    if problems:
        return problems
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except ValueError:
        problems.append("trainer_state.json unreadable")
    problems += [f"{n} unreadable" for n in names if n.endswith(".safetensors") and safetensors_problem(folder / n)]
    if verify and not problems:
        problems += [
            f"{mismatch} (changed after the checkpoint was saved)"
            for name, expected in sorted(marker["sha256"].items())
            if (mismatch := sha256_mismatch(folder / name, expected))
        ]
        problems += [f"{n} has no recorded sha256" for n in sorted(names - set(marker["sha256"]))]
    return problems


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """checkpoint-<step> folders in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def newest_complete_checkpoint(output_dir: str | Path, warn: bool = True, verify: bool = False) -> Path | None:
    """The highest-step complete checkpoint (`verify`: whose files also match their sha256); newer
    incomplete ones are skipped with a warning."""
    for folder in reversed(checkpoints_in(output_dir)):
        problems = checkpoint_problems(folder, verify)
        if not problems:
            return folder
        if warn:
            log(f"warning: skipping {folder}: incomplete ({'; '.join(problems)})")
    return None


def resumed_step(folder: str | Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    return json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"]


def checkpoint_run(folder: str | Path) -> dict:
    """The run settings recorded in a complete checkpoint's marker."""
    return json.loads((Path(folder) / MARKER).read_text()).get("run", {})


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `last` for the newest complete one in output_dir.
    Anything that is not a complete checkpoint is refused, before any weights load."""
    if value in (None, "", "false", "False"):
        return None
    if value in ("last", "true", "True"):
        last = newest_complete_checkpoint(output_dir, verify=True)
        if last is None:
            found = checkpoints_in(output_dir)
            detail = f" ({len(found)} incomplete, see the warnings above)" if found else ""
            raise UserError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}{detail}"
            )
        log(f"resuming from {last} (step {checkpoint_step(last)}), the newest complete checkpoint in {output_dir}")
        return str(last)
    folder = Path(value)
    if not folder.is_dir():
        raise UserError(f"--resume_from_checkpoint: checkpoint folder not found: {value}")
    if checkpoints_in(folder):
        raise UserError(
            f"--resume_from_checkpoint {value} is an output_dir, not a checkpoint: give one of its checkpoint-<step> "
            f"folders, or --resume_from_checkpoint last --output_dir {value}"
        )
    looks_like_one = (
        checkpoint_step(folder) is not None or (folder / MARKER).is_file() or (folder / "optimizer.pt").is_file()
    )
    if not looks_like_one:
        raise UserError(
            f"--resume_from_checkpoint {value} is not a checkpoint (a checkpoint-<step> folder written during training, "
            "with the optimizer and trainer state)"
        )
    problems = checkpoint_problems(folder, verify=True)
    if problems:
        newest = newest_complete_checkpoint(folder.parent, warn=False, verify=True)
        instead = f"; the newest complete one is {newest}" if newest else ""
        raise UserError(f"--resume_from_checkpoint {value} is incomplete: {'; '.join(problems)}{instead}")
    return str(folder)


def rotate(output_dir: str | Path, limit: int | None, run: dict, keep: str | None = None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints of this run (marked with its settings `run`) and `keep`, the
    best one; delete its older ones. Returns what was deleted. Nothing else is deleted: another run's checkpoints
    (a plain TRL run's, unmarked, or one marked with other settings, e.g. beside a resume from elsewhere), nor a
    folder whose save was killed (unmarked: resume skips it, and a disk-full message names it to delete)."""
    if not limit or limit <= 0:
        return []
    done = [f for f in checkpoints_in(output_dir) if not checkpoint_problems(f)]
    mine = [f for f in done if predating_base(checkpoint_run(f), run) == run]  # as prepare_output_dir tells them
    doomed = [f for f in mine[:-limit] if keep is None or Path(keep).resolve() != f.resolve()]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


# ── how much a save writes: refused before weights load when it cannot fit, named when a disk fills ──
# Before weights load the trainable parameters are counted (dpo.train.model_checks.trainable_parameter_count) and
# taken as float32, 4 bytes each: the widest dtype they are kept in (bf16/fp16 halve it), so this
# overestimates. The optimizer state is AdamW's (transformers' default): exp_avg and exp_avg_sq, each
# a tensor like its parameter; the other optimizers transformers offers keep at most as much.
BYTES_PER_TRAINABLE = 4
ADAM_STATES = 2


def tokenizer_bytes(tokenizer) -> int:
    """What `tokenizer.save_pretrained` writes, measured by saving it to a temporary folder; where that
    fails (a full /tmp), a fast tokenizer's tokenizer.json as compact JSON (the saved file is indented, larger)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    except OSError:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return len(backend.to_str().encode()) if backend is not None else 0


def save_sizes(weights: int, optimizer: int, tokenizer: int) -> dict[str, int]:
    """Bytes one checkpoint and the final files take: weights (the adapter), optimizer state, tokenizer,
    and dpo.files.SMALL_FILES for everything else (states, configs, metrics, the curves)."""
    return {"checkpoint": weights + optimizer + tokenizer + SMALL_FILES, "final": weights + tokenizer + SMALL_FILES}


def check_room_for_run(training_args, trainable: int, tokenizer) -> None:
    """Before any weights load: output_dir's disk must hold one checkpoint (unless save_strategy is
    "no") and the final files, for `trainable` parameters. More checkpoints kept need more; a disk that
    fills later is named by the save that fails (CheckpointSaver, dpo.train.safety.runs.write_final_outputs)."""
    weights, tok = BYTES_PER_TRAINABLE * trainable, tokenizer_bytes(tokenizer)
    sizes = save_sizes(weights, ADAM_STATES * weights, tok)
    saves = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    needed = sizes["final"] + (sizes["checkpoint"] if saves else 0)
    what = (
        f"one checkpoint (adapter {size_text(weights)}, optimizer state {size_text(ADAM_STATES * weights)}, "
        f"tokenizer {size_text(tok)}, other files {size_text(SMALL_FILES)}) and the final files "
        f"({size_text(sizes['final'])})"
        if saves
        else f"the final files (adapter {size_text(weights)}, tokenizer {size_text(tok)}, other files)"
    )
    check_free_space(training_args.output_dir, needed, what)


def trainer_save_sizes(trainer) -> dict[str, int]:
    """save_sizes from what this trainer holds: its trainable tensors and its optimizer's state tensors."""
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    state = getattr(getattr(trainer, "optimizer", None), "state", {}) or {}
    optimizer = sum(
        v.numel() * v.element_size() for per_param in state.values() for v in per_param.values() if hasattr(v, "numel")
    )
    return save_sizes(weights, optimizer, tokenizer_bytes(trainer.processing_class))


def checkpoint_disk_full(folder: Path, needed: int) -> UserError:
    """A checkpoint save that filled the disk, in one line: what it needs, what is kept, how to go on."""
    last = newest_complete_checkpoint(folder.parent, warn=False)
    kept = (
        f"the newest complete checkpoint is {last.name}. Free space, then rerun with --resume_from_checkpoint last"
        if last
        else "no checkpoint is complete yet. Free space, then rerun the same command"
    )
    return UserError(
        f"{disk_full_message(folder.parent, folder.name, needed)}; nothing complete was lost: "
        f"the half-written {folder.name} is incomplete (resume skips it; delete it to free its space) and {kept}"
    )


class CheckpointSaver:
    """Replaces transformers' checkpoint writer (see dpo.compat.route_checkpoint_writes):
    writes with signals held back (`hold_signals(what)`: a stop waits for the whole checkpoint, then stops
    training there), marks the folder complete, then rotates."""

    def __init__(self, trainer, run: dict, hold_signals):
        self.trainer, self.run, self.hold_signals = trainer, run, hold_signals

    def __call__(self, write, folder: Path) -> None:
        accelerator, step = self.trainer.accelerator, self.trainer.state.global_step
        with self.hold_signals(str(folder)):  # a Ctrl-C now waits until the checkpoint is whole, then stops
            if accelerator.is_main_process and (folder / MARKER).exists():
                (folder / MARKER).unlink()  # re-saving this step: incomplete until rewritten
            kill_point("begin", step)
            try:
                write()  # transformers' writer, its own rotation off
                kill_point("files", step)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    mark_complete(folder, self.run)
            except Exception as err:
                if needed := disk_full_while_writing(err, folder.parent, lambda: self.checkpoint_bytes(folder)):
                    raise checkpoint_disk_full(folder, needed) from None
                raise
            if accelerator.is_main_process:
                kill_point("marked", step)
                limit, best = self.trainer.args.save_total_limit, self.trainer.state.best_model_checkpoint
                rotate(folder.parent, limit, self.run, best)
            accelerator.wait_for_everyone()

    def checkpoint_bytes(self, folder: Path) -> int:
        """What a checkpoint takes: the newest complete one's files, else the trainer's tensors (trainer_save_sizes)."""
        last = newest_complete_checkpoint(folder.parent, warn=False)
        return sum(list_files(last).values()) if last else trainer_save_sizes(self.trainer)["checkpoint"]
