"""The prompt set of a rounds run: the sentiment task's, or the prompts of a preference dataset (any
layout dpo/data/pairs.py reads; chosen and rejected are ignored), split into training and held-out
prompts, and each round's slice of the training prompts."""

from __future__ import annotations

import json
import random

from dpo.errors import UserError
from dpo.rounds.settings import SENTIMENT


def dataset_prompts(name: str, seed: int, heldout: int) -> tuple[list, list]:
    """(training prompts, held-out prompts) of a preference dataset: its distinct usable prompts (chat
    message lists), shuffled with `seed`; the first `heldout` are held out."""
    from dpo.data.loading import load_preference_data
    from dpo.data.pairs import to_pairs

    pairs, _ = to_pairs(load_preference_data(name), name, prompt_format="chat")
    seen, prompts = set(), []
    for prompt, problem in zip(pairs["prompt"], pairs["problem"]):
        key = json.dumps(prompt, sort_keys=True)
        if not problem and key not in seen:
            seen.add(key)
            prompts.append(prompt)
    random.Random(seed).shuffle(prompts)
    if len(prompts) < 2:  # eval_prompts is at least 1: lowering it cannot help
        raise UserError(
            f"{name}: {len(prompts)} distinct usable prompt(s), but the rounds need at least 2, one held out "
            "(eval_prompts is at least 1) and one to sample and train on: use a dataset with more distinct prompts"
        )
    if len(prompts) <= heldout:
        raise UserError(
            f"{name}: {len(prompts)} distinct usable prompts, but eval_prompts holds out {heldout}, leaving none to "
            f"train on: set eval_prompts to {len(prompts) - 1} or less"
        )
    return prompts[heldout:], prompts[:heldout]


def prompt_sets(args, seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts) for the `prompts` setting."""
    if args.prompts == SENTIMENT:
        from dpo.rounds.sentiment import sentiment_prompts

        return sentiment_prompts(args, args.task_prompts, seed)
    return dataset_prompts(args.prompts, seed, args.eval_prompts)


def round_prompts(prompts: list, per_round: int, round_number: int) -> list:
    """Round `round_number`'s prompts (1-based): all of them (per_round 0), else the next `per_round`
    after the previous rounds' slices, wrapping around the set."""
    if per_round == 0:
        return list(prompts)
    start = (round_number - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]
