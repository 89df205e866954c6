"""The reward-KL frontier of the controlled-sentiment task: the DPO paper's Figure 2 in miniature.

    python benchmarks/frontier_sentiment.py                              # ~10 min on 2 CPU cores
    python benchmarks/frontier_sentiment.py --betas 0.1 1 --loss_types sigmoid ipo --out /tmp/frontier
    python benchmarks/frontier_sentiment.py --num_train_epochs 2         # any recipe setting passes through
    python benchmarks/frontier_sentiment.py --from_csv benchmarks/results/frontier.csv   # redraw only
    python benchmarks/frontier_sentiment.py --reference_cache false      # reference forwards inline, every step

One pi_ref (phase 1 of recipes/dpo_sentiment_tiny.py) and one set of preference pairs (phase 2)
serve every run. Each (loss type, beta) is then a DPO run with the recipe's settings
(recipes/dpo_sentiment_tiny.yaml; 4-bit base + LoRA); every `--eval_every` steps the policy is
sampled on held-out prompts and scored: ground-truth reward, KL(pi_theta || pi_ref) (Monte Carlo),
well-formed share, length. Every scored point is a row of <out>/frontier.csv and a point of
<out>/frontier.png (the paper's two axes); <out>/frontier.md tabulates where each run ended.
"""

from __future__ import annotations

import argparse
import csv
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from dpo.errors import exit_on_user_error
from dpo.files import replace_atomically, save_figure, write_text_atomic
from dpo.log import log
from dpo.offline.sentiment import SentimentTask, pair_sets, train_reference
from dpo.offline.sentiment_eval import evaluate_alignment
from dpo.train.config import load_recipe_args
from dpo.train.model_checks import load_tokenizer
from dpo.train.trainer import build_dpo_trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from frontier_record import write_record  # noqa: E402

RECIPE = ROOT / "recipes" / "dpo_sentiment_tiny.py"
# 2.5x the demo's 2 epochs (the recipe's other settings unchanged): long enough for a run to pass
# the peak of the reward-KL path wherever its loss and beta let it.
DEFAULT_RECIPE_OVERRIDES = ["--num_train_epochs", "5"]
# Every run of the sweep shares pi_ref and the pairs, so the reference log-probs are computed by the
# first run and read by the others (dpo/train/speed/refcache.py); `--reference_cache false` recomputes them inline.
CACHE_OVERRIDES = ["--reference_cache", "true"]
EVAL_PROMPTS = 256  # held-out prompts scored at each point (recipes/dpo_rounds_sentiment.yaml scores as many)
FIELDS = [
    "loss_type",
    "beta",
    "step",
    "policy_reward",
    "kl",
    "kl_stderr",
    "policy_well_formed",
    "policy_length",
    "heldout_reward_accuracy",
]


class Trajectory(TrainerCallback):
    """Score the policy every `every` optimizer steps (and at step 0 and the last step)."""

    def __init__(self, tokenizer, prompts, max_new_tokens, seed, every):
        self.tokenizer, self.prompts, self.max_new_tokens, self.seed, self.every = (
            tokenizer,
            prompts,
            max_new_tokens,
            seed,
            every,
        )
        self.points = []

    def score(self, model, step):
        m = evaluate_alignment(model, self.tokenizer, self.prompts, self.max_new_tokens, self.seed, reference=False)[
            "metrics"
        ]
        self.points.append({"step": step, **m})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.score(model, state.global_step)


def plot_frontier(rows: list[dict], reference_reward: float, path: Path) -> None:
    """Left: reward vs KL (the paper's axes). Right: well-formed share vs KL. One faint line per
    run through its scored points; its last point marked by beta's shape in its loss's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    losses = list(dict.fromkeys(r["loss_type"] for r in rows))
    betas = sorted({r["beta"] for r in rows})
    shapes = dict(zip(betas, "ovs^Dp*"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in (
        (axes[0], "policy_reward", "mean ground-truth reward"),
        (axes[1], "policy_well_formed", "well-formed completions"),
    ):
        for i, loss in enumerate(losses):
            for beta in betas:
                run = [r for r in rows if r["loss_type"] == loss and r["beta"] == beta]
                if not run:
                    continue
                xs, ys = [max(r["kl"], 0.0) for r in run], [r[key] for r in run]
                ax.plot(xs, ys, color=f"C{i}", alpha=0.3, linewidth=1, marker=".", markersize=3)
                ax.scatter(
                    xs[-1:],
                    ys[-1:],
                    color=f"C{i}",
                    marker=shapes[beta],
                    s=55,
                    edgecolors="black",
                    linewidths=0.6,
                    zorder=3,
                )
        if key == "policy_reward":
            ax.axhline(reference_reward, color="gray", linestyle="--", linewidth=1)
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
            ax.text(0.0, reference_reward, " pi_ref", va="bottom", fontsize=8, color="gray")
            ax.text(0.0, 0.5, " best well-formed review", va="bottom", fontsize=8, color="gray")
        if key == "policy_well_formed":
            ax.set_ylim(0, 1.02)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)
        ax.set_xlabel("KL(pi_theta || pi_ref), nats per completion (Monte Carlo)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="-", label=loss) for i, loss in enumerate(losses)]
    handles += [
        Line2D(
            [], [], color="black", marker=shapes[b], linestyle="", markerfacecolor="white", label=f"beta {b:g} (end)"
        )
        for b in betas
    ]
    axes[1].legend(handles=handles, fontsize=8, loc="lower left")
    steps = sorted({r["step"] for r in rows})
    fig.suptitle(
        f"Controlled sentiment: DPO loss types x beta, scored every {steps[1]} steps (lines) to the end (markers)"
    )
    fig.tight_layout()
    save_figure(fig, path)  # whole or not at all
    plt.close(fig)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--loss_types", nargs="+", default=["sigmoid", "ipo", "hinge", "robust"])
    parser.add_argument("--robust_label_smoothing", type=float, default=0.1, help="robust DPO needs > 0")
    parser.add_argument("--eval_every", type=int, default=9, help="optimizer steps between scored points")
    parser.add_argument("--eval_prompts", type=int, default=EVAL_PROMPTS, help="held-out prompts per scored point")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workdir", default="outputs/frontier_sentiment")
    parser.add_argument("--from_csv", help="only redraw frontier.png and frontier.md from this frontier.csv")
    args, recipe_argv = parser.parse_known_args()  # the rest: recipe settings, e.g. --num_train_epochs 2
    if args.from_csv:
        return write_outputs(read_csv(Path(args.from_csv)), Path(args.out), csv_path=Path(args.from_csv))
    cache_dir = ["--reference_cache_dir", str(Path(args.workdir) / "reference-logps")]
    recipe_argv = [*DEFAULT_RECIPE_OVERRIDES, *CACHE_OVERRIDES, *cache_dir, *recipe_argv]
    start = time.time()
    script_arguments = runpy.run_path(str(RECIPE))["ScriptArguments"]  # the recipe's settings, without running it
    workdir = Path(args.workdir)

    def recipe_args(*overrides):
        # the recipe's own args phase: its YAML < these flags; refuses hub_token (use HF_TOKEN)
        return load_recipe_args(script_arguments, RECIPE, ["--output_dir", str(workdir), *recipe_argv, *overrides])

    # ── one pi_ref and one pair set for the whole sweep (recipe phases 1 and 2) ─────────────────
    script_args, training_args, _ = recipe_args()
    torch.set_num_threads(script_args.torch_threads)
    seed = training_args.seed
    task = SentimentTask(seed=script_args.task_seed, heldout_topics=script_args.heldout_topics)
    sft_dir, _ = train_reference(task, workdir / "sft_reference", script_args, training_args)
    tokenizer = load_tokenizer(str(sft_dir))
    sft_model = AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True)
    pairs = pair_sets(
        sft_model,
        tokenizer,
        task,
        script_args.pair_prompts,
        script_args.heldout_pair_prompts,
        script_args.max_new_tokens,
        seed,
    )
    pair_data = [Dataset.from_list(pairs[split]) for split in ("train", "heldout")]  # every run trains these
    prompts = task.prompts("heldout", args.eval_prompts, seed + 2)
    del sft_model
    log(
        f"pi_ref in {sft_dir}; {len(pairs['train'])} training pairs, {len(pairs['heldout'])} held out ({time.time() - start:.0f}s)"
    )

    # ── one DPO run per (loss type, beta), scored along the way ───────────────────────────────
    rows = []
    for loss_type in args.loss_types:
        for beta in args.betas:
            extra = ["--label_smoothing", str(args.robust_label_smoothing)] if loss_type == "robust" else []
            _, training_args, model_args = recipe_args(
                "--model_name_or_path",
                str(sft_dir),
                "--loss_type",
                loss_type,
                "--beta",
                str(beta),
                "--output_dir",
                str(workdir / f"{loss_type}_beta{beta}"),
                "--logging_steps",
                "1000",
                *extra,
            )
            trajectory = Trajectory(tokenizer, prompts, script_args.max_new_tokens, seed + 3, args.eval_every)
            trainer = build_dpo_trainer(model_args, training_args, *pair_data, tokenizer, [trajectory])
            trainer.train()
            accuracy = trainer.evaluate()["eval_rewards/accuracies"]
            for i, point in enumerate(trajectory.points):
                last = i == len(trajectory.points) - 1
                rows.append(
                    {
                        "loss_type": loss_type,
                        "beta": beta,
                        **{k: point[k] for k in FIELDS if k in point},
                        "heldout_reward_accuracy": accuracy if last else "",
                    }
                )
            end = trajectory.points[-1]
            log(
                f"{loss_type} beta={beta}: reward {end['policy_reward']:+.3f}, KL {end['kl']:.2f}, "
                f"well-formed {end['policy_well_formed']:.0%}, accuracy {accuracy:.0%} ({time.time() - start:.0f}s)"
            )

    # ── write the CSV, the plot and the summary ─────────────────────────────────────────────────
    write_csv(rows, Path(args.out) / "frontier.csv")
    # what the CSV was measured from, for the benchmarks that place rounds on it (frontier_record.py)
    write_record(Path(args.out) / "frontier.csv", sft_dir, args.eval_prompts, script_args.max_new_tokens)
    write_outputs(rows, Path(args.out), seconds=time.time() - start)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:  # whole or not at all: rounds_sentiment.py and rounds_sweep.py read it back
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: f"{v:.4f}" if isinstance(v, float) and k != "beta" else v for k, v in row.items()})

    replace_atomically(path, write)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [
            {k: v if k == "loss_type" else int(v) if k == "step" else float(v) if v else None for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def write_outputs(rows: list[dict], out: Path, seconds: float | None = None, csv_path: Path | None = None) -> None:
    """frontier.png and frontier.md (one line per run: where it ended, and its best point)."""
    out.mkdir(parents=True, exist_ok=True)  # --from_csv may name a new folder
    reference_reward = next(r["policy_reward"] for r in rows if r["step"] == 0)  # LoRA B = 0: exactly pi_ref
    plot_frontier(rows, reference_reward, out / "frontier.png")
    runs = list(dict.fromkeys((r["loss_type"], r["beta"]) for r in rows))
    lines = [
        "# Reward-KL frontier, controlled sentiment (made by benchmarks/frontier_sentiment.py)",
        "",
        f"pi_ref (4-bit SFT model, adapters off): mean reward {reference_reward:+.3f} on the held-out prompts.",
        *([f"Wall time of the sweep: {seconds:.0f} s on {os.cpu_count()} CPU cores."] if seconds else []),
        "",
        "| loss | beta | steps | reward at end | KL at end (nats) | well-formed at end | held-out pair accuracy | best reward on the way (at KL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss, beta in runs:
        run = [r for r in rows if r["loss_type"] == loss and r["beta"] == beta]
        end, best = run[-1], max(run, key=lambda r: r["policy_reward"])
        lines.append(
            f"| {loss} | {beta:g} | {end['step']} | {end['policy_reward']:+.3f} | {end['kl']:.2f} | "
            f"{end['policy_well_formed']:.0%} | {end['heldout_reward_accuracy']:.1%} | "
            f"{best['policy_reward']:+.3f} ({best['kl']:.2f}) |"
        )
    write_text_atomic(out / "frontier.md", "\n".join(lines) + "\n")
    log(
        f"{len(rows)} points: {csv_path or out / 'frontier.csv'}, {out / 'frontier.png'}, {out / 'frontier.md'}"
        + (f" ({seconds:.0f}s)" if seconds else "")
    )


if __name__ == "__main__":
    main()
