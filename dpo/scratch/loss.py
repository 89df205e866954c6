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
policy and under the frozen reference (`sequence_logps`), and a scalar function of the two
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
    check_args,
)

# ── log pi(y|x): from logits to per-sequence log-probabilities ──────────────────────────────────


class SequenceLogps(NamedTuple):
    token_logps: Tensor  # (B, T-1) log pi(token t+1 | tokens <= t); 0 where the label is -100
    mask: Tensor  # (B, T-1) bool, True at the completion tokens that are scored
    logps: Tensor  # (B,) log pi(y|x) = sum of token_logps over the completion
    lengths: Tensor  # (B,) long, number of completion tokens
    log_sum_sq_probs: Tensor | None  # (B, T-1) log sum_v p_v^2 per position (WPO), no grad; or None


def sequence_logps(logits: Tensor, labels: Tensor, *, with_log_sum_sq_probs: bool = False) -> SequenceLogps:
    """Log-probabilities of the completion tokens of each row.

    logits: (B, T, V) from a causal LM; position t holds the distribution of token t+1.
    labels: (B, T) token ids, -100 at prompt and padding positions (never scored).
    with_log_sum_sq_probs: also return log sum_v p_v(t)^2 per position, the WPO normaliser.

    The logits are upcast to float32 first (float64 stays float64): in bf16/fp16 the log-softmax
    rounds away the small policy/reference differences DPO is made of.
    """
    logits = logits[:, :-1]  # the last position predicts past the end of the row
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = labels[:, 1:]  # the first token has no prediction
    mask = labels != -100
    log_probs = logits.log_softmax(dim=-1)  # (B, T-1, V)
    token_logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = token_logps.masked_fill(~mask, 0.0)
    log_sum_sq_probs = None
    if with_log_sum_sq_probs:
        with torch.no_grad():  # log sum_v p_v^2 = logsumexp_v(2 log p_v); a weight, never differentiated
            log_sum_sq_probs = torch.logsumexp(2 * log_probs, dim=-1).masked_fill(~mask, 0.0)
    return SequenceLogps(token_logps, mask, token_logps.sum(-1), mask.sum(-1), log_sum_sq_probs)


def ld_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probabilities (Liu et al. 2024, "Length Desensitization in Direct
    Preference Optimization", https://arxiv.org/abs/2409.06411).

    Of each pair, only the first l = min(|y_w|, |y_l|) completion tokens count in full; the
    "verbose" tail beyond the shorter completion is down-weighted by ld_alpha in [0, 1]:
        log pi_LD(y|x) = sum_{t <= l} log pi(y_t|...) + ld_alpha * sum_{t > l} log pi(y_t|...).
    Apply it to policy and reference alike. ld_alpha = 1 is plain DPO, 0 drops the tail.

    *_token_logps, *_mask: (B, T) as in `SequenceLogps`. Returns (chosen_logps, rejected_logps), (B,) each.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1] (1 = plain DPO, 0 = drop the tail); got {ld_alpha}.")
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)  # (B, 1)

    def weigh(token_logps, mask):
        tail = mask & (mask.cumsum(-1) > shared)  # completion tokens after the first `shared`
        return (token_logps * (mask & ~tail)).sum(-1) + ld_alpha * (token_logps * tail).sum(-1)

    return weigh(chosen_token_logps, chosen_mask), weigh(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO sequence weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", https://arxiv.org/abs/2406.11827, Eq. 2, in its "aligned" form as TRL computes it):

        w(x, y) = exp( mean_t [ log pi(y_t|...) - log sum_v pi(v|...)^2 ] )

    i.e. the length-normalised probability of the completion relative to what the policy would
    give to its own samples, so that off-policy pairs count less. No gradient flows through it.
    token_logps, log_sum_sq_probs, mask: (B, T). Returns (B,). The pair weight is w(y_w) * w(y_l).
    """
    with torch.no_grad():
        aligned = (token_logps - log_sum_sq_probs) * mask
        return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def sft_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood per completion token over the batch (the "sft" loss, RPO's
    NLL term). token_logps, mask: (B, T) of the chosen completions. Returns a scalar."""
    return -token_logps[mask.bool()].mean()


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
    """The DPO loss (Eq. 7) and its variants, for a batch of B preference pairs.

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

    With u_w = log pi(y_w)/pi_ref(y_w), u_l likewise, s = f'(.) of them (= u for reverse KL) and
    h = s_w - s_l, the per-pair losses are (sigma = sigmoid):
        sigmoid       -log sigma(beta h)                                       DPO, Eq. 7
        cdpo          -(1-eps) log sigma(beta h) - eps log sigma(-beta h)      conservative DPO (Mitchell 2023)
        robust        [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)   rDPO, Chowdhury et al. 2024
        hinge         max(0, 1 - beta h)                                       SLiC, Zhao et al. 2023
        ipo           (s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2                   IPO, Azar et al. 2023, Eq. 17
        sigmoid_norm  -log sigma(beta (s_w/|y_w| - s_l/|y_l|))                 length-normalised DPO
        exo_pair      KL([sigma(beta h), sigma(-beta h)] || [1-eps, eps])      EXO, Ji et al. 2024, Eq. 16
        nca_pair      -log sigma(beta u_w) - 1/2 log sigma(-beta u_w) - 1/2 log sigma(-beta u_l)   NCA, Chen et al. 2024
        bco_pair      -log sigma(beta u_w) - log sigma(-beta u_l)              BCO, Jung et al. 2024
        sppo_hard     (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2              SPPO, Wu et al. 2024 (hard labels)
        aot           smoothed sigmoid of sort(log pi_w - log pi_l) - sort(reference's), over the batch
        aot_unpaired  smoothed sigmoid of sort(u_w) - sort(u_l)                AOT, Melnyk et al. 2024
        apo_zero      1 - sigma(beta u_w) + sigma(beta u_l)                    APO, D'Oosterlinck et al. 2024, Eq. 7
        apo_down      sigma(beta u_w) + 1 - sigma(beta (u_w - u_l))            APO, Eq. 8
        discopop      -log sigma(x) (1 - sigma(x/tau)) + exp(-x) sigma(x/tau), x = beta h   DiscoPOP, Lu et al. 2024, Eq. 5
        sft           chosen_nll (the same for every pair)
    For the sorting losses, loss i belongs to the i-th smallest margin, not to pair i.

    Returns DPOLoss(losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    check_args(
        loss_types,
        weights,
        beta,
        label_smoothing,
        f_divergence_type,
        f_alpha_divergence_coef,
        discopop_tau,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
        chosen_lengths,
        rejected_lengths,
        chosen_nll,
        pair_weights,
    )
    if reference_free:  # pi_ref uniform: its log-probs are a constant, which cancels; take 0
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)

    # The log-ratios u = log pi/pi_ref; beta u is the implicit reward of Eq. 5 (up to beta log Z(x)).
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    h = chosen_scores - rejected_scores  # beta * h is the Bradley-Terry logit of Eq. 7
    eps = label_smoothing

    losses = 0.0
    for kind, weight in zip(loss_types, weights):
        if kind == "sigmoid":
            loss = -F.logsigmoid(beta * h)
        elif kind == "cdpo":
            loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif kind == "robust":  # unbiased under label flips with probability eps
            loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif kind == "hinge":
            loss = torch.relu(1 - beta * h)
        elif kind in ("ipo", "sigmoid_norm"):  # per-token average scores
            h_norm = chosen_scores / chosen_lengths.clamp(min=1) - rejected_scores / rejected_lengths.clamp(min=1)
            loss = (h_norm - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * h_norm)
        elif kind == "exo_pair":  # reverse KL from the model's pair distribution to the smoothed labels
            loss = torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log1p(-eps)) + torch.sigmoid(-beta * h) * (
                F.logsigmoid(-beta * h) - math.log(eps)
            )
        elif kind == "nca_pair":
            rw, rl = beta * chosen_logratios, beta * rejected_logratios
            loss = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
        elif kind == "bco_pair":
            loss = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif kind == "sppo_hard":  # regress the log-ratios to +-1/(2 beta): P(y_w wins) = 1, P(y_l wins) = 0
            loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif kind in ("aot", "aot_unpaired"):  # first-order stochastic dominance via sorted margins
            if kind == "aot":
                policy_sorted = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
                delta = policy_sorted - torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0).values
            else:
                delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
            loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif kind == "apo_zero":  # push y_w up and y_l down
            loss = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif kind == "apo_down":  # push both down, y_l more
            loss = (
                torch.sigmoid(beta * chosen_logratios)
                + 1
                - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif kind == "discopop":  # log-ratio modulated blend of the logistic and exponential losses
            x = beta * h
            # exp(-x) * sigma(x/tau) written as one exponent, finite where the product is (TRL's overflows to nan)
            loss = -F.logsigmoid(x) * torch.sigmoid(-x / discopop_tau) + torch.exp(F.logsigmoid(x / discopop_tau) - x)
        elif kind == "sft":
            loss = chosen_nll.expand_as(h)
        if pair_weights is not None:
            loss = loss * pair_weights
        losses = losses + weight * loss

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOLoss(losses, chosen_rewards, rejected_rewards)
