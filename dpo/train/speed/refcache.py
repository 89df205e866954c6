"""Reference log-probs computed once, kept on disk, reused by every later run.

With a frozen base as pi_ref, log pi_ref(chosen | prompt) and log pi_ref(rejected | prompt) of a
pair never change. TRL recomputes them in every step of every run (one extra forward per batch);
this module computes each pair's once (batched, longest first, no grad, adapters disabled, through
TRL's own `compute_ref_log_probs`), stores them under `reference_cache_dir`, and hands them to
the trainer as the `ref_chosen_logps` / `ref_rejected_logps` columns TRL reads with
`precompute_ref_log_probs`. Later runs, resumed runs, evaluation and every run of a sweep reuse
them.

Layout: <reference_cache_dir>/<key>/key.json and part-*.parquet (columns row, ref_chosen_logps,
ref_rejected_logps, seconds), each with its sha256 in part-*.parquet.sha256 (verified on load, and a
full cache is only read: dpo/train/speed/refstore.py). `key` hashes everything the values depend on besides the pair:
the reference weights (every frozen tensor, so 4-bit weights hash as stored), the model config,
the quantization config and compute dtype, max_length, truncation_mode, LD-DPO's ld_alpha (it
splits the sum) and TRL's version. `row` hashes the pair's token ids (prompt, chosen, rejected),
so the tokenizer, its chat template and the data are covered exactly: a different template gives
different rows, i.e. a miss, never a wrong value. Pairs of any split or subset share one store.

What is filled before the first step: the held-out pairs, and the training pairs when the run's plan
reaches them all. A plan that reaches fewer (max_steps x per_device_train_batch_size x
gradient_accumulation_steps x processes below the training set: a smoke run) fills its training pairs
as training reaches them, each written to the store, and a later run reads them and fills only the
rest (dpo/train/speed/reflazy.py).

Data parallelism: every process looks up every row; the missing ones are split across processes
(each computes its share once and writes its own part file), then all read the store back. Pairs
filled as training reaches them are computed by the process whose batch holds them.

Parity: at the start of each epoch PARITY_ROWS cached training pairs, drawn at random, are recomputed and
compared; beyond the tolerance (TOLERANCE) the run stops and names the likely cause.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from dpo.compat import TESTED_TRL, precomputed_reference_logps, reference_model, use_reference_columns
from dpo.errors import UserError
from dpo.folders import env_path, given_path
from dpo.log import log
from dpo.train.speed.reflazy import (
    LazyReference,
    planned_pairs,
    refuse_placeholder_columns,
    training_columns,
)
from dpo.train.speed.refstore import (
    COLUMNS,
    Store,
    cache_folder,
    is_cache_folder,
    key_of,
    mark_used,
    row_hash,
    unwritable_reason,
    write_key,
)
from dpo.train.speed.sampler import LengthSortedSampler, sequence_lengths

PARITY_ROWS = 8  # pairs recomputed per epoch and process: a few forwards, enough to see a drift
# |recomputed - cached| <= rtol * |cached| + atol (nats, on a sum over the completion's tokens).
# fp32: batching changes only round-off (~1e-6 relative); a different kernel or device moves sums
# by ~1e-4 relative, harmless to DPO, so the bar sits well above that. bf16/fp16: ~1e-2 relative.
TOLERANCE = {"fp32": (1e-3, 0.05), "half": (2e-2, 0.5)}


def check_reference_cache(training_args) -> None:
    """Refuse what a fixed, precomputed reference cannot serve: before any weights load."""
    if getattr(training_args, "sync_ref_model", False):
        raise UserError("reference_cache: true cannot serve sync_ref_model (TR-DPO moves the reference); turn one off")
    if training_args.precompute_ref_log_probs:
        raise UserError(
            "reference_cache and precompute_ref_log_probs both precompute the reference; keep reference_cache "
            "(kept on disk across runs) and set precompute_ref_log_probs: false"
        )
    if training_args.deepspeed or training_args.fsdp:
        raise UserError(
            "reference_cache: true is not supported with DeepSpeed or FSDP yet; set reference_cache: false"
        )


def _hash_tensor(h, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bf16, 4-bit packed)


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of every frozen tensor of the reference (a trainable LoRA adapter is not part of it)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
        if not tensor.requires_grad:
            h.update(name.encode())
            _hash_tensor(h, tensor)
    return h.hexdigest()


def cache_key(trainer) -> tuple[str, dict]:
    """(hex key, what went into it). The pair itself is keyed per row (row_ids)."""
    model = reference_model(trainer)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    quant = config.pop("quantization_config", None)
    parts = {
        "weights": weights_hash(model),
        "config": config,
        "quantization_config": quant,
        "dtype": str(model.dtype),
        "max_length": trainer.args.max_length,
        "truncation_mode": trainer.args.truncation_mode,
        "ld_alpha": trainer.args.ld_alpha,
        "trl": TESTED_TRL,
    }
    return key_of(parts), parts


def row_ids(dataset) -> list[str]:
    """One hash per pair of its prompt, chosen and rejected token ids, as DPOTrainer tokenized them."""
    table = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    columns = []
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        array = table[name].combine_chunks()
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        values = array.flatten().to_numpy(zero_copy_only=False).astype("int64")
        starts = lengths.cumsum() - lengths
        columns.append((lengths, values, starts))
    return [
        row_hash([values[starts[i] : starts[i] + lengths[i]] for lengths, values, starts in columns])
        for i in range(len(table))
    ]


def environment(trainer) -> dict:
    """Where values were computed; printed when a parity check fails, to name the difference."""
    model = reference_model(trainer)
    env = {
        "device": str(trainer.accelerator.device),
        "torch": torch.__version__,
        "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
        "machine": platform.machine(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return env


def compute_reference(trainer, dataset, indices: list[int], desc: str | None) -> tuple[list, list, list]:
    """Reference sums of `dataset[indices]` through TRL, longest pairs first (little padding), with a progress
    bar named `desc` (none for None). Returns (chosen, rejected, seconds per row) in the order of `indices`."""
    if not indices:
        return [], [], []
    subset = dataset.select(indices).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    chosen_len, rejected_len = sequence_lengths(subset, trainer.args.max_length)
    order = list(LengthSortedSampler([max(c, r) for c, r in zip(chosen_len, rejected_len)]))
    size = trainer.args.precompute_ref_batch_size or trainer.args.per_device_eval_batch_size
    chosen, rejected, seconds = [None] * len(order), [None] * len(order), [0.0] * len(order)
    model = reference_model(trainer)
    was_training = model.training
    model.eval()
    shown = desc is not None and trainer.accelerator.is_local_main_process
    bar = tqdm(range(0, len(order), size), desc=desc, disable=not shown)
    try:
        for start in bar:
            batch_rows = order[start : start + size]
            began = time.perf_counter()
            batch = trainer.data_collator([subset[i] for i in batch_rows])
            with torch.inference_mode():  # no autograd records at all (TRL's own pass runs under no_grad)
                c, r = precomputed_reference_logps(
                    trainer, {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
                )
            per_row = (time.perf_counter() - began) / len(batch_rows)
            for j, i in enumerate(batch_rows):
                chosen[i], rejected[i], seconds[i] = float(c[j]), float(r[j]), per_row
    finally:
        model.train(was_training)
    if None in chosen or None in rejected:  # every row computed, or none is used (nor stored)
        raise RuntimeError(f"reference pass computed {len(order) - chosen.count(None)} of {len(order)} pairs")
    return chosen, rejected, seconds


def _fill(trainer, store: Store, dataset, rows: list[str], name: str, env: dict) -> tuple[Store, int, float]:
    """Compute this process's share of the rows missing from `store`; (store reloaded, misses, seconds)."""
    missing = sorted({row: i for i, row in enumerate(rows) if row not in store.rows}.values())
    state = trainer.accelerator
    mine = missing[state.process_index :: state.num_processes]
    began = time.perf_counter()
    chosen, rejected, seconds = compute_reference(trainer, dataset, mine, f"reference log-probs ({name})")
    if mine:
        store.write([rows[i] for i in mine], chosen, rejected, seconds, env, expected=len(mine))
    state.wait_for_everyone()
    return (store.load() if missing else store), len(missing), time.perf_counter() - began


def default_cache_dir() -> Path:
    """$DPO_REFERENCE_CACHE, else ~/.cache/dpo-recipes/reference-logps; a set but empty variable is refused."""
    return env_path("DPO_REFERENCE_CACHE", "~/.cache/dpo-recipes/reference-logps")


def attach_reference_cache(trainer, cache_dir: str | Path | None = None) -> ReferenceCache:
    """Look up (or compute and store) the reference log-probs of the trainer's train and eval pairs and
    give them to the trainer; returns the cache, whose `parity_callback()` checks it each epoch."""
    key, parts = cache_key(trainer)
    folder = cache_folder(given_path(cache_dir, "reference_cache_dir") or default_cache_dir(), key).absolute()
    log(f"reference cache: {folder}")
    if folder.is_dir() and any(folder.iterdir()) and not is_cache_folder(folder):
        raise UserError(
            f"reference cache folder {folder} exists but is not one the reference cache made (no marker, no key.json "
            "of this key): nothing in it was read or written; move it away, or set reference_cache_dir to another folder"
        )
    store, env = Store(folder).load(), environment(trainer)

    evals = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    datasets = {"train": trainer.train_dataset, **{k: v for k, v in evals.items() if v is not None}}
    ids = {name: row_ids(dataset) for name, dataset in datasets.items()}
    planned = planned_pairs(trainer.args, len(ids["train"]), trainer.accelerator.num_processes)
    lazy = planned < len(ids["train"])  # the plan reaches fewer: its training pairs fill as training reaches them
    lacking = {row for rows in ids.values() for row in rows} - set(store.rows)
    if lacking:  # only a cache that lacks pairs is written to (a full one may be read-only or shared)
        if trainer.accelerator.is_main_process and (why := unwritable_reason(folder)) is None:
            write_key(folder, parts)
        trainer.accelerator.wait_for_everyone()
        if why := unwritable_reason(folder):
            total = len({row for rows in ids.values() for row in rows})
            raise UserError(
                f"reference cache {folder} lacks {len(lacking):,} of {total:,} pairs and cannot be written ({why}): "
                "make it writable, set reference_cache_dir to a writable folder, or set reference_cache: false"
            )
    before, misses, computed = store, 0, 0.0
    for name, dataset in datasets.items():
        if lazy and name == "train":
            continue
        store, n, seconds = _fill(trainer, store, dataset, ids[name], name, env)
        misses, computed = misses + n, computed + seconds
    hit_rows = {row for rows in ids.values() for row in rows if row in before.rows}
    hits, saved = len(hit_rows), sum(before.rows[row][2] for row in hit_rows)
    with_columns = {name: _with_columns(dataset, store, ids[name]) for name, dataset in datasets.items()}
    train = with_columns.pop("train")
    evaluation = with_columns if isinstance(trainer.eval_dataset, dict) else with_columns.get("eval")
    filler = None
    if lazy:  # the pairs a batch reaches without a value are computed before its loss, written at the step's end
        filler = LazyReference(
            ids["train"], lambda indices: compute_reference(trainer, trainer.train_dataset, indices, None), store, env
        )
    else:  # every value is in the columns already: checked once here, not in every micro-batch
        for dataset in [train, *(evaluation.values() if isinstance(evaluation, dict) else [evaluation])]:
            refuse_placeholder_columns(dataset)
    use_reference_columns(
        trainer,
        train,
        evaluation,
        collator=filler.collator(trainer.data_collator) if filler else None,
        prepare=filler.fill if filler else None,  # checks what it fills on the host: no read per batch
    )

    if trainer.accelerator.is_main_process:
        mark_used(folder)  # the last use, for python -m dpo.cache (a full hit writes nothing else)
    total = hits + misses  # distinct pairs of train + eval, filled before the first step
    if filler is not None:
        log(
            f"reference cache: {total:,} pairs filled up front ({misses:,} computed in {computed:.0f} s, {hits:,} read "
            f"from {folder}); {filler.missing():,} training pairs left to fill as training reaches them (the plan "
            f"draws {planned:,} of {len(ids['train']):,}: "
            + (
                "max_steps x batch x accumulation x processes)"
                if trainer.args.max_steps > 0
                else f"num_train_epochs {trainer.args.num_train_epochs:g})"
            )
        )
    elif misses == 0:
        log(f"reference cache: hit, {total:,} pairs read from {folder}; saved ~{saved:.0f} s of reference forwards")
    else:
        log(
            f"reference cache: {'miss' if hits == 0 else 'partial hit'}, computed {misses:,} of {total:,} pairs in "
            f"{computed:.0f} s (stored in {folder}; later runs reuse them)"
            + (f"; saved ~{saved:.0f} s on the {hits:,} cached" if hits else "")
        )
    return ReferenceCache(trainer, store, env, ids["train"], hits=hits, misses=misses, saved_s=saved, lazy=filler)


def _with_columns(dataset, store: Store, rows: list[str]):
    """`dataset` with the reference columns: cached values, PLACEHOLDER for a pair still to fill (reflazy.py)."""
    dataset = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    chosen, rejected = training_columns(store, rows)
    return dataset.add_column(COLUMNS[0], chosen).add_column(COLUMNS[1], rejected)


@dataclass
class ReferenceCache:
    trainer: object
    store: Store
    env: dict
    train_rows: list[str]
    hits: int = 0
    misses: int = 0
    saved_s: float = 0.0
    lazy: LazyReference | None = None  # fills the training pairs not cached as training reaches them

    def current_store(self) -> Store:
        """The store as this run left it so far: with the pairs filled as training reached them."""
        return self.lazy.store if self.lazy is not None else self.store

    def parity(self, epoch: int, n: int = PARITY_ROWS) -> tuple[float, int]:
        """Recompute `n` random cached training pairs; raise UserError beyond TOLERANCE. Returns the worst
        |difference| / allowed, reduced over processes (so every process stops together), and how many pairs
        were recomputed (fewer than `n` while fewer are cached)."""
        trainer, accelerator, store = self.trainer, self.trainer.accelerator, self.current_store()
        seed = trainer.args.seed * 1_000_003 + epoch * 1_009 + accelerator.process_index
        generator = torch.Generator().manual_seed(seed)
        cached = [i for i, row in enumerate(self.train_rows) if row in store.rows]  # every pair, once all are filled
        picks = [cached[j] for j in torch.randperm(len(cached), generator=generator)[:n].tolist()]
        chosen, rejected, _ = compute_reference(trainer, trainer.train_dataset, picks, "reference parity check")
        rtol, atol = TOLERANCE["half" if trainer.args.bf16 or trainer.args.fp16 else "fp32"]
        worst, worst_at = 0.0, None
        for i, c, r in zip(picks, chosen, rejected):
            cached_c, cached_r, _, part = store.rows[self.train_rows[i]]
            for new, old in ((c, cached_c), (r, cached_r)):
                ratio = abs(new - old) / (rtol * abs(old) + atol)
                if ratio > worst:
                    worst, worst_at = ratio, (i, new, old, part)
        worst_all = float(accelerator.reduce(torch.tensor([worst], device=accelerator.device), "max").item())
        if worst_all > 1:
            raise UserError(
                self._drift_message(worst_at, rtol, atol)
                if worst > 1
                else "reference cache parity check failed on another process (see its message)"
            )
        return worst_all, len(picks)

    def _drift_message(self, worst_at, rtol: float, atol: float) -> str:
        i, new, old, part = worst_at
        then = self.current_store().environment_of(part)
        changed = [f"{k} {then.get(k)} -> {v}" for k, v in self.env.items() if then.get(k) != v]
        cause = (
            "computed with a different " + ", ".join(changed)
            if changed
            else "same key and environment: the cache files were changed after they were written, or the "
            "reference forward changed without its weights (a kernel, a patched model class, adapters not disabled)"
        )
        return (
            f"reference cache parity check failed: training pair {i} has reference log-prob {new:.4f} now, "
            f"{old:.4f} cached in {self.store.folder / part} (allowed {rtol:g} relative + {atol:g} nats). "
            f"Likely cause: {cause}. Delete {self.store.folder} to recompute, or set reference_cache: false"
        )

    def callback(self) -> TrainerCallback:
        """The parity check at each epoch's start; with the lazy path, each step's filled pairs written at its end."""
        cache = self

        class ReferenceCacheCallback(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                worst, n = cache.parity(int(state.epoch or 0))
                if n:
                    log(f"reference cache parity: {n} pairs recomputed, worst {worst:.2g} of the tolerance")
                else:
                    log("reference cache parity: no training pair cached yet (they fill as training reaches them)")

            def on_step_end(self, args, state, control, **kwargs):
                if cache.lazy is not None:
                    cache.lazy.flush()

            def on_train_end(self, args, state, control, **kwargs):
                if cache.lazy is not None:
                    cache.lazy.flush()

        return ReferenceCacheCallback()
