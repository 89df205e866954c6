"""The demo's controlled-sentiment task (dpo/offline/sentiment.py) as a rounds task: its ground-truth
reward as a `reward` function, its prompts, and its pi_ref trained by the demo's phase 1.

    reward: dpo.rounds.sentiment:ground_truth
"""

from __future__ import annotations

from pathlib import Path

from dpo.errors import UserError
from dpo.offline.sentiment import SentimentTask, reward, train_reference
from dpo.train.model_checks import TOKENIZER_FILES


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
    output_dir/sft_reference; a rerun finds it there."""
    folder = output_dir / "sft_reference"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):  # its save was cut short
            raise UserError(
                f"{folder} holds the starting model this recipe trained but not its tokenizer (the save was cut "
                f"short): delete {folder} and run the same command again; the recipe trains it again"
            )
        return str(folder)
    sft_dir, _ = train_reference(task_of(args), folder, args, training_args)
    return str(sft_dir)
