"""Sampling answers from a model: batched `generate` with the KV cache on the 4-bit base + adapter, prompts
left-padded and grouped by length so that a batch wastes little on padding. `python -m dpo.evaluate` draws its
greedy and sampled answers here, and the rounds (dpo/rounds/) their K answers per prompt.

On-policy by construction: the rounds hand it the model that the previous round trained (its saved
adapter on the base, dpo/rounds/loop.py), and nothing here changes it. A prompt is a string (used as it
is) or a list of chat messages (the policy's chat template with the generation prompt applied).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64  # sequences (prompt x sample) per generate call
    do_sample: bool = True  # False: greedy (temperature and top_p unused)


def render_prompt(tokenizer, prompt, tools: str | None = None) -> str:
    """The text the policy continues: a chat prompt through its own template (with the generation prompt, and a
    tool-calling row's `tools` as training rendered them: dpo.data.formats.render)."""
    if isinstance(prompt, list):
        from dpo.data.formats import tools_argument

        return tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, tools=tools_argument(tools)
        )
    return prompt


def prompt_token_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each rendered prompt; no special tokens added (a chat template writes its own)."""
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def _generation_config(settings: Sampling, tokenizer):
    from transformers import GenerationConfig

    # top_k 0: no top-k cut (transformers' default of 50 would silently narrow the policy's distribution)
    sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    return GenerationConfig(
        **(sampling if settings.do_sample else {"do_sample": False}),
        max_new_tokens=settings.max_new_tokens,
        use_cache=True,  # one forward per new token over the cached keys (a whole-sequence forward is quadratic)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _token_progress(bar):
    """Stopping criteria that only move `bar` by one per generation step (they never stop a row)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TokenProgress(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([TokenProgress()])


def _cut(row: list[int], eos: int) -> list[int]:
    """A generated row up to and including its first EOS (the padding after it dropped)."""
    return row[: row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: Sampling,
    seed: int,
    desc: str | None = None,
    adapters: list[str] | None = None,
    sampled: list[bool] | None = None,
) -> list[list[int]]:
    """One sampled completion (token ids, ending with EOS unless cut at max_new_tokens) per row of
    `prompt_ids`, in the input order. Rows are sorted by prompt length into batches of
    `settings.batch_size`; batch b is sampled after torch.manual_seed(seed + b), so a run repeats. With `desc`,
    a progress bar counts generation steps (at most max_new_tokens a batch) with its ETA. `adapters`: the LoRA
    adapter each row runs with ("__base__": none), peft's mixed-adapter batch, so that several models share one
    decode loop; None: the model as it is. `sampled`: whether each row samples (at temperature 1) or answers greedily,
    whatever `settings.do_sample` says: rows of both kinds share the loop (`_RowChoice`)."""
    from tqdm.auto import tqdm

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    if sampled is not None and any(sampled):
        if (settings.temperature, settings.top_p) != (1.0, 1.0):
            raise ValueError("rows that sample beside greedy ones draw at temperature 1 without a top-p cut only")
        settings = replace(settings, do_sample=False)  # greedy: _RowChoice's token is the one argmax finds
    config = _generation_config(settings, tokenizer)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompt_ids]
    starts = range(0, len(order), settings.batch_size)
    bar = tqdm(total=len(starts) * settings.max_new_tokens, desc=desc, unit="tok", disable=desc is None)
    for b, start in enumerate(starts):
        rows = order[start : start + settings.batch_size]
        width = max(len(prompt_ids[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in rows], device=device)
        mask = torch.tensor(
            [[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in rows], device=device
        )
        torch.manual_seed(seed + b)
        progress = _token_progress(bar) if desc is not None else None
        mixed = {} if adapters is None else {"adapter_names": [adapters[i] for i in rows]}
        if sampled is not None and any(sampled):
            choice = _RowChoice.for_batch(rows, adapters, sampled, seed + b, device)
            generated = _generate_feeding_each_prompt_once(model, ids, mask, config, progress, choice, **mixed)
        else:
            generated = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=progress, **mixed
            )
        for i, row in zip(rows, generated[:, width:].tolist()):
            out[i] = _cut(row, eos)
        bar.n = (b + 1) * settings.max_new_tokens  # a batch that stopped early (every row at EOS) counts whole
        bar.refresh()
    bar.close()
    model.train(was_training)
    return out


def generate_ids_per_kind(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    kinds: tuple[tuple[str, bool], ...],
    settings: Sampling,
    seed: int,
    desc=None,
) -> dict[tuple[str, bool], list[list[int]]]:
    """{(adapter, sampled): its answer to each prompt} from one decode loop: each prompt once per kind (an adapter,
    "__base__" for none, and whether it samples or answers greedily), side by side, in batches of len(kinds) x
    settings.batch_size, so that a batch holds the prompts (and the padding) that one kind's batch would hold alone.
    A sampled kind draws what a loop of its own would (`_RowChoice`); each row's logits are those of its own loop
    up to the summation order of a larger batch."""
    rows = [p for p in prompt_ids for _ in kinds]
    shared = replace(settings, batch_size=len(kinds) * settings.batch_size)
    adapters = [adapter for adapter, _ in kinds] * len(prompt_ids)
    sampled = [sample for _, sample in kinds] * len(prompt_ids)
    answers = generate_ids(model, tokenizer, rows, shared, seed, desc, adapters=adapters, sampled=sampled)
    return {kind: answers[k :: len(kinds)] for k, kind in enumerate(kinds)}


def generate_ids_per_adapter(
    model, tokenizer, prompt_ids: list[list[int]], adapters: tuple[str, ...], settings: Sampling, seed: int, desc=None
) -> dict[str, list[list[int]]]:
    """{adapter: its answer to each prompt} from one decode loop, every row greedy or every row sampled as
    `settings` says (generate_ids_per_kind)."""
    kinds = tuple((name, settings.do_sample) for name in adapters)
    answers = generate_ids_per_kind(model, tokenizer, prompt_ids, kinds, settings, seed, desc)
    return {name: answers[name, settings.do_sample] for name in adapters}


def _generate_feeding_each_prompt_once(model, ids, mask, config, progress, choice: _RowChoice, adapter_names=None):
    """model.generate on a batch whose rows choose their tokens by `choice`, where rows that are the same prompt on
    the same adapter (a greedy and a sampled answer of one model) share the prompt's forward: it runs once per
    (prompt, adapter), its KV cache is copied to every row that shares it, and each row's first token is chosen
    from that forward's scores; the decode loop goes on from the copied cache. Feeding a prompt is a forward over
    all its tokens where a step feeds one: for short answers it is much of the work. A row whose first token is
    EOS goes on in the loop; its answer is cut there (`_cut`), as before."""
    import copy

    from transformers import LogitsProcessorList

    keys = [(tuple(row), name) for row, name in zip(ids.tolist(), adapter_names or [None] * len(ids))]
    slot, unique = {}, []  # (prompt, adapter) -> its row among the fed ones; the first row holding each
    for i, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(unique)
            unique.append(i)
    source = torch.tensor([slot[key] for key in keys], device=ids.device)
    names = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in unique]}
    one = copy.deepcopy(config)
    one.max_new_tokens = 1
    fed = model.generate(
        input_ids=ids[unique],  # a list index: those rows, in that order
        attention_mask=mask[unique],
        generation_config=one,
        return_dict_in_generate=True,
        output_scores=True,  # the first step's scores as the loop's logits processors leave them
        **names,
    )
    cache = fed.past_key_values
    cache.batch_select_indices(source)
    token = choice(ids, fed.scores[0][source]).argmax(dim=-1)
    if progress is not None:
        progress(ids, None)  # one generation step
    ids, mask = torch.cat([ids, token[:, None]], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if config.max_new_tokens == 1:
        return ids
    rest = copy.deepcopy(config)
    rest.max_new_tokens = config.max_new_tokens - 1
    mixed = {} if adapter_names is None else {"adapter_names": adapter_names}
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        generation_config=rest,
        stopping_criteria=progress,
        logits_processor=LogitsProcessorList([choice]),
        **mixed,
    )


class _RowChoice:
    """A logits processor that chooses each row's next token itself, so that greedy and sampling rows share a
    decode loop run greedily: a greedy row its argmax; the sampling rows of one adapter draw, together and in batch
    order, with torch.multinomial from a generator seeded as that adapter's own loop seeds the global one for this
    batch (torch.manual_seed(seed + b)), i.e. the draws of generate's sampling (softmax of the same float32 scores,
    then multinomial) in a loop of their own. Every other token's score becomes -inf."""

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Generator]]):
        self.groups = groups

    @classmethod
    def for_batch(cls, rows: list[int], adapters, sampled: list[bool], seed: int, device) -> _RowChoice:
        """`rows`: the batch's row numbers; `adapters` and `sampled`: each row's (by row number)."""
        by_adapter: dict = {}
        for position, i in enumerate(rows):
            if sampled[i]:
                by_adapter.setdefault(None if adapters is None else adapters[i], []).append(position)
        groups = [
            (torch.tensor(positions, device=device), torch.Generator(device=device).manual_seed(seed))
            for positions in by_adapter.values()
        ]
        return cls(groups)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = scores.argmax(dim=-1)
        for positions, generator in self.groups:
            probs = torch.nn.functional.softmax(scores[positions], dim=-1)
            chosen[positions] = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


def completion_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The answer as text, special tokens (EOS) dropped: what it adds to the prompt's text when decoded
    after it, so a leading space the tokenizer writes only in context is kept (prompt + answer reads
    back as the text that was sampled)."""
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)
    return whole[len(before) :] if whole.startswith(before) else tokenizer.decode(ids, skip_special_tokens=True)


def sample_answers(model, tokenizer, prompts: list, k: int, settings: Sampling, seed: int) -> dict:
    """K answers per prompt: {"answers": [[{"text", "tokens"}] * k] per prompt, "tokens": generated tokens,
    "seconds": wall time, "tokens_per_second"}."""
    ids = prompt_token_ids(tokenizer, prompts)
    start = time.perf_counter()
    completions = generate_ids(model, tokenizer, [p for p in ids for _ in range(k)], settings, seed)
    seconds = time.perf_counter() - start
    answers = [
        [{"text": completion_text(tokenizer, ids[i], c), "tokens": len(c)} for c in completions[i * k : (i + 1) * k]]
        for i in range(len(prompts))
    ]
    tokens = sum(map(len, completions))
    return {"answers": answers, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}


def generation_speed(model, tokenizer, prompts: list, k: int, settings: Sampling, seed: int) -> dict:
    """Tokens/s of the batched sampler against one prompt at a time through plain `generate` (batch 1,
    KV cache on: the usual loop), on the same prompts and K."""
    batched = sample_answers(model, tokenizer, prompts, k, settings, seed)
    one = Sampling(settings.temperature, settings.top_p, settings.max_new_tokens, batch_size=1)
    single = sample_answers(model, tokenizer, prompts, k, one, seed)
    return {
        "sequences": len(prompts) * k,
        "batched_tokens_per_second": batched["tokens_per_second"],
        "one_at_a_time_tokens_per_second": single["tokens_per_second"],
        "batched_seconds": batched["seconds"],
        "one_at_a_time_seconds": single["seconds"],
        "speedup": single["seconds"] / max(batched["seconds"], 1e-9),
    }
