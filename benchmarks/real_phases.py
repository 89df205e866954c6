"""The machinery of `make real`'s plan (benchmarks/real_plan.py): phase folders with provenance, the reference
log-probs scored once, a resumable training loop, and one progress bar with an ETA over the whole plan.

- A phase ends by writing its folder whole (dpo/folders.py: built beside, marked, renamed into place), its
  marker recording `made_from` (the hash of its inputs: settings, data, the folders of the phases it came
  from). A later run reuses a finished phase only when its inputs hash the same and its files are unchanged;
  otherwise it stops in one line naming what changed and the folder to delete: never a silent mix.
- A training run checkpoints into `<phase>.checkpoint` (marked the same way, with its `made_from`); a killed
  run resumes from its last checkpoint, and the checkpoint is deleted once its phase folder is written.
- Reference log-probs live in the reference cache's store (dpo/train/speed/refstore.py, keyed by the
  reference's weights as dpo/train/speed/refcache.py keys them): every pair is scored once, in parts written
  whole, so a kill while scoring keeps what was scored.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo.errors import UserError
from dpo.files import json_text, read_json_object
from dpo.folders import marker_problem, read_marker, remove_marked, write_marked_folder
from dpo.log import log
from dpo.train.speed import refstore
from dpo.train.speed.refcache import weights_hash
from dpo.train.speed.refstore import Store, key_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_measure import sequence_logps  # noqa: E402

KIND = "real-alignment phase"
CHECKPOINT_KIND = "real-alignment checkpoint"
RESULT_SHAPE = {"phase": (str, None)}
SCORE_PART = 64  # pairs per reference-cache part: a kill while scoring loses at most this many


TIMING = "timing.json"  # how long a phase took: in its folder, but not part of what a later phase came from


def folder_identity(folder: Path) -> str:
    """The hash of a finished phase folder's files (its marker's sha256 table, less TIMING): what a later phase
    came from. A phase redone with the same inputs on the same machine writes the same files, so what came
    after it stays valid."""
    return key_of({k: v for k, v in read_marker(folder, KIND)["sha256"].items() if k != TIMING})


def finished_result(folder: Path, made_from: dict) -> dict | None:
    """The result.json of the finished phase in `folder` when it was made from `made_from`; None when the phase
    has not finished (no folder). UserError when it was made from other inputs or a file in it changed."""
    if not folder.exists():
        return None
    redo = f"delete {folder} and the phase folders after it to redo them with these inputs"
    record = read_marker(folder, KIND)
    if record is None:
        raise UserError(
            f"{folder} is not a finished phase of make real (no marker of one): nothing was reused; {redo}"
        )
    if problem := marker_problem(folder, KIND):
        raise UserError(f"{problem}: {redo}")
    if record.get("made_from") != key_of(made_from):
        raise UserError(
            f"{folder} was made from other inputs than this run's ({input_changes(record.get('inputs'), made_from)}): "
            f"nothing was reused; {redo}, or run with the settings it was made with"
        )
    return read_json_object(folder / "result.json", RESULT_SHAPE, redo)


def input_changes(recorded, now: dict) -> str:
    """What differs between a phase's recorded inputs and this run's: the inputs that changed, and those an older
    version did not record (a folder made before they were inputs)."""
    old = recorded if isinstance(recorded, dict) else {}
    changed = sorted(k for k in old.keys() & now.keys() if old[k] != now[k])
    unrecorded = sorted(now.keys() - old.keys())
    dropped = sorted(old.keys() - now.keys())
    parts = [f"{', '.join(changed)} changed"] * bool(changed)
    parts += [f"{', '.join(unrecorded)} not recorded (made by an older version)"] * bool(unrecorded)
    parts += [f"{', '.join(dropped)} no longer an input"] * bool(dropped)
    return "; ".join(parts) or "its inputs changed"


def write_phase(folder: Path, made_from: dict, result: dict, tensors: dict | None = None, seconds: float = 0.0):
    """Write a phase folder whole: result.json, each tensors[name] (a state dict) as name.pt and TIMING; marked last."""

    def write(staging: Path) -> None:
        (staging / TIMING).write_text(json_text({"seconds": seconds}, folder / TIMING))
        for name, state in (tensors or {}).items():
            torch.save(state, staging / f"{name}.pt")
        (staging / "result.json").write_text(json_text(result, folder / "result.json", observations=True, indent=1))

    write_marked_folder(folder, write, KIND, made_from=key_of(made_from), inputs=made_from)


def phase_seconds(folder: Path) -> float:
    """How long the phase in `folder` took (its TIMING file, checked with the folder)."""
    return float(
        read_json_object(folder / TIMING, {"seconds": (float, None)}, f"delete {folder} to redo it")["seconds"]
    )


def load_tensors(folder: Path, name: str) -> dict:
    return torch.load(folder / f"{name}.pt", weights_only=True)


# ── progress over the whole plan ──────────────────────────────────────────────────────────────


def _move(bar, n: int) -> None:
    """Set `bar` at `n` units without timing the jump: tqdm's rate is (n - last_print_n) / dt at its next update."""
    bar.n = bar.last_print_n = n
    bar.refresh()


class Progress:
    """One bar over the whole plan (units: pair forwards, a training pair ~3: forward and backward) and one per
    phase, both with an ETA; status.json in the work folder says where the plan is, rewritten at each update."""

    def __init__(self, work: Path, phases: dict[str, float], enabled: bool = True):
        self.work, self.phases, self.enabled = work, phases, enabled
        self.total = sum(phases.values())
        self.whole = tqdm(total=round(self.total), desc="make real", file=sys.stderr, disable=not enabled, position=0)
        self.bar, self.name, self.base = None, None, 0.0

    def start(self, name: str) -> None:
        """Enter phase `name`; the phases before it count as done (finished now or in an earlier run)."""
        if name == self.name:
            return
        self.close_phase()
        names = list(self.phases)
        self.name, self.base = name, sum(self.phases[n] for n in names[: names.index(name)])
        _move(self.whole, round(self.base))
        self.bar = tqdm(
            total=round(self.phases[name]),
            desc=name,
            file=sys.stderr,
            disable=not self.enabled,
            position=1,
            leave=False,
        )
        self.write_status()

    def advance(self, units: float) -> None:
        self.bar.update(units)
        self.whole.update(units)
        self.write_status()

    def skip(self, units: float) -> None:
        """Count `units` as done without timing them (work finished in an earlier run): the ETA's rate stays the
        rate of work done now."""
        for bar in (self.bar, self.whole):
            _move(bar, bar.n + round(units))
        self.write_status()

    def close_phase(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write_status(self, finished: bool = False, **extra) -> None:
        rate = self.whole.format_dict.get("rate") or 0.0
        left = max(0.0, self.total - self.whole.n)
        status = {
            "phase": self.name,
            "finished": finished,
            "done_units": self.whole.n,
            "total_units": round(self.total),
            "eta_s": round(left / rate) if rate and not finished else None,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.work / f".status.json.{os.getpid()}.tmp"
        tmp.write_text(json_text(status, self.work / "status.json", indent=1) + "\n")
        os.replace(tmp, self.work / "status.json")

    def finish(self, **extra) -> None:
        self.close_phase()
        self.whole.n = round(self.total)
        self.whole.close()
        self.write_status(finished=True, **extra)


# ── reference log-probs, scored once ──────────────────────────────────────────────────────────


def row_id(example: dict) -> str:
    """One hash per pair of its prompt, chosen and rejected token ids (as refcache.row_ids hashes TRL's rows)."""
    h = hashlib.blake2b(digest_size=16)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = example[key]
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def config_identity(model) -> dict:
    """The model's config as what decides its numbers: less where it was loaded from and the writer's version."""
    return {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}


def reference_logps(model, examples, pad, batch_size, cache_dir: Path, max_length: int, progress=None):
    """(chosen, rejected) log pi_ref of every example, pi_ref = `model` with its adapters disabled; read from the
    reference cache, and the pairs it lacks scored and stored first (`progress(n)` after each batch of n scored).
    Returns the tensors and how many were scored now."""
    parts = {
        "weights": weights_hash(model),  # the frozen weights only: the trainable LoRA adapter is not pi_ref
        "config": config_identity(model),
        "dtype": str(model.dtype),
        "max_length": max_length,
        "scorer": "benchmarks/real_alignment.py: replies cut to max_length // 2, prompts keep their end",
    }
    folder = refstore.cache_folder(cache_dir, key_of(parts)).absolute()
    if folder.is_dir() and any(folder.iterdir()) and not refstore.is_cache_folder(folder):
        raise UserError(
            f"reference cache folder {folder} exists but is not one the reference cache made: nothing in it was read "
            "or written; move it away, or set --reference_cache_dir to another folder"
        )
    store, ids = Store(folder).load(), [row_id(ex) for ex in examples]
    missing = sorted({row: i for i, row in enumerate(ids) if row not in store.rows}.values())
    if missing:
        if why := refstore.unwritable_reason(folder):
            raise UserError(f"reference cache {folder} cannot be written ({why}): set --reference_cache_dir")
        refstore.write_key(folder, parts)
        env = {"torch": torch.__version__, "machine": platform.machine(), "scorer": parts["scorer"]}
        for start in range(0, len(missing), SCORE_PART):
            chunk = missing[start : start + SCORE_PART]
            began = time.perf_counter()
            with model.disable_adapter():
                c, r = sequence_logps(model, [examples[i] for i in chunk], pad, batch_size, advance=progress)
            seconds = [(time.perf_counter() - began) / len(chunk)] * len(chunk)
            store.write([ids[i] for i in chunk], c.tolist(), r.tolist(), seconds, env, expected=len(chunk))
        store = store.load()
    refstore.mark_used(folder)
    chosen = torch.tensor([store.rows[row][0] for row in ids])
    rejected = torch.tensor([store.rows[row][1] for row in ids])
    return chosen, rejected, len(missing)


# ── a resumable training run ──────────────────────────────────────────────────────────────────


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The pairs of optimizer step `step` (1-based): each epoch a fresh seeded order, so a resumed run takes
    exactly the batches it would have taken, from the step alone."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step - 1, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * batch_size : (pos + 1) * batch_size]


def trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def train_run(
    model,
    step_loss,
    *,
    folder: Path,
    made_from: dict,
    run: dict,
    evaluate=None,
    stop=None,
    hooks=None,
    resumed=None,
    start_point=True,
):
    """Train `model`'s trainable weights for up to run["steps"] optimizer steps and return the run's state:
    {"step", "curve": [evaluate(step) at step 0 (unless not `start_point`) and every run["eval_every"]], "best":
    {"step", "score"},
    "stopped": why}. `step_loss(step)` is the loss of that step's batch. AdamW, linear warm-up over
    run["warmup"] steps then constant, gradients clipped at 1.0. The best weights by evaluate's "score"
    (validation only) are kept in state["best_weights"]. Checkpoints go to `<folder>.checkpoint` (each
    evaluation and every run["save_every"] steps); a run killed after one resumes from it. `stop(curve)` says
    why to stop early (the plan's stop rule), or None. hooks["step"](name, step) is called after each step;
    `resumed(steps, points)` once, with the steps and evaluations a checkpoint already holds (the progress bar
    counts them as done)."""
    checkpoint = folder.with_name(folder.name + ".checkpoint")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run["lr"], weight_decay=0.0)
    state = {"step": 0, "curve": [], "best": None, "stopped": None, "losses": []}
    best_weights = trainable_state(model)
    if checkpoint.exists():
        record = read_marker(checkpoint, CHECKPOINT_KIND)
        if (
            record is None
            or marker_problem(checkpoint, CHECKPOINT_KIND)
            or record.get("made_from") != key_of(made_from)
        ):
            raise UserError(
                f"{checkpoint} is not a checkpoint of this run (other inputs, a changed file, or not ours): nothing was "
                "reused; delete it to start this phase again"
            )
        saved = torch.load(checkpoint / "checkpoint.pt", weights_only=True)
        model.load_state_dict(saved["weights"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        best_weights = saved["best_weights"]
        state = read_json_object(checkpoint / "state.json", {"step": (int, None)}, f"delete {checkpoint}")
        log(f"{folder.name}: resumed from its checkpoint at step {state['step']} ({checkpoint})")
        if resumed is not None:
            resumed(state["step"], len(state["curve"]))

    def save() -> None:
        def write(staging: Path) -> None:
            torch.save(
                {"weights": trainable_state(model), "optimizer": optimizer.state_dict(), "best_weights": best_weights},
                staging / "checkpoint.pt",
            )
            (staging / "state.json").write_text(json_text(state, checkpoint / "state.json", observations=True))

        write_marked_folder(checkpoint, write, CHECKPOINT_KIND, made_from=key_of(made_from), step=state["step"])

    def point() -> None:
        nonlocal best_weights
        if evaluate is None:
            return
        p = {"step": state["step"], **evaluate(state["step"])}
        p["train_loss"] = sum(state["losses"]) / len(state["losses"]) if state["losses"] else None
        state["losses"] = []
        state["curve"].append(p)
        if state["best"] is None or p["score"] > state["best"]["score"]:
            state["best"], best_weights = {"step": p["step"], "score": p["score"]}, trainable_state(model)

    if start_point and state["step"] == 0 and not state["curve"]:
        point()
    while state["step"] < run["steps"] and state["stopped"] is None:
        step = state["step"] + 1
        model.train()
        loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = run["lr"] * min(1.0, step / max(1, run["warmup"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["losses"].append(loss.item())
        evaluated = run.get("eval_every") and (step % run["eval_every"] == 0 or step == run["steps"])
        if evaluated:
            point()
            state["stopped"] = stop(state["curve"]) if stop is not None else None
        if evaluated or step % run.get("save_every", 25) == 0:
            save()
        if hooks and "step" in hooks:
            hooks["step"](folder.name, step)
    state["stopped"] = state["stopped"] or f"reached {run['steps']} steps"
    return {**state, "best_weights": best_weights, "last_weights": trainable_state(model)}


def drop_checkpoint(folder: Path) -> None:
    """After `folder` is written whole: its run's checkpoint is no longer needed (only a marked one is deleted)."""
    remove_marked(folder.parent, folder.with_name(folder.name + ".checkpoint"), CHECKPOINT_KIND)
