"""Direct Preference Optimization from scratch: the loss, in plain PyTorch.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", https://arxiv.org/abs/2305.18290) in four steps:

  Eq. 1  Bradley-Terry: humans prefer y_w over y_l with probability
             p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)).
  Eq. 3  RLHF maximises  E[r(x, y)] - beta KL(pi || pi_ref);  Eq. 4: its optimum for a reward r is
             pi_r(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x).
  Eq. 5  Inverted, every reward is a policy in disguise (the "implicit reward"):
             r(x, y) = beta log pi_r(y|x) / pi_ref(y|x) + beta log Z(x).
  Eq. 7  Z(x) cancels in the Bradley-Terry difference, so maximum likelihood on the preferences
         is a classification loss on the policy itself:
             L_DPO = -E log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ).

All a training step needs per pair is the summed log-probability of each completion under the
policy and under the frozen reference (`sequence_logps`, dpo/scratch/logps.py), and a scalar function of the two
log-ratios (`dpo_loss`, in the style of `preference_loss` in the paper's code,
github.com/eric-mitchell/direct-preference-optimization). Everything else in this file is a
published variant of that function, with the exact semantics of TRL 1.16's `DPOTrainer`;
tests/scratch/test_loss_agreement.py checks each against TRL, except the two TRL dropped (conservative
DPO "cdpo" and `reference_free`), which tests/scratch/test_loss.py checks by hand:

    logits (2B, T, V), labels (2B, T)   # rows [chosen_1..chosen_B, rejected_1..rejected_B]
      -> sequence_logps -> logps (2B,), split into chosen (B,) and rejected (B,)
      -> dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
      -> losses (B,);  loss = losses.mean()

Shapes: B pairs, T tokens, V vocabulary. Labels hold the token ids of completion tokens and
-100 at prompt and padding positions (the Hugging Face convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.scratch.loss_settings import (
    DEFAULT_DISCOPOP_TAU,
    DEFAULT_F_ALPHA,
    F_DIVERGENCES,
    LOSS_TYPES,
    check_args,
)

# ── the loss ─────────────────────────────────────────────────────────────────────────────────────


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = DEFAULT_F_ALPHA
) -> Tensor:
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL", https://arxiv.org/abs/2309.16240): regularising
    with an f-divergence instead of the reverse KL replaces the log-ratio u = log pi/pi_ref in
    Eq. 7 by f'(pi/pi_ref) (constants dropped, they cancel in chosen - rejected).

    logratios: (B,). Returns (B,):
        reverse_kl        u                      (f(t) = t log t: standard DPO)
        forward_kl        1 - exp(-u)            (f(t) = -log t)
        js_divergence     log 2 + log sigma(u)   (f'(t) = log(2t / (1 + t)))
        alpha_divergence  (exp((alpha-1) u) - 1) / (alpha-1), exponent clamped at 80 (11 in fp16)
    """
    u = logratios
    if f_divergence_type == "reverse_kl":
        return u
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-u)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 of (t^(alpha-1) - 1)/(alpha-1) is log t
            return u
        # exp(80) ~ 5.5e34 keeps headroom below the float32/bfloat16 maximum (3.4e38), exp(11) below fp16's 65504.
        # Computed in float32 for half types, as TRL does; the clamp also stops the gradient beyond it.
        clamp = 11.0 if u.dtype == torch.float16 else 80.0
        t = (alpha - 1.0) * u
        t = t.float() if u.dtype in (torch.float16, torch.bfloat16) else t
        return (torch.exp(t.clamp(max=clamp)) - 1.0).to(u.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCES}.")


class DPOLoss(NamedTuple):
    losses: Tensor  # (B,) loss of each pair; the training loss is losses.mean()
    chosen_rewards: Tensor  # (B,) beta log pi(y_w|x)/pi_ref(y_w|x), detached (Eq. 5 without Z)
    rejected_rewards: Tensor  # (B,) beta log pi(y_l|x)/pi_ref(y_l|x), detached


class Batch(NamedTuple):
    """What every loss function reads. u_w, u_l: log-ratios log pi/pi_ref of y_w and y_l; s_w, s_l:
    their f-divergence scores (= u for reverse KL); h = s_w - s_l; eps = label_smoothing."""

    beta: float
    h: Tensor
    u_w: Tensor
    u_l: Tensor
    s_w: Tensor
    s_l: Tensor
    eps: float
    tau: float
    policy_margin: Tensor  # log pi(y_w) - log pi(y_l), for aot
    reference_margin: Tensor  # log pi_ref(y_w) - log pi_ref(y_l), for aot
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    chosen_nll: Tensor | None


# ── one function per loss type: (Batch) -> (B,) per-pair losses ──────────────────────────────────


def sigmoid(b: Batch) -> Tensor:
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7): -log sigma(beta h)."""
    return -F.logsigmoid(b.beta * b.h)


def cdpo(b: Batch) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), labels flipped with
    probability eps: -(1-eps) log sigma(beta h) - eps log sigma(-beta h)."""
    return -(1 - b.eps) * F.logsigmoid(b.beta * b.h) - b.eps * F.logsigmoid(-b.beta * b.h)


def robust(b: Batch) -> Tensor:
    """rDPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, Eq. 8), unbiased under label flips
    with probability eps: [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)."""
    return (-(1 - b.eps) * F.logsigmoid(b.beta * b.h) + b.eps * F.logsigmoid(-b.beta * b.h)) / (1 - 2 * b.eps)


def hinge(b: Batch) -> Tensor:
    """SLiC (Zhao et al. 2023, https://arxiv.org/abs/2305.10425): max(0, 1 - beta h)."""
    return torch.relu(1 - b.beta * b.h)


def _length_normalised_margin(b: Batch) -> Tensor:
    """s_w/|y_w| - s_l/|y_l|, lengths clamped at 1, as TRL does."""
    return b.s_w / b.chosen_lengths.clamp(min=1) - b.s_l / b.rejected_lengths.clamp(min=1)


def ipo(b: Batch) -> Tensor:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17), per-token averaged scores as in
    TRL: (s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2."""
    return (_length_normalised_margin(b) - 1 / (2 * b.beta)) ** 2


def sigmoid_norm(b: Batch) -> Tensor:
    """Length-normalised DPO (as TRL's "sigmoid_norm"): -log sigma(beta (s_w/|y_w| - s_l/|y_l|))."""
    return -F.logsigmoid(b.beta * _length_normalised_margin(b))


def exo_pair(b: Batch) -> Tensor:
    """EXO (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16): the reverse KL from the model's
    pair distribution to the smoothed labels, KL([sigma(beta h), sigma(-beta h)] || [1-eps, eps])."""
    x = b.beta * b.h
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-b.eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(b.eps)
    )


def nca_pair(b: Batch) -> Tensor:
    """NCA (Chen et al. 2024, https://arxiv.org/abs/2402.05369):
    -log sigma(beta u_w) - 1/2 log sigma(-beta u_w) - 1/2 log sigma(-beta u_l)."""
    rw, rl = b.beta * b.u_w, b.beta * b.u_l
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def bco_pair(b: Batch) -> Tensor:
    """BCO (Jung et al. 2024, https://arxiv.org/abs/2404.04656), paired: -log sigma(beta u_w) - log sigma(-beta u_l)."""
    return -F.logsigmoid(b.beta * b.u_w) - F.logsigmoid(-b.beta * b.u_l)


def sppo_hard(b: Batch) -> Tensor:
    """SPPO (Wu et al. 2024, https://arxiv.org/abs/2405.00675) with hard labels, P(y_w wins) = 1: regress
    the log-ratios to +-1/(2 beta): (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2."""
    return (b.u_w - 0.5 / b.beta) ** 2 + (b.u_l + 0.5 / b.beta) ** 2


def _smoothed_sigmoid(b: Batch, delta: Tensor) -> Tensor:
    return -F.logsigmoid(b.beta * delta) * (1 - b.eps) - F.logsigmoid(-b.beta * delta) * b.eps


def aot(b: Batch) -> Tensor:
    """AOT (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882), first-order stochastic dominance over
    the batch: smoothed sigmoid of sort(log pi_w - log pi_l) - sort(log pi_ref_w - log pi_ref_l).
    Sorts the batch: loss i belongs to the i-th smallest margin, not to pair i."""
    delta = torch.sort(b.policy_margin, dim=0).values - torch.sort(b.reference_margin, dim=0).values
    return _smoothed_sigmoid(b, delta)


def aot_unpaired(b: Batch) -> Tensor:
    """AOT unpaired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): smoothed sigmoid of
    sort(u_w) - sort(u_l). Sorts the batch, as `aot`."""
    return _smoothed_sigmoid(b, torch.sort(b.u_w, dim=0).values - torch.sort(b.u_l, dim=0).values)


def apo_zero(b: Batch) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7), y_w up and y_l down:
    1 - sigma(beta u_w) + sigma(beta u_l)."""
    return 1 - torch.sigmoid(b.beta * b.u_w) + torch.sigmoid(b.beta * b.u_l)


def apo_down(b: Batch) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), both down, y_l more:
    sigma(beta u_w) + 1 - sigma(beta (u_w - u_l))."""
    return torch.sigmoid(b.beta * b.u_w) + 1 - torch.sigmoid(b.beta * (b.u_w - b.u_l))


def discopop(b: Batch) -> Tensor:
    """DiscoPOP (Lu et al. 2024, https://arxiv.org/abs/2406.08414, Eq. 5), a log-ratio modulated blend of
    the logistic and exponential losses, x = beta h: -log sigma(x) (1 - sigma(x/tau)) + exp(-x) sigma(x/tau).
    exp(-x) sigma(x/tau) is written as one exponent, finite where the product is (TRL's overflows to nan)."""
    x = b.beta * b.h
    return -F.logsigmoid(x) * torch.sigmoid(-x / b.tau) + torch.exp(F.logsigmoid(x / b.tau) - x)


def sft(b: Batch) -> Tensor:
    """The chosen answers' mean NLL per token (`sft_nll`), the same for every pair (RPO = sigmoid + sft)."""
    return b.chosen_nll.expand_as(b.h)


LOSSES = {fn.__name__: fn for fn in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                                     aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, cdpo)}  # fmt: skip
assert tuple(LOSSES) == LOSS_TYPES, "dpo/scratch/loss_settings.py's LOSS_TYPES names these, in this order"


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    discopop_tau: float = DEFAULT_DISCOPOP_TAU,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> DPOLoss:
    """The DPO loss (Eq. 7) and its variants (`LOSSES`, one function each), for a batch of B pairs.

    policy_chosen_logps, policy_rejected_logps: (B,) log pi(y_w|x), log pi(y_l|x), summed over the
        completion tokens (`sequence_logps`, or `ld_logps` for LD-DPO). Gradients flow through these.
    reference_chosen_logps, reference_rejected_logps: (B,) the same under the frozen pi_ref.
    beta: the KL-penalty temperature of Eq. 3; the rewards are beta-scaled log-ratios (Eq. 5).
    loss_type: one name or a list, combined as sum_i loss_weights[i] * loss_i per pair, so that
        losses.mean() = sum_i w_i mean(loss_i), as TRL combines them (e.g. RPO = ["sigmoid", "sft"]).
    label_smoothing eps: the assumed probability that a preference label is flipped. Used by cdpo,
        robust, aot, aot_unpaired (eps in [0, 0.5)) and exo_pair (eps in (0, 0.5)); any other loss
        type raises if it is set, as TRL's "sigmoid" silently ignores it.
    reference_free: take pi_ref as uniform, i.e. reference log-probs are 0 (pass None for them).
    f_divergence_type, f_alpha_divergence_coef: see `f_divergence_scores` (f-DPO).
    discopop_tau: temperature of the "discopop" mixing.
    chosen_lengths, rejected_lengths: (B,) completion token counts; "ipo" and "sigmoid_norm" divide
        each sequence's score by them (clamped at 1), as TRL does. (TRL counts the completion mask
        before the shift, so with an empty prompt its count is one more than the tokens scored.)
    chosen_nll: scalar mean NLL of the chosen tokens (`sft_nll`), needed by "sft".
    pair_weights: (B,) optional weights multiplied onto each pair's loss (WPO: w(y_w) w(y_l), see
        `wpo_weights`). Not with the sorting losses aot/aot_unpaired.

    Returns DPOLoss(losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    check_args(
        loss_types=loss_types,
        weights=weights,
        beta=beta,
        eps=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha=f_alpha_divergence_coef,
        tau=discopop_tau,
        policy_chosen=policy_chosen_logps,
        policy_rejected=policy_rejected_logps,
        reference_chosen=reference_chosen_logps,
        reference_rejected=reference_rejected_logps,
        reference_free=reference_free,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=chosen_nll,
        pair_weights=pair_weights,
    )
    if reference_free:  # pi_ref uniform: its log-probs are a constant, which cancels; take 0
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)

    # The log-ratios u = log pi/pi_ref; beta u is the implicit reward of Eq. 5 (up to beta log Z(x)).
    u_w = policy_chosen_logps - reference_chosen_logps
    u_l = policy_rejected_logps - reference_rejected_logps
    s_w = f_divergence_scores(u_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_scores(u_l, f_divergence_type, f_alpha_divergence_coef)
    batch = Batch(
        beta=beta,
        h=s_w - s_l,  # beta * h is the Bradley-Terry logit of Eq. 7
        u_w=u_w,
        u_l=u_l,
        s_w=s_w,
        s_l=s_l,
        eps=label_smoothing,
        tau=discopop_tau,
        policy_margin=policy_chosen_logps - policy_rejected_logps,
        reference_margin=reference_chosen_logps - reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=chosen_nll,
    )
    losses = 0.0
    for kind, weight in zip(loss_types, weights):
        loss = LOSSES[kind](batch)
        if pair_weights is not None:
            loss = loss * pair_weights
        losses = losses + weight * loss
    return DPOLoss(losses, beta * u_w.detach(), beta * u_l.detach())
