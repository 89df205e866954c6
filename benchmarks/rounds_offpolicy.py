"""On-policy DPO in rounds against offline DPO on pairs from *another* policy, at matched KL to pi_ref.

    python benchmarks/rounds_offpolicy.py          # 6 rounds runs + 24 offline runs; writes its section of BENCHMARKS.md
    python benchmarks/rounds_offpolicy.py --seeds 43 --rewards "rare praise" --models_from W \
        --out D --benchmarks_md D/BENCHMARKS.md                                      # one part of it, kept apart
    python benchmarks/rounds_offpolicy.py --from_json D1/rounds_offpolicy.json D2/rounds_offpolicy.json  # parts merged
    python benchmarks/rounds_offpolicy.py --seeds 42 --rounds 1 --prompts_per_round 32 --sft_steps 20 \
        --out /tmp/look --benchmarks_md /tmp/look/BENCHMARKS.md                      # a quick look, kept apart

A run writes its results (--out, default benchmarks/results/) and its BENCHMARKS.md section only once every seed
finished; meanwhile each finished seed is in <workdir>/rounds_offpolicy.json (a --from_json input).

benchmarks/rounds_sentiment.py found the rounds on the offline frontier: its offline pairs are pi_ref's own
samples, so offline DPO is on-policy at round 1. Real offline datasets are written by other models and people.
Here the offline pairs come from where such datasets come from (KINDS): pi_ref's own samples (the committed
baseline, as a control), pi_ref at a much higher temperature, a policy trained towards the opposite sentiment,
and reviews written by the task's generator, sampled from no policy. Each pair set is labelled by the same
ground-truth reward and has exactly as many pairs as the rounds kept, for the same seed. Two rewards (REWARDS):
the task's ground truth, and `rare_praise` (dpo/rounds/sentiment.py), whose best answers are rare under pi_ref
(the share is measured and reported).

Per seed and reward: the rounds recipe (recipes/dpo_rounds_sentiment.yaml, reference initial, started from the
same pi_ref), then one offline DPO run per kind with the same DPO settings (beta, learning rate, LoRA, batch)
scored every `--eval_every` steps on the rounds' held-out prompts with the rounds' evaluation seed: its path in
(KL to pi_ref, held-out reward) is the offline frontier of that kind, its upper envelope read at the rounds' KL
(linear between points; past its last point its best reward: that favours offline DPO). The gap, rounds minus
offline at the rounds' KL, is averaged over seeds with a 95% t interval. Writes
benchmarks/results/rounds_offpolicy.{json,md,png} and the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from offpolicy_report import READING, merged, plot, section, summarise  # noqa: E402
from rounds_sentiment import frontier_at  # noqa: E402
from sections import write_section  # noqa: E402

from dpo.errors import UserError, exit_on_user_error  # noqa: E402
from dpo.log import log  # noqa: E402

HEADING = "## On-policy rounds against off-policy offline data (`benchmarks/rounds_offpolicy.py`)"
CONFIG = ROOT / "recipes" / "dpo_rounds_sentiment.yaml"
REWARDS = {"ground truth": "dpo.rounds.sentiment:ground_truth", "rare praise": "dpo.rounds.sentiment:rare_praise"}
# (name, what it is): the offline pair sets, each labelled by the reward under test
KINDS = {
    "pi_ref T=1": "pi_ref's own samples at temperature 1 (the committed offline baseline: on-policy data)",
    "pi_ref T=hot": "pi_ref sampled at a much higher temperature (--hot_temperature)",
    "opposite policy": "a model trained as pi_ref is, on reviews of the opposite tone (each topic's positivity p -> 1 - p)",
    "written reviews": "reviews written by the task's generator (the SFT corpus's source), sampled from no policy",
}


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope of (KL, reward) points: each point whose reward beats every point of no more KL."""
    front, best = [], -math.inf
    for kl, reward in sorted((max(k, 0.0), r) for k, r in points):
        if reward > best:
            front.append((kl, reward))
            best = reward
    return front


def topic_of(prompt: str) -> str:
    return prompt.removeprefix("review of ").removesuffix(":")


def label_pairs(prompts: list[str], answers: list[tuple[str, str]], reward, n: int) -> list[dict]:
    """The first `n` untied pairs: the answer the reward scores higher is chosen (ties carry no preference)."""
    flat = [a for pair in answers for a in pair]
    scores = reward([p for p in prompts for _ in range(2)], flat)
    rows = []
    for i, prompt in enumerate(prompts):
        (a, b), (ra, rb) = answers[i], scores[2 * i : 2 * i + 2]
        if ra != rb and len(rows) < n:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


class Job:
    """One benchmark: the recipe's settings, the shared models and the seeds' runs."""

    def __init__(self, args, recipe_argv: list[str]):
        from dpo.rounds.settings import RoundsArguments
        from dpo.train.config import load_recipe_args

        self.args, self.workdir = args, Path(args.workdir)
        self.recipe_argv = [
            "--rounds",
            str(args.rounds),
            "--prompts_per_round",
            str(args.prompts_per_round),
            "--task_prompts",
            str(args.rounds * args.prompts_per_round),
            "--eval_prompts",
            str(args.eval_prompts),
            *recipe_argv,
        ]
        recipe = ROOT / "recipes" / "dpo_rounds.py"
        argv = ["--config", str(CONFIG), "--output_dir", str(self.workdir / "settings"), *self.recipe_argv]
        self.settings, self.training_args, self.model_args = load_recipe_args(
            RoundsArguments, recipe, argv, output_kind="rounds"
        )
        import torch

        torch.set_num_threads(self.settings.torch_threads)  # as the recipe: a 0.1M-parameter model, one thread

    def train_models(self) -> None:
        """pi_ref (the demo's phase 1, as the rounds recipe trains it) and the opposite-tone policy."""
        from functools import cached_property

        from dpo.offline.sentiment import train_reference
        from dpo.rounds.sentiment import task_of

        task = task_of(self.settings)

        tone = task.positivity

        class OppositeTone(type(task)):
            @cached_property
            def positivity(self):
                return {t: round(1 - p, 3) for t, p in tone.items()}

        opposite = OppositeTone(seed=task.seed, heldout_topics=task.heldout_topics)
        self.task = task
        if self.args.models_from:  # another run's models, reused only when whole and trained with these settings
            from dpo.offline.sentiment import reference_problem

            self.pi_ref, self.opposite = (Path(self.args.models_from) / name for name in ("pi_ref", "opposite"))
            for folder, its_task in ((self.pi_ref, task), (self.opposite, opposite)):
                if problem := reference_problem(folder, its_task, self.settings, self.training_args):
                    raise UserError(
                        f"--models_from {self.args.models_from}: {folder} is not a model this benchmark trained with "
                        f"these settings ({problem}); run without --models_from to train them, or name a run of these"
                    )
            return
        self.pi_ref, _ = train_reference(task, self.workdir / "pi_ref", self.settings, self.training_args)
        self.opposite, _ = train_reference(opposite, self.workdir / "opposite", self.settings, self.training_args)

    def model_args_for(self, folder):
        model_args = copy.copy(self.model_args)
        model_args.model_name_or_path = str(folder)
        return model_args

    def tokenizer(self):
        from dpo.train.model_checks import load_tokenizer

        return load_tokenizer(str(self.pi_ref))

    def prompts(self, seed: int, n: int) -> tuple[list[str], list[str]]:
        from dpo.rounds.sentiment import sentiment_prompts

        return sentiment_prompts(self.settings, n, seed)

    def sampled(self, folder, prompts: list[str], temperature: float, seed: int) -> list[tuple[str, str]]:
        """Two answers per prompt from the model in `folder` (4-bit, as the rounds sample pi_ref)."""
        from dpo.evaluation.sampling import Sampling, sample_answers
        from dpo.rounds.models import load_policy

        model = load_policy(self.model_args_for(folder), self.training_args, None)
        settings = Sampling(temperature, 1.0, self.settings.max_new_tokens, 1024)
        drawn = sample_answers(model, self.tokenizer(), prompts, 2, settings, seed)
        return [(row[0]["text"], row[1]["text"]) for row in drawn["answers"]]

    def answers(self, kind: str, prompts: list[str], seed: int) -> list[tuple[str, str]]:
        import random

        if kind == "pi_ref T=1":
            return self.sampled(self.pi_ref, prompts, 1.0, seed)
        if kind == "pi_ref T=hot":
            return self.sampled(self.pi_ref, prompts, self.args.hot_temperature, seed)
        if kind == "opposite policy":
            return self.sampled(self.opposite, prompts, 1.0, seed)
        rng = random.Random(f"written-{seed}")
        return [tuple(self.task.review(topic_of(p), rng) for _ in range(2)) for p in prompts]

    def rarity(self, reward) -> dict:
        """How often pi_ref writes an all-praise review: 8 samples per held-out prompt of the first seed."""
        from dpo.evaluation.judge import mean_interval
        from dpo.rounds.sentiment import all_praise

        _, heldout = self.prompts(self.args.seeds[0], 1)
        answers = [a for i in range(4) for pair in self.sampled(self.pi_ref, heldout, 1.0, 7 + i) for a in pair]
        share, low, high = mean_interval([float(all_praise(a)) for a in answers])
        return {"share": share, "low": low, "high": high, "samples": len(answers)}

    def run_rounds(self, recipe, reward_name: str, seed: int) -> dict:
        out = self.workdir / f"rounds-{reward_name.replace(' ', '_')}-{seed}"
        argv = ["--config", str(CONFIG), "--output_dir", str(out), "--model_name_or_path", str(self.pi_ref)]
        return recipe.main([*argv, "--seed", str(seed), "--reward", REWARDS[reward_name], *self.recipe_argv])

    def run_offline(self, kind: str, reward_name: str, seed: int, n_pairs: int, heldout: list[str]) -> dict:
        """Offline DPO on `n_pairs` pairs of `kind`; its path of (KL, held-out reward) points."""
        from datasets import Dataset
        from transformers import TrainerCallback

        from dpo.data.doctor import check_data
        from dpo.data.loading import split_heldout
        from dpo.rounds.heldout import heldout_metrics
        from dpo.rounds.reward import make_reward
        from dpo.train.trainer import build_dpo_trainer

        folder = self.workdir / f"offline-{kind.replace(' ', '_')}-{reward_name.replace(' ', '_')}-{seed}"
        reward = make_reward(REWARDS[reward_name], folder)
        # twice the rounds' training prompts: enough untied pairs even where most of pi_ref's pairs tie
        train_prompts, _ = self.prompts(seed, 2 * self.args.rounds * self.args.prompts_per_round)
        rows = label_pairs(train_prompts, self.answers(kind, train_prompts, seed + 17), reward, n_pairs)
        # the data doctor's checks, as each round runs them (an empty answer, answers identical once cut)
        report = check_data(
            Dataset.from_list(rows),
            f"{kind} pairs",
            self.tokenizer(),
            prompt_format="text",
            max_length=self.training_args.max_length,
            truncation_mode=self.training_args.truncation_mode,
        )
        train, held = split_heldout(report.kept, self.settings.test_size, seed)
        tokenizer, points, every, eval_seed = self.tokenizer(), [], self.args.eval_every, seed + 3
        max_new_tokens = self.settings.max_new_tokens

        class Path_(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    m = heldout_metrics(model, tokenizer, heldout, reward, max_new_tokens, eval_seed)
                    points.append({"step": state.global_step, **m})

        training_args = copy.copy(self.training_args)
        training_args.output_dir, training_args.seed = str(folder), seed
        training_args.num_train_epochs = self.args.offline_epochs
        trainer = build_dpo_trainer(self.model_args_for(self.pi_ref), training_args, train, held, tokenizer, [Path_()])
        trainer.train()
        del trainer
        return {"kind": kind, "pairs": len(rows), "kept": len(report.kept), "path": points}


def compare(rounds: dict, offline: dict) -> list[dict]:
    """Each round against the offline path's envelope at the round's KL (the start point: pi_ref itself)."""
    initial = rounds["initial"]
    front = envelope([(0.0, initial["reward"]), *[(p["kl"], p["reward"]) for p in offline["path"]]])
    furthest = max(p["kl"] for p in offline["path"])
    rows = []
    for r in rounds["rounds"]:
        h = r["heldout"]
        at = frontier_at(front, h["kl"])
        rows.append(
            {"round": r["round"], "kl": h["kl"], "reward": h["reward"], "offline": at, "gap": h["reward"] - at}
        )
        rows[-1]["beyond_offline_kl"] = h["kl"] > furthest
    return rows


def write_json(data: dict, path: Path) -> dict:
    """`data` (the runs so far) with its summary, written whole to `path` (a --from_json input); returns it."""
    from dpo.files import json_text, write_text_atomic

    data = {**data, "summary": summarise(data["runs"], list(data["kinds"])), "reading": READING}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json_text(data, path, observations=True, indent=2) + "\n")
    return data


def write_outputs(data: dict, out: Path, benchmarks_md: Path) -> None:
    """rounds_offpolicy.{json,md,png} in `out` and the section of `benchmarks_md`, from `data` (every run)."""
    from dpo.files import write_text_atomic

    data = write_json(data, out / "rounds_offpolicy.json")
    plot(data, out / "rounds_offpolicy.png")
    text = section(data, HEADING)
    write_text_atomic(out / "rounds_offpolicy.md", text)
    write_section(benchmarks_md, text, HEADING)
    print(text)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts_per_round", type=int, default=256)
    parser.add_argument("--eval_prompts", type=int, default=256, help="held-out prompts per scored point")
    parser.add_argument("--offline_epochs", type=int, default=6, help="offline epochs: 2x the rounds' optimizer steps")
    parser.add_argument("--eval_every", type=int, default=10, help="offline optimizer steps between scored points")
    parser.add_argument("--hot_temperature", type=float, default=2.0)
    parser.add_argument("--workdir", default="outputs/rounds_offpolicy_bench")
    parser.add_argument(
        "--models_from", help="the workdir of an earlier run of these settings: its pi_ref and opposite"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--benchmarks_md", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--from_json",
        nargs="+",
        help="only rewrite the table, plot and section from these rounds_offpolicy.json files (seeds run in separate "
        "processes with the same settings: their runs together; the first file's pi_ref rarity)",
    )
    args, recipe_argv = parser.parse_known_args()  # the rest: recipe settings for both sides, e.g. --sft_steps 20
    out, benchmarks_md = Path(args.out), Path(args.benchmarks_md)
    keys = "seeds rewards kinds rounds prompts_per_round eval_prompts offline_epochs eval_every hot_temperature"
    changed = [f"--{k} {getattr(args, k)}" for k in keys.split() if getattr(args, k) != parser.get_default(k)]
    changed += [" ".join(recipe_argv)] if recipe_argv else []
    committed = out == Path(parser.get_default("out")) or benchmarks_md == Path(parser.get_default("benchmarks_md"))
    if changed and committed and not args.from_json:
        raise UserError(
            f"{', '.join(changed)}: not the committed benchmark's settings, so its results would replace the "
            "committed ones; pass --out and --benchmarks_md for a run kept apart (merge parts with --from_json)"
        )
    if args.from_json:
        return write_outputs(merged([json.loads(Path(f).read_text()) for f in args.from_json]), out, benchmarks_md)
    workdir = Path(args.workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise UserError(f"{workdir} is not empty: the benchmark runs everything from scratch; pick another --workdir")
    start = time.time()
    job = Job(args, recipe_argv)
    job.train_models()
    from dpo.rounds.reward import make_reward

    data = {
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("workdir", "out", "benchmarks_md", "from_json", "models_from")
        },
        "recipe_overrides": recipe_argv,
        "kinds": {k: v for k, v in KINDS.items() if k in args.kinds},
        "rarity": job.rarity(make_reward(REWARDS["rare praise"], workdir)),
        "runs": [],
        "cpus": os.cpu_count(),
    }
    recipe = load_recipe()
    for seed in args.seeds:
        for reward_name in args.rewards:
            rounds = job.run_rounds(recipe, reward_name, seed)
            n_pairs = sum(r["pairs"]["kept"] for r in rounds["rounds"])
            _, heldout = job.prompts(seed, 1)
            for kind in args.kinds:
                offline = job.run_offline(kind, reward_name, seed, n_pairs, heldout)
                data["runs"].append(
                    {
                        "seed": seed,
                        "reward": reward_name,
                        "kind": kind,
                        "pairs": offline["pairs"],
                        "rounds_pairs": n_pairs,
                        "initial": rounds["initial"],
                        "rounds": [
                            {"round": r["round"], "pairs": r["pairs"]["kept"], **r["heldout"]}
                            for r in rounds["rounds"]
                        ],
                        "offline_path": offline["path"],
                        "compare": compare(rounds, offline),
                    }
                )
                last = data["runs"][-1]["compare"][-1]
                log(
                    f"[{time.time() - start:.0f}s] seed {seed}, {reward_name}, {kind}: rounds {last['reward']:+.3f} "
                    f"at {last['kl']:.2f} nats, offline {last['offline']:+.3f}"
                )
        # after every seed, into the workdir: a stopped run leaves the seeds it finished (--from_json takes it), and
        # the committed results and the BENCHMARKS.md section are rewritten only by a run that finished
        write_json(data, workdir / "rounds_offpolicy.json")
    write_outputs(data, out, benchmarks_md)


def load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rounds_recipe", ROOT / "recipes" / "dpo_rounds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.disable_progress_bar()
    main()
