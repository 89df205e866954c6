"""per_device_train_batch_size: auto, the decision (dpo/train/speed/autobatch.py): pure functions of shapes,
probe readings and a budget, against numbers worked by hand in each test. Sizes in GiB / MiB / KiB are exact
powers of two, so every expected value below is exact (no float tolerance)."""

from __future__ import annotations

import pytest

from dpo.errors import UserError
from dpo.train.speed.autobatch import (
    FIXED_TOKENS,
    GIB,
    Budget,
    Measured,
    analytic_per_token,
    budget_for,
    decide,
    per_token_from_probe,
    probe_tokens_for,
    split,
)

KIB, MIB = 2**10, 2**20
# weights etc. 2 GiB resident, 0.5 GiB allocated by any step, 2^26 trainable parameters x 8 bytes of AdamW
# state = 0.5 GiB: fixed = 3 GiB
RESIDENT, STEP_FIXED, TRAINABLE = 2 * GIB, GIB // 2, 2**26
TOKENS = 1024  # the longest sequence: a pair is 2 x 1024 = 2048 tokens


def measured(on: float, off: float | None) -> Measured:
    return Measured(RESIDENT, STEP_FIXED, on, off)


TWENTY = Budget(20 * GIB, False, 20 * GIB)  # 20 GiB free, no cap


def run(on, off, budget=TWENTY, micro=2, accum=32, ckpt=True, resumed=None):
    return decide(measured(on, off), budget, TOKENS, TRAINABLE, micro, accum, ckpt, resumed)


def test_the_margin_is_a_tenth_of_the_budget_and_at_least_one_gib():
    assert Budget(20 * GIB, False, 20 * GIB).margin == 2 * GIB  # 10% of 20
    assert Budget(5 * GIB, False, 5 * GIB).margin == GIB  # 10% would be 0.5: the 1 GiB floor
    assert Budget(20 * GIB, False, 20 * GIB).plan == 18 * GIB


def test_a_cap_is_planned_for_but_never_above_what_the_device_has_free():
    assert budget_for(80 * GIB, 15) == Budget(15 * GIB, True, 80 * GIB)  # a T4's 15 GiB on a larger GPU
    assert budget_for(10 * GIB, 15) == Budget(10 * GIB, True, 10 * GIB)
    assert budget_for(10 * GIB, None) == Budget(10 * GIB, False, 10 * GIB)


def test_checkpointing_stays_on_where_the_step_model_says_it_is_faster():
    # plan 18 GiB - fixed 3 GiB = 15 GiB for pairs.
    # with checkpointing: 64 KiB/token x 2048 = 128 MiB per pair -> 15 GiB / 0.125 GiB = 120 fit
    # without: 1 MiB/token x 2048 = 2 GiB per pair -> 7 fit; 64 = 4 x 16 (8 is not <= 7; 4 >= 7/2)
    # step cost: on  1 micro-batch  x 9362 + 64 x 2048 x 4/3 = 184,124.7 token-equivalents
    #            off 16 micro-batches x 9362 + 64 x 2048       = 280,864
    d = run(on=64 * KIB, off=1 * MIB)
    assert (d.fits_on, d.fits_off) == (120, 7)
    assert (d.micro_batch, d.accumulation, d.checkpointing) == (64, 1, True)
    assert d.per_pair == 128 * MIB and d.planned_peak == 3 * GIB + 64 * 128 * MIB  # 11 GiB
    assert FIXED_TOKENS == 9362


def test_checkpointing_goes_off_where_the_step_fits_without_it():
    # without: 96 KiB/token x 2048 = 192 MiB per pair -> 15 GiB / 192 MiB = 80 >= 64: one micro-batch per step
    d = run(on=64 * KIB, off=96 * KIB)
    assert d.fits_off == 80
    assert (d.micro_batch, d.accumulation, d.checkpointing) == (64, 1, False)


def test_checkpointing_goes_off_under_a_t4_cap_where_the_model_says_faster():
    # cap 15 GiB: margin 1.5 GiB, plan 13.5 GiB, 10.5 GiB for pairs.
    # on: 128 MiB per pair -> 84 fit -> 64 x 1: 9362 + 174,762.7 = 184,124.7
    # off: 256 KiB/token x 2048 = 512 MiB per pair -> 21 fit -> 16 x 4 (16 divides 64, 16 >= 21/2):
    #      4 x 9362 + 131,072 = 168,520: cheaper, so off
    d = run(on=64 * KIB, off=256 * KIB, budget=budget_for(80 * GIB, 15))
    assert (d.fits_on, d.fits_off) == (84, 21)
    assert (d.micro_batch, d.accumulation, d.checkpointing) == (16, 4, False)
    line = d.line()
    assert "\n" not in line
    for words in ("cap 15.00 GiB", "(device 80.00 GiB free)", "planning for 13.50 GiB", "margin 1.50 GiB"):
        assert words in line, line
    for words in ("0.50 GiB per pair at 1024 tokens", "micro-batch 16 x 4", "64 pairs per step", "checkpointing off"):
        assert words in line, line


def test_checkpointing_configured_off_stays_off_where_a_pair_fits_without_it():
    d = run(on=64 * KIB, off=1 * MIB, ckpt=False)  # the first case's numbers: on would be faster, the user said off
    assert (d.micro_batch, d.accumulation, d.checkpointing) == (4, 16, False)


def test_checkpointing_is_turned_on_where_not_one_pair_fits_without_it():
    # without: 8 MiB/token x 2048 = 16 GiB per pair > 15 GiB; with: 120 fit
    for ckpt in (True, False):
        d = run(on=64 * KIB, off=8 * MIB, ckpt=ckpt)
        assert (d.fits_off, d.micro_batch, d.accumulation, d.checkpointing) == (0, 64, 1, True)
    d = run(on=64 * KIB, off=None)  # the probe without checkpointing ran out of memory
    assert (d.fits_off, d.checkpointing) == (0, True)


def test_one_pair_that_does_not_fit_is_refused_in_one_line_with_the_numbers():
    # 8 MiB/token x 2048 = 16 GiB per pair with checkpointing: 3 + 16 = 19 GiB > the 18 GiB plan
    with pytest.raises(UserError) as err:
        run(on=8 * MIB, off=16 * MIB)
    message = str(err.value)
    assert "\n" not in message
    for words in (
        "1024 tokens",
        "16.00 GiB per pair",
        "19.00 GiB",
        "18.00 GiB",
        "max_length",
        "auto_batch_memory_gib",
    ):
        assert words in message, message


@pytest.mark.parametrize(
    "pairs, fits, expected",
    [
        (64, 120, (64, 1)),  # everything in one micro-batch
        (64, 7, (4, 16)),  # divisors of 64 up to 7: 1, 2, 4
        (64, 21, (16, 4)),
        (48, 10, (8, 6)),  # divisors of 48 up to 10: ..., 6, 8
        (61, 20, (20, 3)),  # 61 is prime: 1 is under 20 / 2, so 20 x round(61 / 20) = 60 pairs, said in the line
    ],
)
def test_split_takes_the_largest_divisor_that_fits(pairs, fits, expected):
    assert split(pairs, fits) == expected


def test_the_pairs_per_step_are_kept_wherever_a_divisor_is_near_what_fits():
    for pairs in range(1, 130):
        for fits in range(1, 140):
            micro, accum = split(pairs, fits)
            assert 1 <= micro <= fits
            if micro * accum != pairs:  # only where no divisor reaches half of what fits, off by under a micro-batch
                assert max(d for d in range(1, fits + 1) if pairs % d == 0) * 2 < fits
                assert abs(micro * accum - pairs) <= micro / 2


def test_a_step_that_cannot_be_split_exactly_says_so():
    # 61 pairs per step configured (1 x 61); 128 MiB per pair -> 120 fit >= 61: one micro-batch of 61, exact
    assert run(on=64 * KIB, off=None, micro=1, accum=61).micro_batch == 61
    # a 5 GiB plan - 3 GiB fixed = 2 GiB -> 16 fit; 61 has no divisor near 16: 16 x 4 = 64 pairs
    d = run(on=64 * KIB, off=None, micro=1, accum=61, budget=Budget(6 * GIB, False, 6 * GIB))
    assert (d.micro_batch, d.accumulation) == (16, 4)
    assert "not 61" in d.line() and "64 pairs per step" in d.line()


def test_a_resumed_run_keeps_its_checkpoints_micro_batch_where_it_fits():
    # the first case's numbers (120 fit with checkpointing, 7 without, fresh pick 64 x 1 with checkpointing)
    kept = run(on=64 * KIB, off=1 * MIB, resumed=8)  # 8 > 7: only with checkpointing
    assert (kept.micro_batch, kept.accumulation, kept.checkpointing) == (8, 8, True)
    assert "the resumed checkpoint's micro-batch 8 kept" in kept.line()
    kept = run(on=64 * KIB, off=1 * MIB, resumed=4)  # 4 <= 7: fits without, the same 16 micro-batches, faster
    assert (kept.micro_batch, kept.accumulation, kept.checkpointing) == (4, 16, False)
    for resumed in (128, 3):  # does not fit; does not divide 64: a fresh pick, and the line says the order differs
        fresh = run(on=64 * KIB, off=1 * MIB, resumed=resumed)
        assert (fresh.micro_batch, fresh.accumulation) == (64, 1) and "order differs" in fresh.line()


def test_the_probe_slope_is_one_pair_and_the_intercept_what_any_step_allocates():
    # 100 tokens per sequence: a pair is 200 tokens at 7 bytes each = 1400; any step allocates 500
    assert per_token_from_probe(500 + 1400, 500 + 2 * 1400, 100) == (500, 7.0)
    # the allocator reused memory between the two: the slope is not trusted below 1 byte per token
    assert per_token_from_probe(3000, 2900, 100) == (3100, 1.0)
    # ... and where the probe passes its analytic estimate, that is what plans the run: not 1 byte per token, which
    # would let any micro-batch fit
    assert per_token_from_probe(3000, 2900, 100, fallback=9000.0) == (3100, 9000.0)
    assert per_token_from_probe(500 + 1400, 500 + 2 * 1400, 100, fallback=9000.0) == (500, 7.0)  # a real slope wins


def test_the_probe_without_checkpointing_runs_shorter_where_the_run_would_not_fit_twice():
    # 2 pairs x 2 sequences x 1 MiB/token at most half of 4 GiB: 2 GiB / 4 MiB = 512 tokens
    assert probe_tokens_for(1024, 4 * GIB, MIB) == 512
    assert probe_tokens_for(1024, 40 * GIB, MIB) == 1024  # the run's own length where it fits
    assert probe_tokens_for(1024, 0, MIB) == 16 and probe_tokens_for(1024, MIB, MIB) == 16


def test_the_analytic_guess_at_phi2_shapes():
    # phi-2: hidden 2560, 32 layers, vocab 51200.
    # checkpointing, fused head: 2 x 2560 x 32 + 34 x 2560 + 8 x 2560 = 163,840 + 87,040 + 20,480
    assert analytic_per_token(2560, 32, 51200, True, True) == 271_360
    # neither: 34 x 2560 x 32 + 8 x 51200 = 2,785,280 + 409,600
    assert analytic_per_token(2560, 32, 51200, False, False) == 3_194_880
