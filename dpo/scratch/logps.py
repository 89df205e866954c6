"""log pi(y | x): per-sequence log-probabilities, what every DPO loss in dpo/scratch/loss.py is a function of.

    seq = sequence_logps(logits, labels)          # (2B, T, V), (2B, T) -> seq.logps (2B,), per-token parts
    logps = completion_logps(model, prompt_ids, completion_ids, pad_id)   # token-id rows, one value per row

`sequence_logps` (and LD-DPO's `ld_logps`, WPO's `wpo_weights`, the SFT term's `sft_nll`) are what
TRL's trainer agrees with (tests/scratch/test_loss_agreement.py); `completion_logps` serves the
evaluation (held-out margins, KL of samples) and the offline sentiment demo.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

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


def right_padded(prompt_ids, completion_ids, pad_id: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels), each (B, T): the rows prompt + completion right-padded to the longest,
    labels -100 everywhere but the completion tokens (what `sequence_logps` scores)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, mask, labels


@torch.no_grad()
def completion_logps(model, prompt_ids, completion_ids, pad_id: int, batch_size: int = 512) -> torch.Tensor:
    """log pi(y|x) summed over the completion tokens (EOS included), one value per row."""
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompt_ids), batch_size):
        end = start + batch_size
        ids, mask, labels = right_padded(prompt_ids[start:end], completion_ids[start:end], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out.append(sequence_logps(logits, labels).logps.cpu())
    model.train(was_training)
    return torch.cat(out)
