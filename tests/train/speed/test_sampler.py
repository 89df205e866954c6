"""dpo/train/speed/sampler.py: length-grouped pair batches are seeded and reproducible, a new order each epoch,
pad far less than random batches, keep one step's per-process batches alike under data
parallelism, and survive transformers' resume path (skip batches, then set the epoch)."""

import random

import pytest
from accelerate import skip_first_batches
from helpers import pairs, recipe_trainer

from dpo.train.speed.sampler import LengthSortedSampler, PairLengthGroupedSampler, padding_floor, padding_fraction


def hh_like_lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Token counts shaped like HH-RLHF pairs: a long-tailed shared prompt, two replies, capped at 512."""
    rng = random.Random(seed)
    prompt = [int(rng.lognormvariate(4.3, 0.8)) + 8 for _ in range(n)]
    return tuple([min(512, p + int(rng.lognormvariate(3.6, 0.7)) + 2) for p in prompt] for _ in range(2))


def test_padding_fraction_by_hand():
    # batch 1: pairs 0, 1 -> longest 5, 4 sequences x 5 = 20 slots, 3+5+2+2 = 12 tokens; batch 2: pair 2 alone, full
    assert padding_fraction([3, 2, 4], [5, 2, 4], [0, 1, 2], 2) == pytest.approx(8 / 28)
    assert padding_fraction([4, 4], [4, 4], [0, 1], 2) == 0


def test_seeded_reproducible_and_a_new_order_each_epoch():
    lengths = [max(c, r) for c, r in zip(*hh_like_lengths(1000))]
    a = PairLengthGroupedSampler(lengths, batch_size=4, seed=1)
    b = PairLengthGroupedSampler(lengths, batch_size=4, seed=1)
    assert a.order(0) == b.order(0) and sorted(a.order(0)) == list(range(1000))
    assert a.order(1) != a.order(0) and sorted(a.order(1)) == list(range(1000))
    assert PairLengthGroupedSampler(lengths, batch_size=4, seed=2).order(0) != a.order(0)
    a.set_epoch(3)
    assert list(a) == b.order(3) and len(a) == 1000


def test_grouping_cuts_padding_to_near_the_within_pair_floor():
    chosen, rejected = hh_like_lengths(2000)
    lengths = [max(c, r) for c, r in zip(chosen, rejected)]
    shuffled = list(range(2000))
    random.Random(0).shuffle(shuffled)
    before = padding_fraction(chosen, rejected, shuffled, 4)
    after = padding_fraction(chosen, rejected, PairLengthGroupedSampler(lengths, 4, seed=0).order(0), 4)
    floor = padding_floor(chosen, rejected)  # chosen vs rejected within a pair: no order removes it
    assert before > 0.4 and after < floor + 0.03 and before > 3 * after
    # evaluation: fully sorted, longest first
    assert [lengths[i] for i in LengthSortedSampler(lengths)] == sorted(lengths, reverse=True)


def test_under_data_parallelism_one_steps_batches_come_from_one_sorted_stretch():
    """accelerate gives batch k to process k % 2: the two batches of a step must be alike in length,
    and the order must still be whole steps (a short step only at the very end)."""
    chosen, rejected = hh_like_lengths(1003)
    lengths = [max(c, r) for c, r in zip(chosen, rejected)]
    order = PairLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0).order(0)
    steps = [order[s : s + 8] for s in range(0, len(order), 8)]
    assert all(len(step) == 8 for step in steps[:-1]) and len(steps[-1]) == 1003 % 8
    as_one = [padding_fraction(chosen, rejected, step, 8) for step in steps[:-1]]  # a step's 2 batches as one
    assert sum(as_one) / len(as_one) < padding_floor(chosen, rejected) + 0.03


def test_trainer_uses_it_and_resume_reaches_the_epoch(tiny_model_dir, tmp_path, capsys):
    trainer = recipe_trainer(
        tiny_model_dir, tmp_path / "t", train=pairs(12), train_sampling_strategy="group_by_length", max_length=64
    )
    assert "length-grouped batches: padding" in capsys.readouterr().out
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, PairLengthGroupedSampler)
    assert isinstance(trainer.get_eval_dataloader().batch_sampler.sampler, LengthSortedSampler)
    # transformers' resume: skip the batches already trained, then set the epoch, then iterate
    resumed = skip_first_batches(loader, 2)
    resumed.set_epoch(1)
    seen = [
        row[mask.bool()].tolist()
        for batch in resumed
        for row, mask in zip(batch["input_ids"][:2], batch["attention_mask"][:2])  # the 2 chosen sequences
    ]
    data = trainer.train_dataset
    want = [(data[i]["prompt_ids"] + data[i]["chosen_ids"])[:64] for i in sampler.order(1)[4:]]
    assert sampler.epoch == 1 and seen == want and sampler.order(1) != sampler.order(0)
