"""The demo's controlled-sentiment task (dpo/offline/sentiment.py) as a rounds task: its ground-truth
reward as a `reward` function, its prompts, and its pi_ref trained by the demo's phase 1.

    reward: dpo.rounds.sentiment:ground_truth
"""

from __future__ import annotations

import re
from pathlib import Path

from dpo.log import log
from dpo.offline.sentiment import SentimentTask, n_words, reused_or_trained_reference, reward, well_formed


def ground_truth(prompt, completion: str) -> float:
    """The task's ground-truth reward, (#positive - #negative words) / #words of the completion."""
    return reward(completion)


def task_of(args) -> SentimentTask:
    return SentimentTask(seed=args.task_seed, heldout_topics=args.heldout_topics)


def sentiment_prompts(args, n: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): `n` prompts on the training topics, `args.eval_prompts` on the
    held-out topics, drawn as benchmarks/frontier_sentiment.py draws its evaluation prompts (seed + 2)."""
    task = task_of(args)
    return task.prompts("train", n, seed), task.prompts("heldout", args.eval_prompts, seed + 2)


def initial_model(args, training_args, output_dir: Path) -> str:
    """pi_ref of the demo (its phase 1, the same settings and seed give the same model), trained once into
    output_dir/sft_reference; a rerun reuses it when it is whole: its marker (written last, dpo/folders.py)
    is there and every file has the sha256 it records. A folder without it (a kill during its save, a copy
    of something else) is refused in one line, before any weights load: never read half-written."""
    folder = output_dir / "sft_reference"
    advice = (
        f"delete {folder} and run the same command again; the recipe trains it again (the same settings and seed "
        "give the same model)"
    )
    sft_dir, losses = reused_or_trained_reference(task_of(args), folder, args, training_args, advice)
    log(
        f"pi_ref: trained into {sft_dir}"
        if losses is not None
        else f"pi_ref: {folder} (trained by an earlier run of this folder; its files checked)"
    )
    return str(sft_dir)


# The "rare best answer" reward (benchmarks/rounds_offpolicy.py): the ground truth, plus 1 for a review only a
# policy tuned far towards praise writes often: well formed, at least RARE_PHRASES phrases, every adjective
# positive. pi_ref writes it for a few per cent of held-out prompts (the benchmark measures the share), so two
# samples of pi_ref rarely hold one, while best-of-K samples of a policy drifting towards praise hold more.
RARE_PHRASES = 3
RARE_BONUS = 1.0


def all_praise(completion: str) -> bool:
    """A well-formed review of at least RARE_PHRASES phrases whose every adjective is positive (each phrase
    is two words, so the ground truth is then exactly 0.5). The text as any sampler decodes it: the rounds'
    generic one writes a space before punctuation (" great plot , lovely music ."), which well_formed refuses."""
    text = re.sub(r"\s+([,.:])", r"\1", completion)
    return well_formed(text) and n_words(text) >= 2 * RARE_PHRASES and reward(text) == 0.5


def rare_praise(prompt, completion: str) -> float:
    """The ground truth plus RARE_BONUS for an all-praise review (all_praise): top value 1.5, rare under pi_ref."""
    return reward(completion) + (RARE_BONUS if all_praise(completion) else 0.0)
