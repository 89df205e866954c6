"""The round loop: each round a complete, resumable unit in output_dir/round-N/.

    round-N/samples.jsonl   one row per prompt: the prompt, its K answers with their rewards, and `scored_by`
                            (the identity of the reward's source or weights: dpo/rounds/reward.py)
    round-N/pairs.jsonl     the pairs made from them (chosen, rejected and their rewards)
    round-N/                a complete DPO run: adapter, resolved_config.yaml, final_metrics.json,
                            run_complete.json (dpo/train/trainer.py train_and_save)
    round-N/round.json      written last: the round's numbers; its presence means the round is done

A rerun continues at the first round without round.json: samples already written are reused (the policy
that drew them has not changed: round-N/round_start.json records its identity, dpo/rounds/chain.py; they are
scored again when the reward has), a DPO run with complete checkpoints resumes from the newest, a finished one is
not trained again. A round derived from a round that was run again since (its folder deleted) is moved aside and
run again, and so on downstream. Asking a finished folder for more rounds runs only the new ones. The recipe
holds the output_dir lock for the whole loop; each round's DPO run takes its own folder's lock too.
Every file read back is checked (dpo/files.py); nothing outside output_dir is touched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from dpo.data.doctor import check_data
from dpo.data.loading import split_heldout
from dpo.errors import UserError
from dpo.evaluation.sampling import Sampling, sample_answers
from dpo.files import jsonl_text, read_json_object, read_jsonl_objects, write_text_atomic
from dpo.log import log
from dpo.rounds.chain import check_round_start, write_start
from dpo.rounds.heldout import heldout_metrics
from dpo.rounds.models import Handoff, describe_reference, load_policy, set_reference
from dpo.rounds.pairing import make_pairs, training_rows
from dpo.rounds.prompts import round_prompts
from dpo.rounds.summary import ROUND_SHAPE, write_summary
from dpo.signals import saving
from dpo.train.safety.checkpoints import newest_complete_checkpoint, write_json_atomic
from dpo.train.safety.runs import finished_run, verify_finished_run
from dpo.train.trainer import build_dpo_trainer, train_and_save

# The stop line after a Ctrl-C or SIGTERM during a round's save (dpo.signals.saving): what was saved stays
ROUNDS_AGAIN = "Run the same command again: the rounds continue from there"
PROMPT = (str, list)  # a text prompt or a list of chat messages
SAMPLE_SHAPE = {"prompt": (PROMPT, None), "answers": (list, dict)}
PAIR_SHAPE = {
    "prompt": (PROMPT, None),
    "chosen": (str, None),
    "rejected": (str, None),
    "chosen_reward": (float, None),
    "rejected_reward": (float, None),
}
ANSWER_SHAPE = {"text": (str, None), "tokens": (int, None), "reward": (float, None)}


def round_dir(output_dir: Path, n: int) -> Path:
    return output_dir / f"round-{n}"


@dataclass
class RoundsContext:
    """What every round reads: the settings, tokenizer, reward, prompt sets and where the run lives."""

    args: object
    training_args: object
    model_args: object
    tokenizer: object
    reward: object
    train_prompts: list
    heldout_prompts: list
    output_dir: Path
    sft_adapter: str | None
    eval_seed: int
    summary_header: dict

    def adapter_before(self, n: int) -> str | None:
        """The adapter round n starts from and samples with: round n-1's, or the SFT adapter (or none)."""
        return str(round_dir(self.output_dir, n - 1)) if n > 1 else self.sft_adapter


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """All rows or no file (dpo.files.write_text_atomic)."""
    write_text_atomic(path, jsonl_text(rows, path, ensure_ascii=False))  # records: rewards are checked finite


def read_samples(path: Path, prompts: list) -> list[dict]:
    """samples.jsonl, verified: every row's shape, its answers' shape, and the prompts this round samples."""
    fix = f"delete {path} to sample this round again"
    rows = read_jsonl_objects(path, SAMPLE_SHAPE, fix)
    from dpo.files import shape_problem

    for number, row in enumerate(rows, 1):
        for answer in row["answers"]:
            if problem := shape_problem(answer, ANSWER_SHAPE):
                raise UserError(f"{path}:{number}: an answer {problem}; {fix}")
    if [r["prompt"] for r in rows] != prompts:
        raise UserError(f"{path} holds other prompts than this round samples (another run's file?); {fix}")
    return rows


def read_pairs(path: Path) -> list[dict]:
    return read_jsonl_objects(path, PAIR_SHAPE, f"delete {path.parent} to run that round again")


def score_rows(n: int, prompts: list, answers: list[list[dict]], reward, scored_by: str) -> list[dict]:
    """samples.jsonl's rows: each prompt, its answers with their rewards, and `scored_by` (the reward's identity,
    reward.identity()), so a rerun can tell whether the reward that scored them has changed since."""
    flat_prompts = [p for p, row in zip(prompts, answers) for _ in row]
    flat_texts = [a["text"] for row in answers for a in row]
    where = [f"round {n}'s prompt {i + 1}, answer {j + 1}" for i, row in enumerate(answers) for j in range(len(row))]
    scores = iter(reward(flat_prompts, flat_texts, label=where.__getitem__))
    return [
        {"prompt": prompt, "answers": [{**a, "reward": next(scores)} for a in row], "scored_by": scored_by}
        for prompt, row in zip(prompts, answers)
    ]


def _sample(n, model, ctx, prompts, seed, clock) -> tuple[list[dict], dict]:
    args = ctx.args
    settings = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.generation_batch_size)
    drawn = sample_answers(model, ctx.tokenizer, prompts, args.samples_per_prompt, settings, seed)
    clock["sample"] = drawn["seconds"]
    start = time.perf_counter()
    rows = score_rows(n, prompts, drawn["answers"], ctx.reward, ctx.reward.identity())
    clock["score"] = time.perf_counter() - start
    return rows, {"tokens": drawn["tokens"], "tokens_per_second": drawn["tokens_per_second"]}


def reuse_samples(n: int, ctx, folder: Path, prompts: list) -> list[dict]:
    """Round n's samples.jsonl, verified. Scored by another reward than this run's (its code or weights edited
    since, or a file written before samples recorded it): its answers are scored again (the sampled text is
    kept, only the rewards change) and the file rewritten, said in the log. Refused when the round's DPO run
    already finished: it trained on pairs ranked by the old scores."""
    path = folder / "samples.jsonl"
    samples, identity = read_samples(path, prompts), ctx.reward.identity()
    recorded = {row.get("scored_by") for row in samples}
    if recorded == {identity}:
        log(f"round {n}: reusing {path} ({len(samples)} prompts)")
        return samples
    then = ", ".join(sorted(str(r)[:12] if r else "not recorded" for r in recorded))
    changed = f"{path} was scored by another version of {ctx.reward.describe()} (identity {then}; now {identity[:12]})"
    if finished_run(folder) is not None:
        raise UserError(
            f"round {n}: {changed}, and the round's DPO run in {folder} trained on pairs ranked by those scores: "
            f"delete {folder} to run round {n} again with this reward, or use another --output_dir"
        )
    log(f"round {n}: {changed}: scoring its answers again (the sampled answers are kept) and rewriting it")
    rows = score_rows(n, prompts, [row["answers"] for row in samples], ctx.reward, identity)
    write_jsonl_atomic(path, rows)
    return rows


def sample_stats(samples: list[dict]) -> dict:
    """Mean reward over every answer and best-of-K (mean over prompts of the best answer's reward)."""
    rewards = [[a["reward"] for a in row["answers"]] for row in samples]
    return {
        "mean_reward": sum(map(sum, rewards)) / sum(map(len, rewards)),
        "best_of_k": sum(map(max, rewards)) / len(rewards),
        "prompts": len(samples),
    }


def round_seed(training_args, n: int) -> int:
    return training_args.seed + 1000 * n  # each round its own samples


def run_round(n: int, ctx, handoff: Handoff):
    """Round n, resumed where a previous attempt stopped; samples with the model in `handoff` (the policy
    round n starts from) when it holds one, else loads it. Returns (round.json, the round's policy)."""
    args, training_args, model_args = ctx.args, ctx.training_args, ctx.model_args
    folder = round_dir(ctx.output_dir, n)
    folder.mkdir(parents=True, exist_ok=True)
    started_from = write_start(ctx, n, folder)  # before anything: what this round's samples and training derive from
    clock, seed = {}, round_seed(training_args, n)
    prompts = round_prompts(ctx.train_prompts, args.prompts_per_round, n)
    samples_file, pairs_file = folder / "samples.jsonl", folder / "pairs.jsonl"
    if samples_file.is_file():
        samples, speed = reuse_samples(n, ctx, folder, prompts), {}
        handoff.take()  # not needed: drop it
    else:
        policy = handoff.take()
        if policy is None:  # a resumed run: the policy of round n-1 from its saved adapter (round 1: the start)
            policy = load_policy(model_args, training_args, ctx.adapter_before(n))
        samples, speed = _sample(n, policy, ctx, prompts, seed, clock)
        with saving(str(samples_file), "samples", n, advice=ROUNDS_AGAIN):
            write_jsonl_atomic(samples_file, samples)
    stats = {**sample_stats(samples), **speed}
    log(
        f"round {n}: {stats['prompts']} prompts x {args.samples_per_prompt} answers, mean reward "
        f"{stats['mean_reward']:+.3f}, best-of-{args.samples_per_prompt} {stats['best_of_k']:+.3f}"
    )

    start = time.perf_counter()
    pairs, counts = make_pairs(samples, args.pairing, args.min_margin, seed)
    with saving(str(pairs_file), "pairs", n, advice=ROUNDS_AGAIN):
        write_jsonl_atomic(pairs_file, pairs)
    clock["pair"] = time.perf_counter() - start
    log(
        f"round {n}: {counts['kept']} pairs kept, {counts['dropped']} prompts dropped ({counts['tie']} ties, "
        f"{counts['near_tie']} below min_margin {args.min_margin}, {counts['same_text']} same text)"
    )
    if counts["kept"] < args.min_pairs:
        raise UserError(
            f"round {n}: only {counts['kept']} pairs from {len(samples)} prompts ({counts['tie']} ties, "
            f"{counts['near_tie']} near-ties, {counts['same_text']} same text), fewer than min_pairs {args.min_pairs}: "
            "the reward cannot tell this policy's answers apart. Raise samples_per_prompt or temperature, lower "
            "min_margin, or use more prompts_per_round"
        )
    train_pairs = [p for m in range(1, n) for p in read_pairs(round_dir(ctx.output_dir, m) / "pairs.jsonl")]
    train_pairs = (train_pairs if args.keep_pairs else []) + pairs
    # the data doctor's checks, as the offline recipes run them: a pair TRL would drop or train as nothing (a
    # prompt that alone fills max_length under keep_start, answers identical once cut) is dropped and counted
    # here, so the round's counts are the pairs it trained and held out
    chat = bool(train_pairs) and isinstance(train_pairs[0]["prompt"], list)
    report = check_data(
        Dataset.from_list(training_rows(train_pairs)),
        f"round {n}'s pairs",
        ctx.tokenizer,
        prompt_format="chat" if chat else "text",
        max_length=training_args.max_length,
        truncation_mode=training_args.truncation_mode,
    )
    if warning := report.warning():  # what was dropped and why, counted (nothing said when nothing was)
        log(warning)
    if len(report.kept) < args.min_pairs:
        raise UserError(
            f"round {n}: {len(report.kept)} of {len(train_pairs)} pairs left after the data doctor's checks "
            f"({report.warning()}), fewer than min_pairs {args.min_pairs}: raise max_length, or use shorter prompts"
        )
    train, heldout = split_heldout(report.kept, args.test_size, training_args.seed)

    start = time.perf_counter()
    policy = None  # the trainer loads its own; free the sampler's copy first
    metrics = _train(n, ctx, folder, train, heldout)
    clock["train"] = time.perf_counter() - start

    start = time.perf_counter()
    policy = load_policy(model_args, training_args, str(folder))  # on-policy: what round n+1 samples from
    result = heldout_metrics(
        policy, ctx.tokenizer, ctx.heldout_prompts, ctx.reward, args.max_new_tokens, ctx.eval_seed, ctx.sft_adapter
    )
    clock["evaluate"] = time.perf_counter() - start
    record = {
        "round": n,
        "samples": stats,
        "pairs": counts,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout) if heldout is not None else 0,
        "heldout": result,
        "implicit_reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "dpo_steps": metrics.get("steps"),
        "train_loss": metrics.get("train_loss"),
        "reference": describe_reference(args.reference, n, ctx.sft_adapter),
        "start": started_from,
        "scored_by": ctx.reward.identity(),  # checked when a rerun continues after this round (scored_by_check)
        "seconds": {k: round(v, 2) for k, v in clock.items()},
    }
    with saving(str(folder / "round.json"), "round", n, advice=ROUNDS_AGAIN):
        write_json_atomic(folder / "round.json", record)
    log(
        f"round {n} done: held-out reward {result['reward']:+.3f} [{result['reward_low']:+.3f}, "
        f"{result['reward_high']:+.3f}], KL to the initial model {result['kl']:.2f} nats [{result['kl_low']:.2f}, "
        f"{result['kl_high']:.2f}]"
    )
    return record, policy


ROUNDS_RESUME = "Resume by running the same command again: the rounds continue with this round's DPO run from there"


def _train(n, ctx, folder: Path, train, heldout) -> dict:
    """Round n's DPO run in `folder`: nothing to do when it finished, resumed from its newest complete
    checkpoint when it was stopped, else from the start. Returns its final metrics (+ steps)."""
    finished = finished_run(folder)
    if finished is not None:
        log(f"round {n}: the DPO run in {folder} is finished; not training it again")
        verify_finished_run(folder, "the rounds recipe")  # its files are the bytes the run wrote (sha256)
        metrics = (
            read_json_object(folder / "final_metrics.json", {}, f"delete {folder} to train round {n} again")
            if (folder / "final_metrics.json").is_file()
            else {}
        )
        return {**metrics, "steps": finished.get("global_step")}
    training_args = copy.copy(ctx.training_args)
    training_args.output_dir = str(folder)
    training_args.resume_from_checkpoint = None
    last = newest_complete_checkpoint(folder, warn=False)
    if last is not None:
        training_args.resume_from_checkpoint = str(last)
        log(f"round {n}: resuming its DPO run from {last}")
    start_adapter = ctx.adapter_before(n)
    log(f"round {n}: policy starts from {start_adapter or 'a fresh LoRA adapter'}")
    trainer = build_dpo_trainer(  # its log line names the reference set_reference makes (only that one)
        ctx.model_args,
        training_args,
        train,
        heldout,
        ctx.tokenizer,
        None,
        start_adapter,
        reference=lambda built: set_reference(built, ctx.args.reference, n, ctx.sft_adapter),
    )
    metrics = train_and_save(  # the rounds refuse --resume_from_checkpoint: they continue by themselves
        trainer,
        # resolved_config.yaml: the rounds run's own settings (its output_dir), a --config for recipes/dpo_rounds.py
        (ctx.args, ctx.training_args, ctx.model_args),
        training_args.resume_from_checkpoint,
        heldout,
        resume_advice=ROUNDS_RESUME,
        next_step=ROUNDS_AGAIN,
    )
    return {**metrics, "steps": trainer.state.global_step}


def read_round(output_dir: Path, n: int) -> dict | None:
    """round-n/round.json, verified, when the round is done (and its DPO run finished); else None."""
    folder = round_dir(output_dir, n)
    path = folder / "round.json"
    if not path.is_file():
        return None
    record = read_json_object(path, ROUND_SHAPE, f"delete {path} to finish round {n} again")
    if finished_run(folder) is None:
        raise UserError(f"{path} exists but {folder} holds no finished DPO run: delete {path} to run round {n} again")
    verify_finished_run(folder, "the rounds recipe")  # the next round samples from this adapter: the run's own bytes
    return record


def run_rounds(ctx, start: Handoff | None = None) -> list[dict]:
    """Every round up to ctx.args.rounds, the finished ones read back; the summary rewritten after each.
    `start`: the starting model when the caller has it loaded (round 1 samples with it instead of loading it
    again; freed once it has)."""
    records, handoff = [], start or Handoff()
    for n in range(1, ctx.args.rounds + 1):
        check_round_start(ctx, n)  # derived from a round run again since: moved aside and run again
        record = read_round(ctx.output_dir, n)
        if record is not None:
            log(f"round {n}: done earlier ({round_dir(ctx.output_dir, n) / 'round.json'})")
            handoff = Handoff()  # a later round samples from this round's adapter, loaded when needed
        else:
            record, policy = run_round(n, ctx, handoff)
            handoff = Handoff(policy)
            del policy
        records.append(record)
        with saving(f"the rounds summary in {ctx.output_dir}", "summary", n, advice=ROUNDS_AGAIN):
            write_summary(ctx.output_dir, ctx.summary_header, records)
    return records
