"""The settings of on-policy DPO in rounds (recipes/dpo_rounds.py), and the checks that need more than
one setting or the file system. Numeric bounds and the fixed choices are in the settings gate's table
(dpo/gate/table.py); everything here runs before any weights load."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from dpo.errors import UserError
from dpo.helptext import setting

FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # module.path:function
SENTIMENT = "sentiment"  # the demo's task as the prompt source (dpo/offline/sentiment.py)


@dataclasses.dataclass
class RoundsArguments:
    """On-policy DPO in rounds: sample K answers per prompt from the current policy, score them, pair the
    best against the worst (or a random lower one), train DPO, repeat. YAML keys = field names."""

    prompts: str = setting(
        SENTIMENT,
        "Where prompts come from: 'sentiment' (the demo's task: training topics to sample, held-out "
        "topics to evaluate), or a dataset (hub id or local file/folder, any layout recipes/dpo_any.py reads; "
        "only its prompts are used).",
    )
    rounds: int = setting(3, "Rounds of sample -> score -> pair -> train.")
    prompts_per_round: int = setting(
        0, "Prompts sampled each round, a fresh slice of the prompt set each round; 0: all of them."
    )
    samples_per_prompt: int = setting(4, "K: answers sampled per prompt from the current policy.")
    temperature: float = setting(1.0, "Sampling temperature.")
    top_p: float = setting(1.0, "Nucleus sampling: 1 samples the whole distribution.")
    max_new_tokens: int = setting(64, "Longest sampled answer, in tokens.")
    generation_batch_size: int = setting(
        64, "Prompts per generation batch (KV cache, left padding, sorted by length)."
    )
    reward: str = setting(
        "dpo.rounds.sentiment:ground_truth",
        "The reward: a Python function 'module:function' taking (prompt, completion) -> float, or a "
        "reward model (hub id or folder; AutoModelForSequenceClassification, one score, safetensors; its own "
        "chat template is applied and shown once).",
    )
    pairing: str = setting(
        "max_min", "max_min: best against worst answer; max_random: best against a random lower-scored one."
    )
    min_margin: float = setting(
        0.0,
        "A prompt whose chosen-rejected reward margin is below this gives no pair (ties never pair; "
        "ties and near-ties are counted in rounds.json).",
    )
    min_pairs: int = setting(8, "A round with fewer pairs than this stops the run, saying why.")
    reference: str = setting(
        "initial",
        "initial: the starting model, fixed across rounds; previous: the last round's policy, frozen "
        "(through the SFT-adapter mechanism).",
    )
    keep_pairs: bool = setting(False, "Train each round on all rounds' pairs so far instead of its own only.")
    sft_adapter_path: str | None = setting(
        None, "An SFT adapter on model_name_or_path as the starting model (frozen reference of round 1)."
    )
    eval_prompts: int = setting(64, "Held-out prompts: reward and KL to the initial model after each round.")
    test_size: float = setting(0.1, "Share of each round's pairs held out for the implicit-reward accuracy.")
    # ── the sentiment task only (prompts: sentiment) ───────────────────────────────────────────────
    task_prompts: int = setting(1024, "sentiment: training prompts drawn from the training topics.")
    task_seed: int = setting(0, "sentiment: seeds each topic's tone and the split.")
    heldout_topics: int = setting(6, "sentiment: topics (of 24) for evaluation only.")
    sft_examples: int = setting(4096, "sentiment: reviews pi_ref is trained on.")
    sft_steps: int = setting(300, "sentiment: SFT steps of pi_ref.")
    sft_batch_size: int = setting(64, "sentiment: SFT batch size.")
    sft_learning_rate: float = setting(5e-3, "sentiment: SFT learning rate.")
    torch_threads: int = setting(1, "CPU threads (a tiny model runs fastest on one).")


# What a rerun must share with the run that made the folder (asking for more rounds is allowed).
FIXED = tuple(f.name for f in dataclasses.fields(RoundsArguments) if f.name not in ("rounds", "torch_threads"))


def check_rounds_settings(args: RoundsArguments, training_args) -> None:
    """Relations the gate's table cannot state, before any weights load."""
    if getattr(training_args, "precompute_ref_log_probs", False) or getattr(training_args, "reference_cache", False):
        raise UserError(
            "precompute_ref_log_probs / reference_cache: the rounds recipe changes the reference adapter after the "
            "trainer is built (reference: initial), so values computed inside it would be another reference's; "
            "leave both false"
        )
    if args.prompts == SENTIMENT and args.sft_adapter_path:
        raise UserError("sft_adapter_path: the sentiment task trains its own starting model; leave it unset")
    if not FUNCTION.fullmatch(args.reward) and not Path(args.reward).expanduser().exists():
        if args.reward.startswith((".", "/", "~")) or args.reward.count("/") != 1:
            raise UserError(
                f"reward {args.reward!r} is neither 'module:function' nor a reward-model folder or hub id "
                "(org/name); e.g. reward: dpo.rounds.sentiment:ground_truth"
            )


def fixed_settings(args: RoundsArguments) -> dict:
    """The settings recorded in rounds.json that a rerun of the same folder must repeat."""
    return {name: getattr(args, name) for name in FIXED}


def check_round_plan(args: RoundsArguments, training_args, train_prompts: int) -> None:
    """Before any model work (the sentiment task's SFT, sampling): round 1's training plan with the most pairs
    it can have, one per prompt less test_size held out (dpo/gate/plan.py). A plan refused with the most pairs
    is refused with any: said now, not after the starting model was trained and sampled."""
    from dpo.gate.plan import check_plan
    from dpo.train.distributed import topology

    per_round = args.prompts_per_round or train_prompts
    pairs = per_round - (math.ceil(args.test_size * per_round) if args.test_size else 0)
    try:
        check_plan(pairs, training_args, topology(training_args).world_size)
    except UserError as err:
        raise UserError(
            f"round 1 trains on at most {pairs} pairs (one per prompt of {per_round} a round, less test_size "
            f"{args.test_size} held out), and even then {err}; more prompts a round: raise prompts_per_round"
        ) from None
