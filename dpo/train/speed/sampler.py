"""Length-grouped batches of preference pairs: the same pairs every epoch, far less padding.

A DPO batch of B pairs is one tensor of 2B sequences (B chosen, B rejected), padded to the
longest of them. In random batches of real data (HH-RLHF: 20 to 500+ tokens) most of that
tensor is padding, and padding costs as much compute as real tokens. This sampler:

  1. shuffles the pairs (seeded by `seed` and the epoch: reproducible, different each epoch);
  2. cuts the shuffled order into mega-batches of `mega_batch_mult` optimizer micro-steps;
  3. sorts each mega-batch by pair length (the longer of prompt+chosen and prompt+rejected,
     capped at max_length) and cuts it into steps of `batch_size * world_size` pairs;
  4. shuffles the steps of the whole epoch, keeping a short last step at the end.

Under data parallelism accelerate hands batch k of this order to process k % world_size, so
the world_size batches of one step come from the same sorted stretch: every process gets pairs
of similar length and none waits on a long straggler. The order depends only on (seed, epoch,
lengths), never on the global RNG, so resuming mid-epoch (transformers skips the batches
already seen) replays exactly the same order. Evaluation sorts fully by length instead.

Set `train_sampling_strategy: group_by_length` (transformers' own flag) to use it.
"""

from __future__ import annotations

import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler

from dpo.compat import use_samplers

MEGA_BATCH_MULT = 50  # steps per sorted mega-batch, as transformers' LengthGroupedSampler


def sequence_lengths(dataset, max_length: int | None) -> tuple[list[int], list[int]]:
    """(prompt+chosen, prompt+rejected) token counts per pair of a dataset tokenized by DPOTrainer,
    capped at `max_length` as the collator truncates. Read from the Arrow columns, no Python loop."""
    table = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    prompt = pc.list_value_length(table["prompt_ids"])
    lengths = []
    for column in ("chosen_ids", "rejected_ids"):
        total = pc.add(prompt, pc.list_value_length(table[column]))
        if max_length is not None:
            total = pc.min_element_wise(total, max_length)
        lengths.append(total.to_pylist())
    return lengths[0], lengths[1]


def padding_fraction(chosen: list[int], rejected: list[int], order: list[int], batch_size: int) -> float:
    """Share of the padded batch tensors that is padding, batching `order` in runs of `batch_size` pairs."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(max(chosen[i], rejected[i]) for i in batch)
        padded += 2 * len(batch) * longest
        real += sum(chosen[i] + rejected[i] for i in batch)
    return 1 - real / padded if padded else 0.0


def padding_floor(chosen: list[int], rejected: list[int]) -> float:
    """The padding no batching can remove: each pair's shorter sequence padded to its longer one
    (the padding fraction of batches of one pair)."""
    return padding_fraction(chosen, rejected, list(range(len(chosen))), 1)


class PairLengthGroupedSampler(Sampler[int]):
    """Indices of pairs in length-grouped, shuffled order (see the module docstring)."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        mega_batch_mult: int = MEGA_BATCH_MULT,
    ):
        self.lengths = list(lengths)
        self.step = batch_size * max(1, world_size)  # pairs per micro-step over all processes
        self.mega = self.step * mega_batch_mult
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by transformers at every epoch start (also after skipping batches on resume)."""
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # any injective mix of the two
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        steps = []
        for start in range(0, len(perm), self.mega):
            mega = sorted(perm[start : start + self.mega], key=lambda i: -self.lengths[i])
            steps += [mega[s : s + self.step] for s in range(0, len(mega), self.step)]
        # A short step can only be the very last one; it stays last so every other step stays whole.
        last = [steps.pop()] if steps and len(steps[-1]) < self.step else []
        shuffled = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        return [i for step in shuffled + last for i in step]

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)


class LengthSortedSampler(Sampler[int]):
    """Evaluation order: longest pair first, ties by index (deterministic; metrics are order-free)."""

    def __init__(self, lengths: list[int]):
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def grouping_report(dataset, max_length: int | None, batch_size: int, world_size: int = 1, seed: int = 0) -> str:
    """One log line: the padding share of random batches against length-grouped ones (epoch 0)."""
    chosen, rejected = sequence_lengths(dataset, max_length)
    pair = [max(c, r) for c, r in zip(chosen, rejected)]
    grouped = PairLengthGroupedSampler(pair, batch_size, world_size, seed).order(0)
    shuffled = torch.randperm(len(pair), generator=torch.Generator().manual_seed(seed)).tolist()
    before = padding_fraction(chosen, rejected, shuffled, batch_size)
    after = padding_fraction(chosen, rejected, grouped, batch_size)
    floor = padding_floor(chosen, rejected)
    return (
        f"length-grouped batches: padding {100 * after:.1f}% of batch tokens (random batches: {100 * before:.1f}%; "
        f"{100 * floor:.1f}% is the chosen/rejected length difference within pairs, which no batching removes)"
    )


def install_length_grouping(trainer) -> str:
    """Make the trainer batch pairs by length (training: grouped and shuffled; evaluation: sorted).
    Returns the padding report line."""
    args = trainer.args
    seed = args.data_seed if args.data_seed is not None else args.seed

    def pair_lengths(dataset):
        chosen, rejected = sequence_lengths(dataset, args.max_length)
        return [max(c, r) for c, r in zip(chosen, rejected)]

    use_samplers(
        trainer,
        train_sampler=lambda dataset: PairLengthGroupedSampler(
            pair_lengths(dataset), args.per_device_train_batch_size, args.world_size, seed
        ),
        eval_sampler=lambda dataset: LengthSortedSampler(pair_lengths(dataset)),
    )
    return grouping_report(
        trainer.train_dataset, args.max_length, args.per_device_train_batch_size, args.world_size, seed
    )
