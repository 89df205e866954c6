"""Measurements of `make real` (benchmarks/real_alignment.py): tokenizing a chat pair, summed completion
log-probs of many pairs, implicit-reward accuracy with its 95% interval, KL to the reference, greedy answers.

Nothing here decides anything: benchmarks/real_plan.py chooses on the validation slice only, and the report
(benchmarks/real_report.py) shows the held-out numbers.
"""

from __future__ import annotations

import math

import torch

from dpo.scratch.logps import right_padded
from dpo.scratch.logps import sequence_logps as logps_of_logits
from dpo.scratch.loop import collate, forward_logps, split_pairs

Z95 = 1.959964
# A training step's rows are fed in this many forwards of rows of similar length, not one padded to the longest: on
# make real's batches (8 HH pairs, max_length 256) 38% of one padded batch's tokens were padding. Each row's
# log-prob does not depend on its batch-mates, so the loss and its gradient are the step's own.
TRAIN_GROUPS = 4


def tokenize_pair(tokenizer, pair: dict, max_length: int) -> dict:
    """Token ids of one chat pair. Each reply keeps at most max_length // 2 tokens; the prompt keeps
    its last tokens (the latest turns) in the room left by the longer reply: the reply is what the
    loss scores, and the last human turn is what it answers."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    out = {"truncated": False}
    for key in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=False)
        assert full.startswith(prompt), "the chat template renders the prompt as a prefix"
        ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        out[f"{key}_ids"] = ids[: max_length // 2]
        out["truncated"] |= len(ids) > max_length // 2
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = max_length - max(len(out["chosen_ids"]), len(out["rejected_ids"]))
    out["truncated"] |= len(prompt_ids) > room
    out["prompt_ids"] = prompt_ids[-room:]
    return out


def batches(examples: list[dict], size: int, pad_token_id: int):
    for i in range(0, len(examples), size):
        yield collate(examples[i : i + size], pad_token_id)


def pair_length(example: dict) -> int:
    """Tokens of the pair's longer sequence (prompt + reply): what its row pads to."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


@torch.no_grad()
def sequence_logps(model, examples, pad_token_id, batch_size, advance=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs of every pair, shape (N,) each, in the order
    of `examples`. Batches are formed from pairs sorted by length (less padding); each row's
    log-prob does not depend on its batch-mates. `advance(n)` is called after each batch of n pairs."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: pair_length(examples[i]))
    chosen, rejected = [], []
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start : start + batch_size]]
        c, r = split_pairs(forward_logps(model, collate(rows, pad_token_id)))
        chosen.append(c.logps)
        rejected.append(r.logps)
        if advance is not None:
            advance(len(rows))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # position of each pair in the sorted order
    return torch.cat(chosen)[back], torch.cat(rejected)[back]


def training_logps(model, examples, pad_token_id, keys=("chosen_ids", "rejected_ids"), groups=TRAIN_GROUPS):
    """{key: (B,) summed completion log-probs of each example's prompt + that reply, with gradient} and
    {key: (B,) completion token counts}, from at most `groups` forwards over the 2B (or B) rows sorted by length, each
    right-padded to its own longest row (what `forward_logps(model, collate(examples))` gives, with less padding)."""
    rows = [(key, j) for key in keys for j in range(len(examples))]
    length = lambda r: len(examples[r[1]]["prompt_ids"]) + len(examples[r[1]][r[0]])  # noqa: E731
    order = sorted(rows, key=length)
    size = math.ceil(len(order) / groups)
    logps, counts = {}, {}
    for start in range(0, len(order), size):
        part = order[start : start + size]
        prompts, replies = [examples[j]["prompt_ids"] for _, j in part], [examples[j][key] for key, j in part]
        ids, mask, labels = right_padded(prompts, replies, pad_token_id)
        seq = logps_of_logits(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
        for i, row in enumerate(part):
            logps[row], counts[row] = seq.logps[i], seq.lengths[i]
    return (
        {key: torch.stack([logps[key, j] for j in range(len(examples))]) for key in keys},
        {key: torch.stack([counts[key, j] for j in range(len(examples))]) for key in keys},
    )


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    p, z2 = k / n, Z95**2
    centre, half = (
        (p + z2 / (2 * n)) / (1 + z2 / n),
        Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n),
    )
    return centre - half, centre + half


def mean_ci(x: torch.Tensor) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval."""
    m, half = x.mean().item(), Z95 * x.std().item() / math.sqrt(len(x))
    return m, m - half, m + half


def heldout_metrics(pc, pr, rc, rr, beta) -> dict:
    """Implicit-reward accuracy (a tie, policy = reference, counts half), margin, loss and displacements of
    policy log-probs (pc, pr) against reference log-probs (rc, rr) of the same pairs."""
    margins = beta * ((pc - rc) - (pr - rr))
    wins = (margins > 0).sum().item() + 0.5 * (margins == 0).sum().item()
    return {
        "n": len(margins),
        "accuracy": wins / len(margins),
        "accuracy_ci": wilson(wins, len(margins)),
        "margin": mean_ci(margins),
        "loss": mean_ci(-torch.nn.functional.logsigmoid(margins)),
        "policy_ranking": (pc > pr).float().mean().item(),
        "chosen_displacement": mean_ci(pc - rc),
        "rejected_displacement": mean_ci(pr - rr),
    }


def own_ranking(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """How often a model's own likelihood ranks chosen above rejected, with its 95% interval."""
    wins = int((chosen > rejected).sum())
    return wins / len(chosen), wilson(wins, len(chosen))


@torch.no_grad()
def token_kl(model, examples, pad_token_id, batch_size) -> tuple[float, float, float]:
    """Mean per-token KL(pi || pi_ref) of the next-token distributions along held-out chosen replies
    (teacher-forced), with its 95% interval over replies; pi_ref = the model with adapters disabled."""
    per_reply = []
    for batch in batches(examples, batch_size, pad_token_id):
        B = batch["input_ids"].shape[0] // 2
        inputs = {k: batch[k][:B] for k in ("input_ids", "attention_mask")}
        mask = batch["completion_mask"][:B, 1:].float()  # position t predicts token t+1
        logp = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        with model.disable_adapter():
            logq = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        per_reply.append((kl * mask).sum(1) / mask.sum(1))
    return mean_ci(torch.cat(per_reply))


@torch.no_grad()
def greedy_answer(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()
