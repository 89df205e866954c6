"""The phases of `make real` (benchmarks/real_alignment.py), each resumable and each checking what it came from.

  split      all usable HH-RLHF harmless-base pairs, one seeded shuffle: held-out | validation | training.
             The held-out pairs are scored only by `report`; every choice is made on the validation slice.
  sft        (--sft_steps > 0) LoRA SFT on the training pairs' chosen replies, merged into the base: pi_ref.
  reference  log pi_ref of every pair, once, into the reference cache (dpo/train/speed/refstore.py).
  select     a short DPO run per (learning rate, beta) of the grid; the best validation accuracy wins
             (ties: the larger validation log-ratio margin).
  main       DPO at the chosen rate and beta until the validation curve flattens (STOP RULE below) or
             --max_steps; the held-out curve is recorded for the plot only, never read by a decision.
  report     the weights of the best validation point, measured on every held-out pair.

STOP RULE: validation accuracy every --eval_every steps; stop once --patience evaluations in a row have not
beaten the best so far by --min_delta; the reported weights are those of the best validation point.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dpo.data.doctor import check_data
from dpo.data.loading import load_preference_data
from dpo.errors import UserError
from dpo.folders import read_marker, write_marker
from dpo.log import log
from dpo.scratch.loop import disable_dropout
from dpo.scratch.loss import dpo_loss
from dpo.train.model_checks import load_tokenizer
from dpo.train.speed.refcache import weights_hash
from dpo.train.speed.refstore import key_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_measure import heldout_metrics, sequence_logps, tokenize_pair, training_logps  # noqa: E402
from real_phases import (  # noqa: E402
    Progress,
    batch_indices,
    config_identity,
    drop_checkpoint,
    finished_result,
    folder_identity,
    load_tensors,
    phase_seconds,
    reference_logps,
    row_id,
    train_run,
    write_phase,
)

TRAIN_UNITS, SFT_UNITS = 3.0, 1.5  # a DPO training pair ~ 3 pair forwards (forward + backward); SFT: chosen only
WORK_KIND = "real-alignment work"  # the --work folder's marker: only a folder make real made is written into


def claim_work_folder(work: Path) -> None:
    """Mark `work` as make real's (created when absent); a folder that holds anything and no such marker is
    refused before anything is written into it: status.json and the phase folders go only where make real put them."""
    if work.exists() and not work.is_dir():
        raise UserError(f"--work {work} is not a folder: pick another --work")
    if work.is_dir() and any(work.iterdir()) and read_marker(work, WORK_KIND) is None:
        raise UserError(
            f"--work {work} holds files make real did not make (no marker of its work folder): nothing was written "
            "there; pick an empty or new --work"
        )
    work.mkdir(parents=True, exist_ok=True)
    if read_marker(work, WORK_KIND) is None:
        write_marker(work, WORK_KIND)


class Plan:
    """The run's settings, data and work folder; `hooks` (tests): "phase"(name) when a phase does its work
    (not when it is reused), "step"(phase, step) after each optimizer step."""

    def __init__(self, args, model_dir: str, hooks: dict | None = None, progress: bool = True):
        self.args, self.model_dir, self.hooks = args, model_dir, hooks or {}
        self.work = Path(args.work)
        claim_work_folder(self.work)
        self.tokenizer = load_tokenizer(model_dir)
        self.pad = self.tokenizer.pad_token_id
        # max_length=None: the doctor drops nothing for length; tokenize_pair truncates (keeps the prompt's end)
        self.report = check_data(
            load_preference_data(args.dataset_name), args.dataset_name, self.tokenizer, max_length=None
        )
        self.pairs = self.report.kept.shuffle(seed=args.seed)
        n = len(self.pairs)
        n_train = n - args.heldout_pairs - args.val_pairs if args.train_pairs is None else args.train_pairs
        if min(args.heldout_pairs, args.val_pairs, n_train) < 1 or args.heldout_pairs + args.val_pairs + n_train > n:
            raise UserError(
                f"--heldout_pairs {args.heldout_pairs} + --val_pairs {args.val_pairs} + training pairs {n_train} do not "
                f"fit the {n} usable pairs of {args.dataset_name}: lower them (each at least 1)"
            )
        self.ranges = {
            "heldout": range(0, args.heldout_pairs),
            "validation": range(args.heldout_pairs, args.heldout_pairs + args.val_pairs),
            "train": range(args.heldout_pairs + args.val_pairs, args.heldout_pairs + args.val_pairs + n_train),
        }
        self.examples = {
            k: [tokenize_pair(self.tokenizer, self.pairs[i], args.max_length) for i in r]
            for k, r in self.ranges.items()
        }
        self.progress = Progress(self.work, self.units(), enabled=progress)
        self.folders, self.results = {}, {}  # phase -> its finished folder (for the next's provenance), its result
        self._base = None

    def base_identity(self) -> str:
        """The base model's identity: the hash of its weights and config (what SFT and the reference came from;
        its path is not: a moved folder is the same model, a rewritten one at the same path is not)."""
        if self._base is None:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).requires_grad_(False)
            self._base = key_of({"weights": weights_hash(model), "config": config_identity(model)})
            del model
        return self._base

    # ── helpers ───────────────────────────────────────────────────────────────────────────
    def seconds(self) -> float:
        """The time every phase took, summed over the runs that did them."""
        return sum(phase_seconds(folder) for folder in self.folders.values())

    def units(self) -> dict[str, float]:
        a, ex = self.args, self.examples
        n_val, n_held, n_all = len(ex["validation"]), len(ex["heldout"]), sum(len(v) for v in ex.values())
        evals = a.max_steps // a.eval_every + 2
        return {
            "split": 1.0,
            "sft": a.sft_steps * a.batch_size * SFT_UNITS,
            "reference": float(n_all),
            "select": len(a.grid_lr) * len(a.grid_beta) * (a.select_steps * a.batch_size * TRAIN_UNITS + n_val),
            "main": a.max_steps * a.batch_size * TRAIN_UNITS + evals * (n_val + min(a.curve_pairs, n_held)),
            # the held-out pairs, again under the model before SFT when there is one; KL; greedy tokens ~1/4 unit
            "report": n_held * (2 if a.sft_steps else 1) + 2 * a.kl_pairs + a.gen_prompts * a.max_new_tokens / 4,
        }

    def made_from(self, phase: str, upstream: tuple[str, ...], **settings) -> dict:
        """A phase's inputs: its settings and the identity (files' hash) of each finished folder it came from."""
        return {"phase": phase, **settings, **{f"{u}_folder": folder_identity(self.folders[u]) for u in upstream}}

    def phase(self, name: str, made_from: dict, work, bar: str | None = None, units: float = 0.0) -> dict:
        """The finished result of phase `name` (reused, checked) or `work(folder)`'s, written whole. `bar`: the
        plan's phase it belongs to (default `name`); a reused part of one advances its bar by `units`."""
        folder = self.work / name
        self.progress.start(bar or name)
        result = finished_result(folder, made_from)
        if result is None:
            if "phase" in self.hooks:
                self.hooks["phase"](name)
            began = time.time()
            result, tensors = work(folder)
            write_phase(folder, made_from, {"phase": name, **result}, tensors, seconds=time.time() - began)
            drop_checkpoint(folder)
            result = finished_result(folder, made_from)  # as a later run reads it back (JSON: lists, not tuples)
        else:
            log(f"{name}: finished in an earlier run, reused ({folder})")
            self.progress.skip(units)
        self.folders[name], self.results[name] = folder, result
        return result

    def policy(self, sft: bool = True):
        """pi_ref (the base, with the SFT adapter merged when there is one and `sft`) under a fresh LoRA adapter."""
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        lora = LoraConfig(
            r=self.args.lora_r, lora_alpha=2 * self.args.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
        if sft and "sft" in self.folders:
            torch.manual_seed(self.args.seed)
            model = get_peft_model(model, lora)
            model.load_state_dict(load_tensors(self.folders["sft"], "adapter"), strict=False)
            model = model.merge_and_unload()
        torch.manual_seed(self.args.seed)
        model = get_peft_model(model, lora)
        disable_dropout(model)
        return model

    def dpo_loss_of(self, model, beta: float, ref):
        train, bs, seed = self.examples["train"], self.args.batch_size, self.args.seed

        def step_loss(step: int):
            idx = batch_indices(step, len(train), bs, seed)
            logps, _ = training_logps(model, [train[i] for i in idx], self.pad)
            self.progress.advance(len(idx) * TRAIN_UNITS)
            pc, pr = logps["chosen_ids"], logps["rejected_ids"]
            return dpo_loss(pc, pr, ref[0][idx], ref[1][idx], beta=beta, loss_type="sigmoid").losses.mean()

        return step_loss

    def dpo_run(self, model, beta, folder, made_from: dict, run: dict, evaluate, point_units, stop=None, **kw) -> dict:
        """A resumable DPO run of `model` on the training pairs (real_phases.train_run, which takes `kw`);
        `evaluate` measures `point_units` pairs."""
        pairs = min(self.args.batch_size, len(self.examples["train"]))  # a step's pairs (batch_indices)
        step_loss, units = self.dpo_loss_of(model, beta, self.ref["train"]), pairs * TRAIN_UNITS
        done = lambda steps, points: self.progress.skip(steps * units + points * point_units)  # noqa: E731
        kwargs = dict(folder=folder, made_from=made_from, run=run, hooks=self.hooks, resumed=done, **kw)
        return train_run(model, step_loss, evaluate=evaluate, stop=stop, **kwargs)

    def measure(self, model, split: str, ref, beta: float, n: int | None = None) -> dict:
        ex = self.examples[split][:n]
        pc, pr = sequence_logps(model, ex, self.pad, 2 * self.args.batch_size, advance=self.progress.advance)
        return heldout_metrics(pc, pr, ref[0][: len(ex)], ref[1][: len(ex)], beta)

    # ── the phases ─────────────────────────────────────────────────────────────────────────
    def split(self) -> dict:
        a = self.args
        made_from = {
            "phase": "split",
            # the data's content (every usable pair, in order), so a hub id or a moved file is identified too
            "data_sha256": rows_sha256(self.report.kept, range(len(self.report.kept))),
            # the pairs as the model reads them: the tokenizer, its chat template and --max_length
            "token_ids_sha256": key_of({k: [row_id(ex) for ex in v] for k, v in self.examples.items()}),
            "seed": a.seed,
            "sizes": {k: len(r) for k, r in self.ranges.items()},
            "doctor": f"{self.report.rows_in} rows in, {self.report.rows_kept} kept",
        }

        def work(folder):
            hashes = {k: rows_sha256(self.pairs, r) for k, r in self.ranges.items()}
            self.progress.advance(1)
            return {"sizes": made_from["sizes"], "rows_sha256": hashes, "doctor": made_from["doctor"]}, None

        return self.phase("split", made_from, work)

    def sft(self) -> dict | None:
        a = self.args
        if a.sft_steps == 0:
            return None
        run = {"steps": a.sft_steps, "lr": a.sft_lr, "warmup": a.warmup_steps, "save_every": a.save_every}
        run["batch_size"] = a.batch_size  # its batches (batch_indices); a changed one is another SFT
        made_from = self.made_from(
            "sft", ("split",), run=run, lora_r=a.lora_r, max_length=a.max_length, base=self.base_identity()
        )

        def work(folder):
            model = self.policy()
            train, bs = self.examples["train"], a.batch_size

            def step_loss(step):
                idx = batch_indices(step, len(train), bs, a.seed + 1)
                self.progress.advance(len(idx) * SFT_UNITS)
                logps, tokens = training_logps(model, [train[i] for i in idx], self.pad, keys=("chosen_ids",))
                return -logps["chosen_ids"].sum() / tokens["chosen_ids"].sum()  # mean NLL a reply token (sft_nll)

            done = lambda steps, _: self.progress.skip(steps * min(bs, len(train)) * SFT_UNITS)  # noqa: E731
            state = train_run(
                model, step_loss, folder=folder, made_from=made_from, run=run, hooks=self.hooks, resumed=done
            )
            return {"steps": state["step"], "train_loss_last": state["losses"][-1:]}, {
                "adapter": state["last_weights"]
            }

        return self.phase("sft", made_from, work)

    def reference(self) -> dict:
        a = self.args
        model = self.policy()
        everything = [ex for split in ("heldout", "validation", "train") for ex in self.examples[split]]
        self.progress.start("reference")
        c, r, scored = reference_logps(
            model, everything, self.pad, 2 * a.batch_size, a.reference_cache_dir, a.max_length, self.progress.advance
        )
        # the values' own hash: a pair tokenized otherwise (max_length, tokenizer) or another reference is a change
        values = hashlib.sha256(torch.stack([c, r]).numpy().tobytes()).hexdigest()
        upstream = tuple(k for k in ("split", "sft") if k in self.folders)
        made_from = self.made_from(
            "reference", upstream, max_length=a.max_length, base=self.base_identity(), logps=values
        )
        self.progress.skip(len(everything) - scored)  # read, not computed: not part of the ETA's rate
        log(f"reference: {scored} of {len(everything)} pairs scored now, the rest read from the reference cache")
        self.ref, start = {}, 0
        for split in ("heldout", "validation", "train"):
            n = len(self.examples[split])
            self.ref[split], start = (c[start : start + n], r[start : start + n]), start + n
        del model
        # the values, not how many were scored now: a redone phase with the same reference writes the same folder
        return self.phase(
            "reference",
            made_from,
            lambda folder: ({"pairs": len(everything)}, {"logps": {"chosen": c, "rejected": r}}),
        )

    def select(self) -> dict:
        a, cells, names = self.args, [], []
        for lr in a.grid_lr:
            for beta in a.grid_beta:
                run = {
                    "steps": a.select_steps,
                    "lr": lr,
                    "warmup": a.warmup_steps,
                    "eval_every": a.select_steps,
                    "save_every": a.save_every,
                }
                made_from = self.made_from(
                    "select", ("split", "reference"), run=run, beta=beta, batch_size=a.batch_size, lora_r=a.lora_r
                )
                name = f"select-lr{lr:g}-beta{beta:g}"
                names.append(name)

                def work(folder, run=run, beta=beta, made_from=made_from):
                    model = self.policy()

                    def evaluate(step, model=model, beta=beta):
                        return point(self.measure(model, "validation", self.ref["validation"], beta), beta)

                    # the end point alone: a cell keeps only it, and its step 0 (the SFT model, every cell alike)
                    # would cost a fifth of the cell's work
                    n_val = len(self.examples["validation"])
                    state = self.dpo_run(model, beta, folder, made_from, run, evaluate, n_val, start_point=False)
                    return {"lr": run["lr"], "beta": beta, "end": state["curve"][-1]}, None

                cell_units = a.select_steps * a.batch_size * TRAIN_UNITS + len(self.examples["validation"])
                cells.append(self.phase(name, made_from, work, bar="select", units=cell_units))
        best = max(cells, key=lambda c: (c["end"]["score"], c["end"]["logratio_margin"]))
        made_from = self.made_from(  # the choice came from every cell's finished folder: a redone cell is a change
            "select",
            ("split", "reference", *names),
            grid_lr=a.grid_lr,
            grid_beta=a.grid_beta,
            steps=a.select_steps,
        )
        chosen = {
            "lr": best["lr"],
            "beta": best["beta"],
            "grid": [{k: c[k] for k in ("lr", "beta", "end")} for c in cells],
        }
        log(
            f"select: learning rate {best['lr']:g}, beta {best['beta']:g} (validation accuracy {best['end']['score']:.3f})"
        )
        return self.phase("select", made_from, lambda folder: (chosen, None))

    def main_run(self, chosen: dict) -> dict:
        a, beta = self.args, chosen["beta"]
        run = {"steps": a.max_steps, "lr": chosen["lr"], "warmup": a.warmup_steps, "eval_every": a.eval_every,
               "save_every": a.save_every}  # fmt: skip
        rule = {"patience": a.patience, "min_delta": a.min_delta}
        made_from = self.made_from(  # curve_pairs: the held-out points on its curve, part of its result
            "main", ("split", "reference", "select"), run=run, beta=beta, rule=rule, batch_size=a.batch_size,
            curve_pairs=a.curve_pairs,
        )  # fmt: skip

        def work(folder):
            model = self.policy()

            def evaluate(step):
                p = point(self.measure(model, "validation", self.ref["validation"], beta), beta)
                curve = self.measure(model, "heldout", self.ref["heldout"], beta, a.curve_pairs)  # plot only
                return {**p, "heldout_accuracy": curve["accuracy"], "heldout_n": curve["n"]}

            units = len(self.examples["validation"]) + min(a.curve_pairs, len(self.examples["heldout"]))
            state = self.dpo_run(model, beta, folder, made_from, run, evaluate, units, lambda c: stop_rule(c, **rule))
            result = {
                "lr": chosen["lr"],
                "beta": beta,
                "steps": state["step"],
                "stopped": state["stopped"],
                "best": state["best"],
                "curve": state["curve"],
                "rule": rule,
            }
            return result, {"best": state["best_weights"], "last": state["last_weights"]}

        return self.phase("main", made_from, work)


def point(m: dict, beta: float) -> dict:
    """A curve point from validation metrics: "score" (what the plan maximizes) is validation accuracy; the
    log-ratio margin (the reward margin over beta) compares runs of different betas."""
    return {
        "score": m["accuracy"],
        "accuracy": m["accuracy"],
        "loss": m["loss"][0],
        "logratio_margin": m["margin"][0] / beta,
    }


def stop_rule(curve: list[dict], patience: int, min_delta: float) -> str | None:
    """Why to stop (the validation curve has flattened), or None: the last `patience` evaluations have not beaten
    the best validation accuracy before them by `min_delta`."""
    if len(curve) <= patience:
        return None
    before = max(p["score"] for p in curve[:-patience])
    if all(p["score"] < before + min_delta for p in curve[-patience:]):
        return f"validation accuracy flat: {patience} evaluations without beating {before:.3f} by {min_delta}"
    return None


def rows_sha256(pairs, rows: range) -> str:
    """sha256 of the rows `rows` of `pairs` (their JSON, keys sorted), in order: a slice's identity by content."""
    h = hashlib.sha256()
    for i in rows:
        h.update(json.dumps(pairs[i], sort_keys=True, default=str).encode())
    return h.hexdigest()
