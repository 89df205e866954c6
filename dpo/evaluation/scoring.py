"""log pi(answer | prompt) for `python -m dpo.evaluate`: each distinct prompt fed once per model.

The held-out pairs' chosen and rejected answers, and the KL's sampled answers, continue the same prompts, and on
chat data the prompt is most of a row's tokens (HH-RLHF: a dialogue of several turns before a one-turn answer). So
rows are grouped by prompt. The prompt is fed once (one row, no padding, the vocabulary projected at its last
position only), its KV cache is repeated for each of its answers, and the answers are fed together on top of it,
right-padded (under causal attention no answer token sees the padding after it), at most `batch_size` answers a
forward. Before, each row was fed whole, prompt and answer, in batches padded to the longest row, with the
vocabulary's log-softmax over every position (`dpo.scratch.logps.completion_logps`, still what `shared_prompts=False`
runs, to compare, and what a model whose cache cannot be repeated gets). In float32 the values agree with that forward
up to summation order (tests/evaluation/test_scoring.py); in bf16 the cache and attention round as that forward's do.
"""

from __future__ import annotations

import copy
import inspect

import torch


def _last_logits_only(model) -> dict:
    """{"logits_to_keep": 1} where the causal LM takes it (transformers' LMs do): the prompt's forward then projects
    onto the vocabulary at its last position only, the one that predicts each answer's first token."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


@torch.no_grad()
def logps_sharing_prompts(
    model, rows: list[tuple[list[int], list[int]]], bar=None, batch_size: int = 8
) -> torch.Tensor:
    """log pi(answer | prompt) of each (prompt_ids, answer_ids) row, summed over the answer's tokens (EOS
    included): a float32 tensor of len(rows), 0 for an empty answer. As in `completion_logps`, a row with an empty
    prompt leaves its answer's first token unscored (nothing predicts it). `bar`: a tqdm moved by one per row;
    `batch_size`: the most answers fed in one forward (their logits are batch x length x vocabulary floats)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep = _last_logits_only(model)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    out = torch.zeros(len(rows), dtype=torch.float32)
    for prompt, members in by_prompt.items():
        answered = [i for i in members if rows[i][1]]
        if answered:
            answers = [rows[i][1] for i in answered]
            out[torch.tensor(answered)] = _answers_after(model, list(prompt), answers, device, keep, batch_size)
        if bar is not None:
            bar.update(len(members))
    model.train(was_training)
    return out


def _answers_after(model, prompt: list[int], answers: list[list[int]], device, keep: dict, bs: int) -> torch.Tensor:
    """(len(answers),) log pi(answer | prompt): the prompt fed once, its answers `bs` at a time over its cache."""
    if not prompt:  # nothing to share: the answers are fed from their first token
        return torch.cat(
            [_continued(model, None, None, answers[i : i + bs], device) for i in range(0, len(answers), bs)]
        )
    fed = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **keep)
    cache = fed.past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):  # a cache of its own kind (remote code): rows fed whole
        from dpo.scratch.logps import completion_logps

        return completion_logps(model, [prompt] * len(answers), answers, pad_id=0, batch_size=bs)
    # float32 before the log-softmax: in bf16 it would round away the policy/reference differences
    first = fed.logits[0, -1].float().log_softmax(-1)  # (V,): the distribution of each answer's first token
    chunks = [answers[i : i + bs] for i in range(0, len(answers), bs)]
    return torch.cat(
        [  # the last chunk takes the prompt's cache itself, the others a copy (a forward extends its cache)
            _continued(model, cache if k == len(chunks) - 1 else copy.deepcopy(cache), first, chunk, device)
            for k, chunk in enumerate(chunks)
        ]
    )


def _continued(model, cache, first, answers: list[list[int]], device) -> torch.Tensor:
    """The answers side by side, right-padded, over a one-row prompt `cache` (None: no prompt; then `first`, the
    log-distribution of a first token, is None too and the first token goes unscored)."""
    width = max(map(len, answers))
    # any id pads: a right-padded position is seen by no earlier token (causal attention) and never scored
    ids = torch.tensor([a + [0] * (width - len(a)) for a in answers], device=device)
    lengths = torch.tensor([len(a) for a in answers], device=device)
    if cache is not None:
        cache.batch_repeat_interleave(len(answers))
    logits = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None).logits  # (n, width, V)
    # position t predicts token t+1: the answer's tokens after its first, up to its own length
    later = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (n, width - 1)
    scored = torch.arange(width - 1, device=device)[None, :] < (lengths[:, None] - 1)
    start = first[ids[:, 0]] if first is not None else torch.zeros(len(answers), device=device)
    return (start + later.masked_fill(~scored, 0.0).sum(-1)).float().cpu()
