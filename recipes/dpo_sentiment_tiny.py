"""The DPO paper's controlled-sentiment experiment in miniature: offline, CPU, well under 2 minutes.

    python recipes/dpo_sentiment_tiny.py                  # `make demo`; settings: recipes/dpo_sentiment_tiny.yaml
    python recipes/dpo_sentiment_tiny.py --beta 0.5 --output_dir outputs/sentiment_beta0.5
    python recipes/dpo_sentiment_tiny.py --loss_type ipo --beta 0.5
    python recipes/dpo_sentiment_tiny.py --model_name_or_path outputs/sentiment_tiny/sft_reference \\
        --output_dir outputs/sentiment_again                  # reuse a pi_ref: skips phase 1
    python benchmarks/frontier_sentiment.py               # the reward-KL frontier over beta and losses

Phases (Rafailov et al. 2023, section 6.1, IMDb; the task itself is in dpo/offline/sentiment.py):
  1. SFT a tiny Phi model from scratch on unlabeled reviews (TRL SFTTrainer) -> pi_ref
  2. sample two reviews per prompt from pi_ref; the ground-truth reward picks the chosen one
  3. DPO through the phi-2 recipe's code path: 4-bit NF4 base + LoRA, reference = adapters off
  4. on held-out prompts: reward of pi_ref vs pi_theta, KL(pi_theta || pi_ref), implicit-reward
     accuracy on held-out pairs, lengths -> output_dir/{metrics.json, report.md, training_curves.png}
     (dpo/offline/sentiment_eval.py)
Run as a script, it ends with the before/after summary that `make demo` shows.
"""

import os

# Everything is built locally: never reach for the Hub (set before transformers reads them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from dpo.data.tools import template_for_rows
from dpo.errors import UserError, exit_on_user_error
from dpo.log import log
from dpo.offline.sentiment import SentimentTask, pair_sets, reused_or_trained_reference
from dpo.offline.sentiment_eval import (
    PhaseClock,
    drop_report,
    evaluate_alignment,
    sample_and_score,
    summary,
    write_report,
)
from dpo.train.adapters import put_adapter, start_point
from dpo.train.config import load_recipe_args
from dpo.train.model_checks import load_tokenizer
from dpo.train.trainer import build_dpo_trainer, train_and_save


@dataclass
class ScriptArguments:
    task_seed: int = field(
        default=0, metadata={"help": "Seeds the task: each topic's tone and which topics are held out."}
    )
    heldout_topics: int = field(
        default=6, metadata={"help": "Topics (of 24) kept out of every preference pair, for evaluation."}
    )
    sft_examples: int = field(default=4096, metadata={"help": "Unlabeled reviews pi_ref is trained on."})
    sft_steps: int = field(default=300, metadata={"help": "SFT optimizer steps (phase 1)."})
    sft_batch_size: int = field(default=64, metadata={"help": "SFT batch size."})
    sft_learning_rate: float = field(default=5e-3, metadata={"help": "SFT peak learning rate (cosine decay)."})
    pair_prompts: int = field(
        default=1024, metadata={"help": "Training prompts, two pi_ref samples each; ties are dropped."}
    )
    heldout_pair_prompts: int = field(
        default=256, metadata={"help": "Held-out prompts for the implicit-reward accuracy."}
    )
    eval_prompts: int = field(default=512, metadata={"help": "Held-out prompts sampled from pi_ref and pi_theta."})
    max_new_tokens: int = field(
        default=16, metadata={"help": "Sampling cut-off; the longest review is 12 tokens + EOS."}
    )
    sft_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "An SFT adapter on model_name_or_path as pi_ref (base + it, frozen); the policy starts as it."
        },
    )
    torch_threads: int = field(
        default=1, metadata={"help": "CPU threads; a 0.1M-parameter model runs fastest on one."}
    )


# phase 1's pi_ref in --output_dir was trained with other settings: the run there was trained on it, so it stays
OTHER_REFERENCE = (
    "the run in {out} was trained on it; pick another --output_dir, or start over with --overwrite_output_dir true "
    "(pi_ref is trained again)"
)


@exit_on_user_error
def main(argv: list[str] | None = None, callbacks=None) -> dict:
    # ── args: YAML beside this file < --config other.yaml < CLI flags; no hub_token (HF_TOKEN) ──
    args, training_args, model_args = load_recipe_args(ScriptArguments, __file__, argv)
    template_for_rows(training_args.chat_template_path, False, "the sentiment task's reviews")  # refused: text only
    torch.set_num_threads(args.torch_threads)
    clock = PhaseClock()  # wall time per phase, into metrics.json (benchmarks/bench_demo.py reads it)
    out, seed = Path(training_args.output_dir), training_args.seed
    task = SentimentTask(seed=args.task_seed, heldout_topics=args.heldout_topics)
    log(f"task: 24 topics, held out for evaluation: {', '.join(task.splits['heldout'])}")

    # ── 1. SFT from scratch on unlabeled reviews: pi_ref ───────────────────────────────────────
    if model_args.model_name_or_path is None:  # reused when this folder's pi_ref has these settings
        sft_dir, losses = reused_or_trained_reference(
            task, out / "sft_reference", args, training_args, OTHER_REFERENCE.format(out=out),
            replace=training_args.overwrite_output_dir,
        )  # fmt: skip
        model_args.model_name_or_path = str(sft_dir)
        log(
            f"phase 1: SFT loss {losses[0]:.2f} -> {losses[-1]:.2f} nats/token in {args.sft_steps} steps; pi_ref in {sft_dir}"
            if losses is not None
            else f"phase 1: pi_ref reused from {sft_dir} (trained by an earlier run with these settings; files checked)"
        )
    else:  # an SFT adapter, given as --sft_adapter_path or as the model: checked against the base
        model_args.model_name_or_path, args.sft_adapter_path = start_point(
            model_args, training_args, args.sft_adapter_path
        )
    if not (
        Path(model_args.model_name_or_path, "config.json").is_file()
        and any(Path(model_args.model_name_or_path).glob("*.safetensors"))
    ):
        raise UserError(
            f"--model_name_or_path must be a pi_ref folder written by phase 1 (config.json and "
            f"model.safetensors; weights load from safetensors only): {model_args.model_name_or_path}"
        )
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    clock.lap("sft")

    # ── 2. preference pairs: two samples per prompt from pi_ref, ranked by the true reward ──────
    sft_model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, use_safetensors=True
    )  # full precision, as in the paper
    if args.sft_adapter_path:  # pi_ref = base + SFT adapter
        sft_model = put_adapter(sft_model, args.sft_adapter_path).merge_and_unload()
    pairs = pair_sets(
        sft_model, tokenizer, task, args.pair_prompts, args.heldout_pair_prompts, args.max_new_tokens, seed
    )
    eval_prompts = task.prompts("heldout", args.eval_prompts, seed + 2)
    sft = sample_and_score(sft_model, tokenizer, eval_prompts, args.max_new_tokens, seed + 3)
    del sft_model
    example = pairs["train"][0]
    log(
        f"phase 2: {len(pairs['train'])} training pairs ({pairs['ties']} ties dropped), {len(pairs['heldout'])} held out; "
        f"e.g. {example['prompt']} chosen:{example['chosen']}  rejected:{example['rejected']}"
    )
    clock.lap("pairs")

    # ── 3. DPO: the phi-2 recipe's path, 4-bit base + LoRA, reference = base with adapters off ──
    trainer = build_dpo_trainer(
        model_args,
        training_args,
        Dataset.from_list(pairs["train"]),
        Dataset.from_list(pairs["heldout"]),
        tokenizer,
        callbacks,
        args.sft_adapter_path,
    )
    dpo_metrics = train_and_save(
        trainer,
        (args, training_args, model_args),
        training_args.resume_from_checkpoint,
        Dataset.from_list(pairs["heldout"]),
    )
    drop_report(out)  # the replaced run's report: none rather than its numbers beside this adapter on a failure
    clock.lap("dpo")

    # ── 4. evaluate on held-out prompts, write the report ──────────────────────────────────────
    result = evaluate_alignment(trainer.model, tokenizer, eval_prompts, args.max_new_tokens, seed + 3)
    clock.lap("evaluate")
    metrics = {
        **result["metrics"],
        "heldout_reward_accuracy": dpo_metrics["eval_rewards/accuracies"],
        "sft_fp32_reward": sft["reward"],
        "sft_fp32_well_formed": sft["well_formed"],
        "train_pairs": len(pairs["train"]),
        "heldout_pairs": len(pairs["heldout"]),
        "train_ties": pairs["ties"],
        "dpo_steps": trainer.state.global_step,
        "beta": training_args.beta,
        "loss_type": list(training_args.loss_type),
        "seconds": clock.seconds,
    }
    settings = {
        "loss_type": "+".join(training_args.loss_type),
        "beta": training_args.beta,
        "learning_rate": training_args.learning_rate,
        "DPO steps": trainer.state.global_step,
        "seed": seed,
        "task_seed": args.task_seed,
    }
    report = write_report(out, metrics, result["samples"], settings)
    m = metrics
    log(
        f"reward {m['reference_reward']:+.3f} (pi_ref) -> {m['policy_reward']:+.3f} (pi_theta), KL {m['kl']:.2f} nats, "
        f"held-out pair accuracy {m['heldout_reward_accuracy']:.1%}, well-formed {m['reference_well_formed']:.0%} -> "
        f"{m['policy_well_formed']:.0%}, length {m['reference_length']:.1f} -> {m['policy_length']:.1f} words"
    )
    log(f"report: {report} (+ metrics.json, training_curves.png)")
    return {**metrics, "report": str(report)}


if __name__ == "__main__":
    # keep the output to what matters
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()  # dataset .map() bars: a few thousand rows, instant
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for this audience
    start = time.time()
    metrics = main()
    print(summary(metrics, time.time() - start), flush=True)
