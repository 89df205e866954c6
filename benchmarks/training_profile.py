"""`python benchmarks/bench_training.py --profile`: where a recipe step's time and memory go. The worker
(`profile_worker`, run as `training_profile.py profile`, a process of its own) trains a few steps of the recipe
under torch.profiler; the parent writes its BENCHMARKS.md section (`profile_markdown`). This file imports
training_workers.py, never the other way round."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from training_workers import RECIPE, ROOT, read_pairs, recipe_settings, tokenizer_for, worker_args

from benchmarks.sections import cpu_name, versions


def rss_mb() -> float:
    """Resident memory now (/proc/self/statm, pages)."""
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


PROFILE_YAML, PROFILE_BATCH = ROOT / "recipes" / "dpo_hh_rlhf.yaml", 4  # --profile's own settings


def profile_worker(args, steps: int = 4, profiled_step: int = 3) -> dict:
    """The recipe (recipes/dpo_hh_rlhf.yaml, no cache, random batches) for `steps` steps: resident memory after each, wall time of our own per-step
    code (collator, callbacks, logging), and torch.profiler's CPU time and memory tables of one step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from dpo.train.config import load_recipe_args
    from dpo.train.trainer import build_dpo_trainer

    work = Path(args.workdir)
    flags = ["--config", str(PROFILE_YAML), "--model_name_or_path", args.model, "--output_dir", str(work / "profile")]
    flags += [
        "--dataset_name",
        str(work / "pairs.jsonl"),
        "--reference_cache=false",
        "--train_sampling_strategy=random",
    ]
    flags += [f"--max_steps={steps}", f"--max_length={args.max_length}"]
    flags += [f"--per_device_train_batch_size={PROFILE_BATCH}", "--gradient_accumulation_steps=1", "--logging_steps=1"]
    _, training_args, model_args = load_recipe_args(recipe_settings(), RECIPE, flags)
    pairs = read_pairs(Path(args.workdir) / "pairs.jsonl")
    trainer = build_dpo_trainer(model_args, training_args, pairs, None, tokenizer_for(args.model))
    spent = {"collator": 0.0, "callbacks": 0.0, "log": 0.0}
    record = {"rss_after_load_mb": rss_mb(), "rss_after_step_mb": [], "step_s": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            began = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - began

        return wrapper

    trainer.data_collator = timed("collator", trainer.data_collator)
    trainer.log = timed("log", trainer.log)
    trainer.callback_handler.call_event = timed("callbacks", trainer.callback_handler.call_event)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    class Steps(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.began = time.perf_counter()
            if state.global_step + 1 == profiled_step:  # our code's share: the steps before the profiled one
                record["own_code_s"] = dict(spent)
                record["unprofiled_s"] = sum(record["step_s"])
                profiler.start()

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == profiled_step:
                profiler.stop()
            record["step_s"].append(time.perf_counter() - self.began)
            record["rss_after_step_mb"].append(rss_mb())

    trainer.add_callback(Steps())
    began = time.perf_counter()
    trainer.train()
    record["train_s"] = time.perf_counter() - began
    events = profiler.key_averages()
    record["top_time"] = events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)
    record["top_memory"] = events.table(sort_by="self_cpu_memory_usage", row_limit=15, max_name_column_width=60)
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


PROFILE_SECTION = "## Where a recipe step's time and memory go (`benchmarks/bench_training.py --profile`)"


def profile_markdown(record: dict, args) -> str:
    """The --profile section: step times, our own per-step code's share, resident memory, and
    torch.profiler's top operators by time and by memory for one step."""
    steps, own, unprofiled = record["step_s"], record["own_code_s"], record["unprofiled_s"]
    share = sum(own.values()) / unprofiled
    rows = [
        PROFILE_SECTION,
        "",
        "Made by `python benchmarks/bench_training.py --profile`; rewrite this section by running it again.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores ({args.threads} torch threads); {versions()}. "
        f"Load average (1 min) before / after: {record['load']}.",
        f"The recipe (recipes/dpo_any.py's trainer, recipes/dpo_hh_rlhf.yaml, no cache, random batches, fp32, 4-bit base, "
        f"LoRA, activation checkpointing) on the same HH-RLHF pairs, {len(steps)} steps of {PROFILE_BATCH} pairs, "
        f"max_length {args.max_length}; step {len(steps) - 1} runs under torch.profiler.",
        "",
        f"- step wall times: {', '.join(f'{x:.2f}' for x in steps)} s",
        f"- our own code per step (steps 1-{len(steps) - 2}, not profiled): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in own.items())
        + f" = **{100 * share:.2f}%** of {unprofiled:.1f} s (target: under 2%)",
        f"- resident memory: {record['rss_after_load_mb']:.0f} MB after loading; after each step "
        + ", ".join(f"{x:.0f}" for x in record["rss_after_step_mb"])
        + f" MB; peak {record['peak_rss_mb']:.0f} MB (the profiled step's figure includes torch.profiler's own records)",
        "",
        "What the largest consumers are, and what this repo does about each:",
        "- the LM head over the 49k-token vocabulary: TRL's fused head never builds full logits, and on CPU",
        "  `dpo.compat.lean_cpu_lm_head` scores completion positions only, in 4096-column tiles (TRL's CPU path",
        "  scores every position in 32768-column tiles: a 270 MB tile for 2k tokens);",
        "- activations: checkpointing (the recipe's `activation_checkpointing: true`) keeps one layer's at a time;",
        "- 4-bit dequantization (`bitsandbytes::dequantize_4bit`): each Linear4bit dequantizes its weight for",
        "  the matmul and frees it again, one layer's weight at a time: nothing accumulates;",
        "- the checkpoint file: transformers leaves the weights it does not convert (embedding, norms) as views",
        "  into the memory-mapped .safetensors file, which keeps every page loading read resident;",
        "  `dpo/train/speed/memory.py` copies them out after loading and the file is unmapped;",
        "- elementwise temporaries (`aten::mul`, `aten::add`: RMSNorm, rotary embeddings, LoRA scaling) are the",
        "  largest allocation totals of a step, each freed within its layer (transformers' and peft's code);",
        "- the allocator: glibc keeps freed blocks under its dynamic mmap threshold, so resident memory grows",
        "  over the first steps; bench_allocator.py's section measures glibc's settings against speed;",
        "- the reference forward: with `reference_cache: true` it is gone from training steps altogether.",
        "",
        "Top operators by self CPU time (one step):",
        "",
        "```",
        record["top_time"].rstrip(),
        "```",
        "",
        "Top operators by memory allocated (same step):",
        "",
        "```",
        record["top_memory"].rstrip(),
        "```",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    from dpo.files import json_text

    result = profile_worker(worker_args(__doc__, ["profile"]))
    print("RESULT " + json_text(result, "the profile worker's RESULT line", observations=True), flush=True)
