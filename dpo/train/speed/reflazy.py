"""Reference log-probs filled as training reaches the pairs: the reference cache's lazy path
(dpo/train/speed/refcache.py).

A run whose plan reaches only some training pairs (max_steps x per_device_train_batch_size x
gradient_accumulation_steps x processes below the training set: a smoke run, a short trial) does not
score the reference of every pair before its first step. refcache.py then fills only the held-out pairs
up front (evaluation reads them whole) and hands the trainer training columns in which a pair the cache
lacks holds PLACEHOLDER (NaN). TRL's contract is unchanged: the dataset carries ref_chosen_logps /
ref_rejected_logps, the collator batches them and the loss reads them from the batch.

Each batch is completed before its loss. The collator (`MarkMissing`) marks every batch position that holds
a placeholder with the pair's index in the training set, or NOT_TRAINING when no training pair has its row
(the batch key FILL, a list of ints that stays on the host: the model never sees it); before the loss
(RecipeDPOTrainer.prepare_loss_inputs, dpo/compat.py) `fill` takes the value of a pair filled earlier in this
run, or computes it with the function the up-front fill uses (refcache.compute_reference: no grad, eval mode,
adapters disabled, longest first), and returns the batch with the values in place. The values filled in an
optimizer step are written as one part file at the step's end (`flush`, through refstore.Store.write:
checksummed, atomic): its work is that step's pairs, whatever the size of the data set. A long run adds one
part per step, not per micro-batch; a crash loses at most one step's values, which the next run computes
again. The next run reads every part and fills only the pairs still missing.

The guard against a placeholder reaching the loss reads nothing back from the device: the collator looks at
every example's values where they are (Python floats, on the host), so a batch without FILL holds none, and
`fill` checks each value it puts in on the host before it is put in (`refuse_unfilled`: the run stops in one
line). Reading the batch's columns instead (`torch.isfinite(...).sum()`) costs a host sync per micro-batch on a
GPU. The up-front path checks its columns once, before the first step (`refuse_placeholder_columns`).

Why not replay the sampler's order and fill those pairs up front: the order comes from transformers'
and accelerate's internals (seeded samplers, batches skipped on resume, the last batch padded from the
start under N processes), which move between versions, and a wrong replay would show only at the loss.

Values: a pair's sum is computed in a batch of the other missing pairs of its micro-batch, not in the
batch a full up-front fill would have put it in. With right padding and a causal mask a row's tokens
never see another row or the padding, so the value changes only by the kernels' round-off for another
batch shape, the difference refcache.TOLERANCE bounds and each epoch's parity check measures
(tests/train/speed/test_reflazy.py measures it against a full fill on the tiny model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dpo.errors import RunStopped
from dpo.train.speed.refstore import COLUMNS, Store, row_hash

PLACEHOLDER = float("nan")  # a training pair's value until it is filled; never a log-prob the store holds
FILL = "ref_fill_index"  # batch key: per position, the pair's training-set index to fill, or -1 (a value is there)
NOT_TRAINING = -2  # FILL for a placeholder whose row is no training pair's (nothing can fill it: the run stops)


def planned_pairs(args, pairs: int, processes: int) -> int:
    """How many training pairs the run's plan draws (with repeats across epochs), at most `pairs` distinct:
    max_steps x per_device_train_batch_size x gradient_accumulation_steps x processes when max_steps is set,
    else the fraction num_train_epochs of an epoch (every pair from one epoch on)."""
    if args.max_steps > 0:
        drawn = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    else:
        drawn = math.ceil(args.num_train_epochs * pairs)
    return min(drawn, pairs)


def _stopped(bad: int, name: str) -> RunStopped:
    """The one line that stops a run whose batch would bring `bad` pairs without a reference value to the loss
    (exit status 1): DPO on a placeholder (NaN) would train on nothing silently, or end in a NaN loss."""
    return RunStopped(
        f"{bad} pair(s) of a batch reached the loss without a reference value ({name} missing or a "
        "placeholder) and nothing was trained on them: a bug in the reference cache "
        "(dpo/train/speed/reflazy.py); set reference_cache: false to train without it",
        1,
    )


def refuse_placeholder_columns(dataset) -> None:
    """The up-front path: every value of `dataset`'s reference columns checked once, on the host, before the
    first step (checked per batch on the device it would cost a host sync in every micro-batch on a GPU)."""
    if dataset is not None:
        for name in COLUMNS:
            values = dataset[name] if name in dataset.column_names else None
            bad = len(dataset) if values is None else sum(not math.isfinite(v) for v in values)
            if bad:
                raise _stopped(bad, name)


def refuse_unfilled(values: list) -> None:
    """`fill`'s check, on the host: each (chosen, rejected) it is about to put in a batch is a pair of finite
    floats; None (nothing to fill it with) or a non-finite value stops the run before the loss."""
    for k, name in enumerate(COLUMNS):
        if bad := sum(v is None or not math.isfinite(v[k]) for v in values):
            raise _stopped(bad, name)


def training_columns(store: Store, rows: list[str]) -> tuple[list[float], list[float]]:
    """(ref_chosen_logps, ref_rejected_logps) of `rows`: the cached value, or PLACEHOLDER for a pair not yet filled."""
    values = [store.rows.get(row, (PLACEHOLDER, PLACEHOLDER)) for row in rows]
    return [v[0] for v in values], [v[1] for v in values]


def _float32(value: float) -> float:
    """The value as the store keeps it (float32), so the loss uses exactly what the part file holds."""
    return float(np.float32(value))


@dataclass(frozen=True)
class MarkMissing:
    """TRL's collator, plus FILL where an example holds a placeholder. Only marks: the collator may run in a
    DataLoader worker (so it holds nothing it cannot pickle) or a batch ahead, so the values are put in by
    LazyReference.fill, in the training process."""

    collator: Callable  # TRL's collator
    index: dict  # row id -> a training index with it

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        if not examples or COLUMNS[0] not in examples[0]:  # the reference pass's own batches carry no values
            return batch
        marks = [self.index.get(_row(example), NOT_TRAINING) if _placeholder(example) else -1 for example in examples]
        # a list, not a tensor: the trainer moves tensors to the device, and reading them back would sync
        return {**batch, FILL: marks} if max(marks) != -1 else batch


def _placeholder(example: dict) -> bool:
    return any(not math.isfinite(example[name]) for name in COLUMNS)


def _row(example: dict) -> str:
    return row_hash([np.asarray(example[k], dtype=np.int64) for k in ("prompt_ids", "chosen_ids", "rejected_ids")])


@dataclass
class LazyReference:
    """Fills the training pairs a batch reaches without a cached value (see the module docstring)."""

    rows: list[str]  # row id of each training pair, by index
    compute: Callable  # indices -> (chosen, rejected, seconds per pair): refcache.compute_reference on the train set
    store: Store  # what is on disk: read at the start (handed over by refcache.py), each flushed part added to it
    env: dict  # written into each part (refcache.environment)
    index: dict = field(default_factory=dict)  # row id -> a training index with it
    pending: dict = field(default_factory=dict)  # row id -> (chosen, rejected, seconds) computed, not yet written
    computed: int = 0  # pairs computed by this run's fills

    def __post_init__(self):
        self.index = {row: i for i, row in enumerate(self.rows)}

    def missing(self) -> int:
        """Distinct training pairs with no value yet."""
        return len({row for row in self.rows if row not in self.store.rows and row not in self.pending})

    def collator(self, collator: Callable) -> MarkMissing:
        """`collator` (TRL's), marking the examples this fills."""
        return MarkMissing(collator, self.index)

    def _value(self, i: int) -> tuple | None:
        """(chosen, rejected) of training pair `i`: computed in this run, or stored; None for NOT_TRAINING."""
        if i < 0:
            return None
        row = self.rows[i]
        return self.pending.get(row) or self.store.rows.get(row)

    def fill(self, inputs: dict) -> dict:
        """The batch without FILL, each marked position holding its pair's reference values (filled before, or
        computed now), each checked on the host before it is put in (`refuse_unfilled`); a batch without FILL
        holds no placeholder (MarkMissing looked at every example) and passes untouched, nothing read."""
        if FILL not in inputs:
            return inputs
        marks = inputs[FILL]
        inputs = {k: v for k, v in inputs.items() if k != FILL}
        todo = sorted({i for i in marks if i >= 0 and self._value(i) is None})
        if todo:
            chosen, rejected, seconds = self.compute(todo)
            for i, c, r, s in zip(todo, chosen, rejected, seconds):
                self.pending[self.rows[i]] = (_float32(c), _float32(r), s)
            self.computed += len(todo)
        at = [k for k, i in enumerate(marks) if i != -1]
        values = [self._value(marks[k]) for k in at]
        refuse_unfilled(values)
        device = inputs[COLUMNS[0]].device
        where = torch.tensor(at, device=device)
        for k, name in enumerate(COLUMNS):  # one host-to-device copy per column, no read back
            filled = torch.tensor([v[k] for v in values], dtype=inputs[name].dtype, device=device)
            inputs[name] = inputs[name].index_put((where,), filled)
        return inputs

    def flush(self) -> int:
        """Write the values computed since the last flush as one part file and add them to the store; returns how
        many. Its work is those values only: the store's rows are added to, never copied."""
        if not self.pending:
            return 0
        rows, values = list(self.pending), list(self.pending.values())
        part = self.store.write(
            rows, [v[0] for v in values], [v[1] for v in values], [v[2] for v in values], self.env, expected=len(rows)
        )
        self.store.rows.update((row, (*value, part)) for row, value in zip(rows, values))
        self.pending = {}
        return len(rows)
