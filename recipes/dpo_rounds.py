"""On-policy DPO in rounds: sample K answers per prompt from the current policy, score them with a reward,
pair the best against the worst, train DPO, repeat.

    python recipes/dpo_rounds.py --config recipes/dpo_rounds_sentiment.yaml    # the demo's task, its true reward
    python recipes/dpo_rounds.py                                               # SmolLM2 + HH prompts (recipes/dpo_rounds.yaml)
    python recipes/dpo_rounds.py --rounds 5                                    # the same folder: only rounds 4-5 run
    python recipes/dpo_rounds.py --reward my_module:score                      # (prompt, completion) -> float: docs/rewards.md
    python recipes/dpo_rounds.py --reward path/to/reward-model --reference previous --keep_pairs true
    python benchmarks/rounds_sentiment.py                                      # rounds against the offline frontier

Each round is a complete, resumable unit in output_dir/round-N/ (samples.jsonl, pairs.jsonl, a complete
DPO run, round.json); a rerun continues at the first unfinished round, a killed round's DPO run resumes
from its newest complete checkpoint; a rerun with other settings where no round finished and no DPO run began
starts round 1 over, and --overwrite_output_dir true deletes what this recipe wrote and starts over
(dpo/rounds/rerun.py); output_dir/rounds_settings.json, written before round 1, holds the
settings (and a sha256 of the prompts) every rerun must repeat. output_dir/rounds.json, rounds.md and rounds.png summarise every
round: sampled reward (mean, best-of-K), pairs kept and dropped, held-out reward and KL to the starting
model with 95% intervals, implicit-reward accuracy, time per phase. The library part is dpo/rounds/.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch

from dpo.data.formats import ensure_chat_template
from dpo.data.tools import template_for_rows
from dpo.errors import UserError, exit_on_user_error
from dpo.evaluation.sampling import render_prompt
from dpo.log import log
from dpo.rounds.heldout import heldout_metrics
from dpo.rounds.loop import RoundsContext, run_rounds
from dpo.rounds.models import Handoff, load_policy
from dpo.rounds.prompts import prompt_sets
from dpo.rounds.rerun import remove_rounds, rounds_written, start_unfinished_over, started_dpo_runs
from dpo.rounds.reward import check_finished_rounds_scored_by, make_reward
from dpo.rounds.settings import (
    SENTIMENT,
    RoundsArguments,
    check_round_plan,
    check_rounds_settings,
    fixed_settings,
)
from dpo.rounds.summary import (
    SETTINGS_RECORD,
    finished_rounds,
    read_settings_record,
    read_summary,
    write_settings_record,
)
from dpo.train.adapters import start_point
from dpo.train.config import load_recipe_args
from dpo.train.model_checks import load_tokenizer
from dpo.train.safety.identity import check_same_base
from dpo.train.safety.runs import differences, run_settings

ScriptArguments = RoundsArguments  # the recipe's own settings (dpo/rounds/settings.py)


def same_run_or_refuse(output_dir: Path, header: dict, rounds: int, sentiment_model: bool) -> dict | None:
    """The folder's rounds.json when its run had these settings (more rounds may be asked for); None for a
    new folder, or one where round 1 starts over. The settings are compared with rounds_settings.json, written
    before round 1 started (a run stopped inside round 1 has no rounds.json yet), else with rounds.json. Other
    settings where no round finished and no DPO run started: round 1 starts over (dpo/rounds/rerun.py). Other
    settings otherwise, round folders without either record, or fewer rounds than have finished: refused, before
    any weights load."""
    existing = read_summary(output_dir)
    recorded = read_settings_record(output_dir) or existing
    start_over = "--overwrite_output_dir true to delete what the rounds recipe wrote there and start over"
    if recorded is None:
        if rounds_written(output_dir):
            raise UserError(
                f"--output_dir {output_dir} holds round folders but no record of their settings ({SETTINGS_RECORD} "
                f"or rounds.json): they cannot be checked against these settings; use another --output_dir, or "
                f"{start_over}"
            )
        return None
    # the base model's weights (or hub commit), not only its name: replaced in place, it is refused as such
    name = header["training"].get("model_name_or_path")
    fix = f"Put the model the rounds started from back at {name}, or use another --output_dir"
    training = check_same_base(
        output_dir / SETTINGS_RECORD, recorded.get("training", {}), header["training"], name, fix
    )
    diffs = differences(recorded["settings"], header["settings"]) + differences(training, header["training"])
    done, began = finished_rounds(output_dir), started_dpo_runs(output_dir)
    if diffs and not done and not began:
        start_unfinished_over(output_dir, recorded, header, sentiment_model)
        return None
    if diffs:
        what = "rounds run" if done else f"an unfinished round whose DPO run began ({', '.join(map(str, began))})"
        raise UserError(
            f"--output_dir {output_dir} holds {what} with other settings ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}): use another --output_dir, the same settings to continue, or "
            f"{start_over}"
        )
    if done and done[-1] > rounds:
        raise UserError(
            f"--rounds {rounds}: {output_dir} already holds {done[-1]} finished rounds, and the summary would drop "
            f"the later ones; ask for --rounds {done[-1]} or more"
        )
    return existing


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args, training_args, model_args = load_recipe_args(ScriptArguments, __file__, argv, output_kind="rounds")
    check_rounds_settings(args, training_args)
    if training_args.resume_from_checkpoint:
        raise UserError(
            "--resume_from_checkpoint: rounds resume by themselves; run the same command again and it continues "
            "at the first unfinished round (a stopped DPO run from its newest complete checkpoint)"
        )
    torch.set_num_threads(args.torch_threads)
    output_dir, seed = Path(training_args.output_dir), training_args.seed
    reward = make_reward(args.reward, output_dir)  # a reward model is checked here, before any weights load
    training = {k: v for k, v in run_settings(training_args, model_args, []).items() if k != "training_data_sha256"}
    train_prompts, heldout_prompts = prompt_sets(args, seed)
    chat = bool(train_prompts) and isinstance(train_prompts[0], list)  # chat prompts (a dataset's), or text ones
    template = template_for_rows(training_args.chat_template_path, chat, f"the prompts of {args.prompts}")
    if args.prompts_per_round > len(train_prompts):
        raise UserError(
            f"prompts_per_round {args.prompts_per_round}: there are {len(train_prompts)} training prompts, so a round "
            "would sample some twice and pair an answer of a held-out prompt with its twin in training; "
            f"set prompts_per_round to {len(train_prompts)} or less (0: all of them)"
        )
    check_round_plan(args, training_args, len(train_prompts))  # before the starting model is trained or sampled
    # the prompts themselves, not only the file's name: an edited prompt file is other settings
    prompts_sha256 = hashlib.sha256(json.dumps([train_prompts, heldout_prompts]).encode()).hexdigest()
    header = {"settings": {**fixed_settings(args), "prompts_sha256": prompts_sha256}, "training": training}
    sentiment_model = args.prompts == SENTIMENT and model_args.model_name_or_path is None  # trained by the run
    if training_args.overwrite_output_dir and output_dir.is_dir():  # the rounds recipe's files only
        removed = remove_rounds(output_dir, model_args.model_name_or_path)
        log(f"--overwrite_output_dir: deleted {', '.join(removed) or 'nothing (no rounds there)'} in {output_dir}")
    existing = same_run_or_refuse(output_dir, header, args.rounds, sentiment_model)
    check_finished_rounds_scored_by(output_dir, reward)  # the reward's code or weights edited since: refused

    sft_adapter = None
    if sentiment_model:
        from dpo.rounds.sentiment import initial_model

        model_args.model_name_or_path = initial_model(args, training_args, output_dir)
    elif model_args.model_name_or_path is None:
        raise UserError("model_name_or_path is not set: name the policy's starting model (hub id or folder)")
    else:
        model_args.model_name_or_path, sft_adapter = start_point(model_args, training_args, args.sft_adapter_path)
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    if chat:  # chat prompts: the chat_template_path file's template, else the policy's own (or plain)
        if template:
            tokenizer.chat_template = template  # sampled, trained and saved with it, as recipes/dpo_any.py does
        else:
            ensure_chat_template(tokenizer)
        example = render_prompt(tokenizer, train_prompts[0])
        log(f"policy {model_args.model_name_or_path} continues, e.g.: {example!r}")  # once, like the reward model
    log(
        f"rounds: {args.rounds}, K = {args.samples_per_prompt}, reward = {reward.describe()}, pairing {args.pairing}, "
        f"reference {args.reference}; {len(train_prompts)} training prompts, {len(heldout_prompts)} held out"
    )

    write_settings_record(output_dir, header)  # before round 1: a rerun is checked against it from now on
    start = Handoff()  # the starting model once loaded: round 1 samples with it instead of loading it again
    if existing is not None:
        initial = existing["initial"]
    else:
        model = load_policy(model_args, training_args, sft_adapter)
        initial = heldout_metrics(
            model, tokenizer, heldout_prompts, reward, args.max_new_tokens, seed + 3, sft_adapter
        )
        start = Handoff(model)
        del model  # the handoff holds it alone, so run_rounds can free it before round 1 trains
        log(f"starting model: held-out reward {initial['reward']:+.3f} on {initial['n']} prompts")
    context = RoundsContext(
        args=args,
        training_args=training_args,
        model_args=model_args,
        tokenizer=tokenizer,
        reward=reward,
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        output_dir=output_dir,
        sft_adapter=sft_adapter,
        eval_seed=seed + 3,
        summary_header={**header, "initial": initial},
    )
    records = run_rounds(context, start)
    log(f"summary: {output_dir / 'rounds.md'} (+ rounds.json, rounds.png)")
    return {**context.summary_header, "rounds": records}


if __name__ == "__main__":
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    began = time.time()
    summary = main()
    log(f"{len(summary['rounds'])} rounds in {time.time() - began:.0f} s")
