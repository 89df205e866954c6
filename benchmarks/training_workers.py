"""One configuration of benchmarks/bench_training.py, in a process of its own (so that its peak
resident memory is its own and its wall time is a whole run's). Prints one line, `RESULT {json}`:
training seconds, reference-pass seconds, real and computed tokens of every training batch, the
loss of every step, peak resident memory.

    python benchmarks/training_workers.py recipe --model MODEL_DIR --workdir DIR --max_length 256

DIR holds pairs.jsonl (written by bench_training.py), refcache/ (the `cache_build` worker fills it: the
recipe's warm cache) and datasets-cache/ (the pairs as `load_dataset` caches them, beside which TRL's
precompute_ref_log_probs keeps its results: the `trl_cache_build` worker fills it, TRL's warm cache).
Cold-cache configurations get an empty cache folder of their own; TRL's cold one reads the pairs in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the dpo package of this checkout
RECIPE = ROOT / "recipes" / "dpo_any.py"
YAML = ROOT / "recipes" / "dpo_smollm2_hh.yaml"  # the shipped settings every configuration is measured at


def recipe_settings(recipe: Path = RECIPE):
    """A recipe's ScriptArguments (recipes/dpo_any.py's unless told), without running it (recipes/ is not a package)."""
    import runpy

    return runpy.run_path(str(recipe))["ScriptArguments"]


CONFIGS = (
    "seed_loop",
    "trl_defaults",
    "trl_precompute",
    "trl_precompute_warm",
    "recipe_padded",
    "recipe",
    "recipe_warm",
    "recipe_wider",
)


def shipped(key: str):
    """A setting of the shipped YAML, which every configuration shares (batch, truncation, LoRA, 4-bit)."""
    import yaml

    return yaml.safe_load(YAML.read_text())[key]


# Pairs per optimizer step, every configuration: the recipe as its YAML says (micro-batches of
# per_device_train_batch_size, accumulated), TRL's and the seed loop in one batch of this size.
BATCH = shipped("per_device_train_batch_size") * shipped("gradient_accumulation_steps")
WIDER = 2  # configuration 7's micro-batch (pairs): the shipped step in fewer, longer rows (the YAML's earlier setting)


def read_pairs(path: Path):
    from datasets import Dataset

    return Dataset.from_list([json.loads(line) for line in open(path)])


def read_pairs_as_trl_user(work: Path):
    """The pairs as a TRL user reads a file: `load_dataset("json", ...)`, whose cache files (work/datasets-cache)
    TRL 1.16's precompute_ref_log_probs writes its results beside, keyed by the dataset's fingerprint and a hash
    of the reference, and reads again in the next run: TRL's own warm cache. `read_pairs` (Dataset.from_list) is
    in memory, with no cache files, so TRL's cold configuration computes the reference every run."""
    from datasets import load_dataset

    files = str(work / "pairs.jsonl")
    return load_dataset("json", data_files=files, split="train", cache_dir=str(work / "datasets-cache"))


# ── workers: one configuration per process ──────────────────────────────────────────────────
def tokenizer_for(model: str):
    """The tokenizer as the recipe uses it: a plain chat template added when the model has none."""
    from dpo.data.formats import ensure_chat_template
    from dpo.train.model_checks import load_tokenizer

    tokenizer = load_tokenizer(model)
    ensure_chat_template(tokenizer)
    return tokenizer


class Meter:
    """Counts real and padded tokens of every training batch, and times the training steps."""

    def __init__(self):
        self.tokens = self.padded = 0
        self.reference_s, self.packed = 0.0, False
        self.losses, self.began, self.seconds = [], None, 0.0
        self.step_ends, self.step_tokens = [], []  # per optimizer step: clock and token count at its end
        self.micro_batches = 0
        self.reference_batches = 0  # batches TRL's compute_ref_log_probs scored (a warm disk cache: none)
        self.first_margin = None  # rewards/margins of the first step: policy = reference there, so 0 up to rounding

    def count(self, attention_mask):
        self.tokens += int(attention_mask.sum())
        self.micro_batches += 1
        self.padded += attention_mask.numel()


def measure(trainer, meter: Meter, sync=lambda: None) -> None:
    """Count every training batch's tokens into `meter` (not the cache's parity check: it does not go
    through compute_loss) and time train() as a whole and each optimizer step's end, after `sync()`
    (torch.cuda.synchronize on a GPU, where kernels run asynchronously)."""
    from transformers import TrainerCallback

    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *args, **kwargs):
        meter.count(inputs["attention_mask"])
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_compute_loss

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            sync()
            meter.began = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            meter.step_ends.append(time.perf_counter())
            meter.step_tokens.append(meter.tokens)

        def on_train_end(self, *_, **__):
            sync()
            meter.seconds = time.perf_counter() - meter.began

    trainer.add_callback(Clock())


def trl_trainer(model: str, pairs, tokenizer, dtype: str = "float32", **config):
    """TRL's DPOTrainer as `trl dpo --use_peft --load_in_4bit ...` builds it: the model by name in float32 (or
    `dtype`: what `--dtype` gives a TRL user),
    the shipped YAML's 4-bit base and LoRA (the same model as the recipe trains), every DPOConfig field
    TRL's default except `config` (what a comparison fixes: batch, length, truncation, steps, logging,
    and for the informed user precompute_ref_log_probs)."""
    import torch

    from dpo.compat import DPOConfig, DPOTrainer, ModelConfig, get_quantization_config, lora_config
    from dpo.train.speed.kernels import portable_4bit_layers

    same = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "bnb_4bit_quant_type",
        "use_bnb_nested_quant",
    )
    model_args = ModelConfig(
        model_name_or_path=model, use_peft=True, load_in_4bit=True, dtype=dtype, **{k: shipped(k) for k in same}
    )
    training_args = DPOConfig(**config)
    training_args.model_init_kwargs = {"dtype": getattr(torch, dtype)}
    # On a CPU with AVX512-BF16, plain TRL with precompute_ref_log_probs cannot train at all: the no-grad
    # pass repacks bitsandbytes' 4-bit weights for inference and the first step fails (dpo/train/speed/
    # kernels.py). Built with the portable kernel, the one TRL's own training steps use anyway.
    with portable_4bit_layers():
        return DPOTrainer(
            model=model,
            args=training_args,
            train_dataset=pairs,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(model_args),
            peft_config=lora_config(model_args),
        )


def timed_reference_pass(meter: Meter) -> None:
    """Add the seconds of every reference pass before training (TRL's precompute_ref_log_probs, the
    recipe's cache fill) to meter.reference_s."""
    import dpo.train.speed.refcache as refcache
    from dpo.compat import DPOTrainer

    def timing(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                meter.reference_s += time.perf_counter() - began

        setattr(owner, name, wrapper)

    timing(DPOTrainer, "_precompute_ref_logps")
    timing(refcache, "_fill")
    score = DPOTrainer.compute_ref_log_probs

    def counted(self, *args, **kwargs):
        meter.reference_batches += 1
        return score(self, *args, **kwargs)

    DPOTrainer.compute_ref_log_probs = counted


COMMON = dict(  # what every trainer configuration fixes besides the shipped batch and length
    num_train_epochs=1,
    logging_steps=1,  # a loss per step, for the quality check
    save_strategy="no",
    eval_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    bf16=False,
)


def trainer_worker(config: str, args, train: bool = True) -> Meter:
    """A trainer configuration; `train=False` builds it only (trl_cache_build: TRL's precompute runs in
    DPOTrainer.__init__ and writes its disk cache there)."""
    from dpo.train.config import load_recipe_args
    from dpo.train.trainer import build_dpo_trainer

    meter, work = Meter(), Path(args.workdir)
    common = dict(COMMON, max_length=args.max_length, truncation_mode=shipped("truncation_mode"))
    warm_trl = config in ("trl_precompute_warm", "trl_cache_build")
    pairs = read_pairs_as_trl_user(work) if warm_trl else read_pairs(work / "pairs.jsonl")
    timed_reference_pass(meter)
    if config.startswith("trl_"):
        extra = dict(per_device_train_batch_size=BATCH, gradient_accumulation_steps=1)
        extra.update({"precompute_ref_log_probs": True} if config != "trl_defaults" else {})
        out = str(work / f"{config}-{os.getpid()}")
        trainer = trl_trainer(args.model, pairs, tokenizer_for(args.model), output_dir=out, **common, **extra)
    else:
        flags = recipe_flags(args, config) + [f"--{k}={v}" for k, v in common.items()]
        _, training_args, model_args = load_recipe_args(recipe_settings(), RECIPE, flags)
        trainer = build_dpo_trainer(model_args, training_args, pairs, None, tokenizer_for(args.model))
    meter.packed = bool(getattr(trainer.args, "packing", False))
    if not train:
        return meter
    measure(trainer, meter)
    trainer.train()
    meter.losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    meter.first_margin = next(h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h)
    return meter


def seed_loop_worker(args) -> Meter:
    """The seed article's loop: two fp32 models, four forwards a step (policy and reference, chosen and
    rejected separately), full logits and log_softmax over the vocabulary, AdamW on every weight."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dpo.data.formats import count_tokens, render

    meter, tokenizer = Meter(), tokenizer_for(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-7)  # the DPO paper code's default
    rows = list(read_pairs(Path(args.workdir) / "pairs.jsonl"))
    random.Random(42).shuffle(rows)

    def sequences(row):
        texts = render(row["prompt"], row["chosen"], row["rejected"], tokenizer)
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ((n_prompt, _, _),) = count_tokens([texts], tokenizer, chat=True)
        return [truncated(ids[k], n_prompt) for k in (1, 2)]

    def truncated(seq, n_prompt):  # as the trainers cut: the shipped truncation_mode
        cut = max(0, len(seq) - args.max_length)
        if shipped("truncation_mode") == "keep_end":
            return seq[cut:], max(0, n_prompt - cut)
        return seq[: args.max_length], min(n_prompt, args.max_length)

    def logps(model, seqs):
        width = max(len(s) for s, _ in seqs)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s, _ in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
        completion = torch.tensor([[0] * p + [1] * (len(s) - p) + [0] * (width - len(s)) for s, p in seqs])
        if model is policy:  # each pair's tokens once, as for the trainers (their batch goes through both)
            meter.count(mask)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * completion[:, 1:]).sum(-1)

    policy.train()
    meter.began = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        batch = [sequences(r) for r in rows[start : start + BATCH]]
        chosen, rejected = [b[0] for b in batch], [b[1] for b in batch]
        pc, pr = logps(policy, chosen), logps(policy, rejected)
        with torch.no_grad():
            rc, rr = logps(reference, chosen), logps(reference, rejected)
        margins = 0.1 * ((pc - rc) - (pr - rr))  # beta 0.1, as TRL logs rewards/margins
        if meter.first_margin is None:
            meter.first_margin = margins.mean().item()
        loss = -F.logsigmoid(margins).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        meter.losses.append(loss.item())
    meter.seconds = time.perf_counter() - meter.began
    return meter


def worker(config: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    meter = seed_loop_worker(args) if config == "seed_loop" else trainer_worker(config, args)
    return {
        "config": config,
        "seconds": meter.seconds,
        "reference_s": meter.reference_s,
        "tokens": meter.tokens,
        "padded_tokens": meter.tokens if meter.packed else meter.padded,  # what the model computed on
        "micro_batches": meter.micro_batches,  # forwards with a loss (the seed loop: its policy forwards)
        "losses": meter.losses,
        "first_margin": meter.first_margin,
        "reference_batches": meter.reference_batches,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def recipe_flags(args, config: str) -> list[str]:
    """The shipped YAML with this benchmark's model, pairs and output; all data trains (no held-out split).
    Cold configurations get an empty cache folder of their own; warm ones (and the builder) share refcache/."""
    work = Path(args.workdir)
    warm = config in ("recipe_warm", "cache_build")
    cache = work / "refcache" if warm else Path(tempfile.mkdtemp(prefix=f"cold-{config}-", dir=work))
    flags = ["--config", str(YAML), "--model_name_or_path", args.model, "--test_size", "0"]
    flags += ["--dataset_name", str(work / "pairs.jsonl"), "--output_dir", str(work / f"{config}-{os.getpid()}")]
    flags += ["--reference_cache_dir", str(cache), "--packing", str(config != "recipe_padded")]
    if config == "recipe_wider":
        flags += ["--per_device_train_batch_size", str(WIDER), "--gradient_accumulation_steps", str(BATCH // WIDER)]
    steps = -(-len((work / "pairs.jsonl").read_text().splitlines()) // BATCH)
    if steps <= shipped("warmup_steps"):  # --quick's 16 pairs: 2 steps, inside the YAML's 5-step warm-up,
        flags += ["--warmup_steps=0"]  # which the settings gate refuses (dpo/gate/plan.py); the full run keeps it
    return flags


def build_cache(args) -> dict:
    """The one-off cost: a recipe trainer that fills the reference cache, without training."""
    from dpo.train.config import load_recipe_args
    from dpo.train.speed.refcache import Store
    from dpo.train.trainer import build_dpo_trainer

    work = Path(args.workdir)
    flags = recipe_flags(args, "cache_build") + [f"--max_length={args.max_length}"]
    flags += ["--use_cpu=true", "--bf16=false", "--report_to=none", "--eval_strategy=no"]
    _, training_args, model_args = load_recipe_args(recipe_settings(), RECIPE, flags)
    build_dpo_trainer(model_args, training_args, read_pairs(work / "pairs.jsonl"), None, tokenizer_for(args.model))
    (folder,) = [p for p in (work / "refcache").iterdir() if p.is_dir()]
    rows = Store(folder).load().rows
    return {"config": "cache_build", "pairs": len(rows), "seconds": sum(r[2] for r in rows.values())}


def worker_args(description: str, configs: list[str]) -> argparse.Namespace:
    """A worker process's command line (bench_training.run_worker writes it), with torch's threads set."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=configs)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max_length", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = worker_args(__doc__, [*CONFIGS, "cache_build", "trl_cache_build"])
    if args.config == "cache_build":
        result = build_cache(args)
    elif args.config == "trl_cache_build":  # TRL's one-off cost: its precompute, written to its disk cache
        result = {"config": "trl_cache_build", "seconds": trainer_worker(args.config, args, train=False).reference_s}
    else:
        result = worker(args.config, args)
    from dpo.files import json_text

    print("RESULT " + json_text(result, "the worker's RESULT line", observations=True), flush=True)


if __name__ == "__main__":
    main()
