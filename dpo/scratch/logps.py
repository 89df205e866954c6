"""Per-sequence log-probabilities of token-id rows: log pi(y | x) summed over each completion.

    logps = completion_logps(model, prompt_ids, completion_ids, pad_id)   # one value per row

Used by the evaluation (held-out margins, KL of samples) and the offline sentiment demo; the
per-token sum is dpo/scratch/loss.py's `sequence_logps`, the one TRL's trainer agrees with.
"""

from __future__ import annotations

import torch

from dpo.scratch.loss import sequence_logps


@torch.no_grad()
def completion_logps(model, prompt_ids, completion_ids, pad_id: int, batch_size: int = 512) -> torch.Tensor:
    """log pi(y|x) summed over the completion tokens (EOS included), one value per row."""
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompt_ids), batch_size):
        rows = [
            p + c for p, c in zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size])
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        labels = torch.full_like(ids, -100)
        for i, (p, c) in enumerate(
            zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size])
        ):
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out.append(sequence_logps(logits, labels).logps.cpu())
    model.train(was_training)
    return torch.cat(out)
