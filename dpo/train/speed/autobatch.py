"""`per_device_train_batch_size: auto`: the largest micro-batch that fits the GPU, the pairs per optimizer step kept.

The choice is made before training, from a memory model of the run's shapes whose per-pair cost is measured on the
device by a short probe (dpo/train/speed/autobatch_probe.py), never by running into out-of-memory. Everything here is
a pure function of shapes, measurements and a budget, so the tests work the numbers by hand on a CPU.

The memory model of one micro-batch of B pairs, each two sequences (chosen, rejected) of at most L tokens:

    peak(B) = resident + optimizer + step_fixed + B * per_pair(L)
      resident     what the process holds before the probe (measured): the weights (4-bit: ~0.55 byte per parameter
                   with the quantization constants; bf16: 2 bytes), the LoRA parameters, buffers
      optimizer    AdamW's two fp32 moments per trainable parameter (8 bytes each), allocated at the first step
      step_fixed   what a step allocates whatever B is (measured: the intercept of the probe): LoRA gradients,
                   the dequantized weight of the layer being computed
      per_pair(L)  activations kept for the backward pass, the LM head's logits (TRL's fused head builds them a
                   tile at a time) and the reference forward (no grad): measured as a per-token coefficient
                   (the probe's slope between 1 and 2 pairs, over its 2 x probe_tokens tokens) times 2 L.
                   Linear in L with SDPA attention (no L x L score matrix is kept); eager attention would add an
                   L^2 term the linear extrapolation misses: the probe then runs at the run's own length.

L is the longest pair in the data after truncation (max_length), so every batch fits, the longest included.

The budget: `auto_batch_memory_gib` where given (a 15 GiB T4 simulated on a larger GPU), else what the device has
free for this process; less a margin of max(1 GiB, 10%) of it. Why: torch.cuda.max_memory_allocated, which the probe
reads, does not count the caching allocator's rounding and fragmentation (blocks are rounded to 512 B and carved out
of 2 MiB / 20 MiB segments; a few percent in practice), nor the CUDA context and cuBLAS workspaces outside the
allocator (about 0.3-0.6 GiB), nor evaluation batches (no gradient: smaller than a training batch of the same size).

Checkpointing (the rule): the largest fitting micro-batch is found with and without activation checkpointing. It
is on where not one pair fits without it; off where the micro-batch that fits without it gives the configured pairs
per step (one micro-batch per step), or where the user turned it off; else off where the step-time model says no
slower: a step costs
`micro-batches x FIXED_TOKENS + tokens x (4/3 with checkpointing, 1 without)` token-equivalents. 4/3: checkpointing
runs each layer's forward again in the backward, one more forward on top of forward + backward (about 3 forwards).
FIXED_TOKENS: the fixed cost of a micro-batch in tokens' worth of time, from the one GPU run (an H200, phi-2 shapes,
bf16, checkpointing on; benchmarks/results/gpu/): 0.44 s fixed per micro-batch and 47 us per token, 0.44 / 47e-6 =
9362 tokens.

The micro-batch divides the configured pairs per step (P = configured micro-batch x gradient_accumulation_steps):
the largest divisor of P that fits. Where that divisor is under half of what fits (P prime, say), the largest
fitting micro-batch is taken with round(P / B) accumulation steps, and the line says the pairs per step moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo.errors import UserError

GIB = 2**30
MARGIN_FRACTION, MARGIN_MIN = 0.10, 1 * GIB  # why: module docstring
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter
FIXED_TOKENS = round(0.44 / 47e-6)  # a micro-batch's fixed cost in tokens' worth of time (module docstring)
RECOMPUTE = 4 / 3  # the step's compute with checkpointing over without it


@dataclass(frozen=True)
class Measured:
    """What the probe read on the device (bytes): `resident` before the probe, `step_fixed` the intercept, and the
    per-token activation coefficient with (`per_token_on`) and without (`per_token_off`, None where the probe
    without checkpointing did not fit) activation checkpointing."""

    resident: int
    step_fixed: int
    per_token_on: float
    per_token_off: float | None


@dataclass(frozen=True)
class Budget:
    """The memory the run may plan for: `usable` bytes (the cap or the device's free memory), less the margin."""

    usable: int
    capped: bool
    device_free: int

    @property
    def margin(self) -> int:
        return max(MARGIN_MIN, round(MARGIN_FRACTION * self.usable))

    @property
    def plan(self) -> int:
        return self.usable - self.margin


def budget_for(device_free: int, cap_gib: float | None) -> Budget:
    """The cap (auto_batch_memory_gib) where given, never above what the device has free; else the free memory.
    `device_free`: free device memory plus what this process's allocator already holds."""
    if cap_gib is None:
        return Budget(device_free, False, device_free)
    return Budget(min(round(cap_gib * GIB), device_free), True, device_free)


@dataclass(frozen=True)
class Decision:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    configured_micro_batch: int
    configured_accumulation: int
    configured_checkpointing: bool
    fits_on: int  # the largest micro-batch that fits with checkpointing
    fits_off: int  # and without it (0: not even one pair)
    per_pair: int  # bytes per pair at the run's length, in the chosen mode
    planned_peak: int  # bytes the chosen micro-batch is modelled to peak at
    tokens: int  # the longest sequence (L)
    budget: Budget
    resumed: int | None = None  # the micro-batch of the checkpoint resumed from, where there is one

    @property
    def pairs_per_step(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def configured_pairs(self) -> int:
        return self.configured_micro_batch * self.configured_accumulation

    def settings(self) -> dict:
        """The resolved settings, as resolved_config.yaml records them."""
        return {
            "per_device_train_batch_size": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation,
            "activation_checkpointing": self.checkpointing,
            "gradient_checkpointing": self.checkpointing,  # transformers mirrors the old name
        }

    def line(self) -> str:
        b = self.budget
        where = f"device {_gib(b.device_free)} free"
        where = f"cap {_gib(b.usable)} ({where})" if b.capped else where
        moved = (
            ""
            if self.pairs_per_step == self.configured_pairs
            else f" (not {self.configured_pairs}: no divisor of it near the {self.micro_batch} that fit)"
        )
        if self.resumed is None:
            kept = ""
        elif self.resumed == self.micro_batch:
            kept = f"; the resumed checkpoint's micro-batch {self.resumed} kept"
        else:
            kept = (
                f"; the resumed checkpoint's micro-batch {self.resumed} does not fit or divide the step here: "
                "the pairs' length-grouped order differs from its run's"
            )
        return (
            f"per_device_train_batch_size auto: {where}, planning for {_gib(b.plan)} (margin {_gib(b.margin)}); "
            f"{_gib(self.per_pair)} per pair at {self.tokens} tokens; fits {self.fits_on} pairs with activation "
            f"checkpointing, {self.fits_off} without -> micro-batch {self.micro_batch} x {self.accumulation} "
            f"accumulation = {self.pairs_per_step} pairs per step{moved}, activation checkpointing "
            f"{'on' if self.checkpointing else 'off'} (configured {self.configured_micro_batch} x "
            f"{self.configured_accumulation}, checkpointing {'on' if self.configured_checkpointing else 'off'}); "
            f"modelled peak {_gib(self.planned_peak)}{kept}"
        )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def per_pair_bytes(per_token: float, tokens: int) -> int:
    """A pair is two sequences (chosen and rejected) of `tokens` each, padded to the longest."""
    return math.ceil(per_token * 2 * tokens)


def fixed_bytes(measured: Measured, trainable: int) -> int:
    return measured.resident + trainable * ADAM_STATE_BYTES + measured.step_fixed


def largest_fitting(plan: int, fixed: int, per_pair: int) -> int:
    """The largest B with fixed + B * per_pair <= plan (0 where not even one pair fits)."""
    return max(0, (plan - fixed) // per_pair) if per_pair > 0 else 0


def split(pairs: int, fits: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for `pairs` per step under `fits` per micro-batch: the largest divisor of
    `pairs` that fits, unless it is under half of `fits`; then `fits` x round(pairs / fits) (module docstring)."""
    if fits >= pairs:
        return pairs, 1
    divisor = max(d for d in range(1, fits + 1) if pairs % d == 0)
    if 2 * divisor >= fits:
        return divisor, pairs // divisor
    return fits, max(1, round(pairs / fits))


def step_cost(pairs: int, micro_batch: int, tokens: int, checkpointing: bool) -> float:
    """The step-time model in token-equivalents (module docstring): fixed cost per micro-batch + the tokens' work."""
    micro_batches = math.ceil(pairs / micro_batch)
    return micro_batches * FIXED_TOKENS + pairs * 2 * tokens * (RECOMPUTE if checkpointing else 1.0)


def decide(
    measured: Measured,
    budget: Budget,
    tokens: int,
    trainable: int,
    micro_batch: int,
    accumulation: int,
    checkpointing: bool,
    resumed: int | None = None,
) -> Decision:
    """The micro-batch, accumulation and checkpointing for a run whose longest sequence is `tokens`, configured as
    `micro_batch` x `accumulation` pairs per step with `checkpointing`. Raises UserError (one line, the numbers and
    what to change) when not even one pair fits. `resumed`: the micro-batch of the checkpoint a resumed run continues,
    kept where it divides the pairs per step and fits (the length-grouped order of the pairs, and so which pairs
    the checkpoint has seen, depends on the micro-batch)."""
    pairs = micro_batch * accumulation
    fixed = fixed_bytes(measured, trainable)
    on_pair = per_pair_bytes(measured.per_token_on, tokens)
    fits_on = largest_fitting(budget.plan, fixed, on_pair)
    off_pair = per_pair_bytes(measured.per_token_off, tokens) if measured.per_token_off is not None else 0
    fits_off = largest_fitting(budget.plan, fixed, off_pair) if off_pair else 0
    if fits_on < 1 and fits_off < 1:
        raise UserError(
            f"per_device_train_batch_size auto: not even one pair of {tokens} tokens fits: it needs "
            f"{_gib(fixed)} (weights, LoRA, optimizer, step) + {_gib(on_pair)} per pair with activation checkpointing "
            f"= {_gib(fixed + on_pair)}, the plan has {_gib(budget.plan)} ({_gib(budget.usable)} "
            f"{'cap' if budget.capped else 'free'} less a {_gib(budget.margin)} margin); lower max_length, "
            "raise auto_batch_memory_gib, or use a GPU with more memory"
        )
    if fits_off < 1:
        chosen_ckpt = True  # needed: not one pair fits without it
    elif fits_off >= pairs or not checkpointing:
        chosen_ckpt = False  # one micro-batch per step without it, or the user turned it off
    else:
        chosen_ckpt = step_cost(pairs, split(pairs, fits_on)[0], tokens, True) < step_cost(
            pairs, split(pairs, fits_off)[0], tokens, False
        )
    micro, accum = split(pairs, fits_on if chosen_ckpt else fits_off)
    if resumed and pairs % resumed == 0 and resumed <= max(fits_on, fits_off):
        # the same micro-batch count either way: without checkpointing is faster wherever it fits
        micro, accum, chosen_ckpt = resumed, pairs // resumed, resumed > fits_off
    per_pair = on_pair if chosen_ckpt else off_pair
    return Decision(
        micro_batch=micro,
        accumulation=accum,
        checkpointing=chosen_ckpt,
        configured_micro_batch=micro_batch,
        configured_accumulation=accumulation,
        configured_checkpointing=checkpointing,
        fits_on=fits_on,
        fits_off=fits_off,
        per_pair=per_pair,
        planned_peak=fixed + micro * per_pair,
        tokens=tokens,
        budget=budget,
        resumed=resumed,
    )


def per_token_from_probe(peak_one: int, peak_two: int, probe_tokens: int, fallback: float = 1.0) -> tuple[int, float]:
    """(step_fixed, per_token) from the peaks of one and two pairs of `probe_tokens` per sequence, both measured
    above what was resident before: the slope is one pair's cost (two sequences), the intercept what any step
    allocates. A slope <= 0 (the allocator reused memory between the two) measured nothing: per_token is then
    `fallback` (the probe passes analytic_per_token), never a near-zero cost that would make any micro-batch fit."""
    slope = peak_two - peak_one
    per_token = max(1.0, slope / (2 * probe_tokens)) if slope > 0 else max(1.0, fallback)
    return max(0, peak_one - slope), per_token


def probe_tokens_for(tokens: int, plan_left: int, guess_per_token: float) -> int:
    """The length the probe without checkpointing runs at: the run's own length where two pairs at the guessed
    cost (analytic_per_token) take at most half of what is left of the plan, else shorter (the per-token
    coefficient is extrapolated linearly back to the run's length), at least 16 tokens."""
    if plan_left <= 0:
        return 16
    affordable = int(plan_left / 2 / (2 * 2 * guess_per_token))
    return max(16, min(tokens, affordable))


def analytic_per_token(hidden: int, layers: int, vocab: int, checkpointing: bool, fused_head: bool) -> float:
    """A rough activation cost per token (bytes, 16-bit activations), only to pick a probe length that cannot
    run out of memory (the decision uses the measured coefficient). Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", eq. 1): 34 h bytes per token per layer without the s^2 attention
    term (SDPA keeps none); with checkpointing each layer keeps its 2 h input, and one layer is recomputed whole.
    The LM head: fp32 logits and their log-softmax (8 bytes x vocab) unless fused, where a tile of them lives at
    a time (8 h for its input and gradient)."""
    body = (2 * hidden * layers + 34 * hidden) if checkpointing else 34 * hidden * layers
    return float(body + (8 * hidden if fused_head else 8 * vocab))
