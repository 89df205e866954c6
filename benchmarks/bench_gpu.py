"""The phi-2 recipe on a GPU: memory, speed and fp16 safety at phi-2's exact size, with random weights.

    python benchmarks/bench_gpu.py --results DIR                # phi-2 size on a CUDA GPU (`make gpu` runs it)
    python benchmarks/bench_gpu.py --scale tiny --results DIR   # the tiny model on CPU: every phase, in seconds

The model has microsoft/phi-2's architecture (PhiConfig: 32 layers, hidden 2560, 32 heads, MLP 10240,
vocabulary 51200, partial rotary 0.4) and random weights (nothing can be downloaded), saved once as fp16
safetensors. Every recipe run goes through the phi-2 recipe's own code path: load_recipe_args with
recipes/dpo_phi2.py's ScriptArguments and recipes/dpo_phi2.yaml (4-bit NF4 + double quantization, LoRA
r16 on q/k/v/dense/fc1/fc2, activation checkpointing, batch 2, reference cache, length grouping), then
dpo.train.trainer.build_dpo_trainer. Changed for a benchmark: gradient_accumulation_steps 1 (a step is one
batch of 2 pairs; accumulation does not change peak memory), max_steps, no eval, no checkpoints.
Pairs are synthetic, truthy-shaped (system + question, long answers) in phi-2's QA format; the chosen
answer fills max_length, the rejected one about 3/4 of it.

Phases, in this order (results.json is rewritten after each run, so a cut run keeps what it measured):
  env         GPU, driver, versions, measured matmul rates
  t4_budget   fp32 compute on the 4-bit base (the T4 default before the H200 run; fp16, the default since,
              peaked lower there: BENCHMARKS.md) at the
              longest length under torch.cuda.set_per_process_memory_fraction capped at 15 GiB; the recipe's
              defaults must peak below 12 GiB allocated, else the fallbacks are tried (before/after)
  cells       {fp32 compute, fp16, bf16} x {512, 1024} tokens: peak allocated/reserved, tokens/s, MFU, finiteness
  fp16_curve  fp16 for 200 steps at 1024 tokens (finite, or the first non-finite step) and fp32 compute for
              the first steps of the same schedule: the distance between the two loss curves
  speed       TRL defaults, TRL + precompute_ref_log_probs, the recipe (cache and grouping off), the recipe
              (cache + grouping: the bf16 cell), use_liger_kernel where liger supports phi
FLOPs: benchmarks/gpu_flops.py. BENCHMARKS.md's section: python benchmarks/gpu_section.py DIR/results.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the dpo package and benchmarks/ of this checkout
from benchmarks import gpu_flops  # noqa: E402
from benchmarks.phi2_random import built_model, make_model, synthetic_pairs  # noqa: E402

RECIPE = ROOT / "recipes" / "dpo_phi2.py"
GiB = 2**30
T4_CAP = 15 * GiB  # a T4's 16 GB is 15.1 GiB, less the CUDA context: what PyTorch can have there
T4_TARGET = 12 * GiB  # the bar for the recipe's defaults at 1024 tokens (issue 21)
T4_FALLBACKS = [{"per_device_train_batch_size": 1, "gradient_accumulation_steps": 64}]  # same 64 pairs per update
# On top of the recipe's YAML; `compute`: the dtype matmuls run in (for the peak). t4_fp32 is fp32 compute,
# the T4 default until the H200 run measured fp16 (dpo/train/hardware.py); results.json names runs by the key.
PRECISIONS = {
    "t4_fp32": {"flags": {"bf16": False, "fp16": False, "dtype": "float32"}, "compute": "fp32"},
    "fp16": {"flags": {"bf16": False, "fp16": True, "dtype": "float16"}, "compute": "fp16"},
    "bf16": {"flags": {"bf16": True, "fp16": False, "dtype": "bfloat16"}, "compute": "bf16"},
}
# Step counts sized for `make gpu` under 8 minutes on an H200 (benchmarks/README.md: 405 s measured for bench).
SCALES = {
    "phi2": dict(
        lengths=(512, 1024), steps=8, warmup=2, pairs=16, curve_steps=200, curve_fp32_steps=30, curve_pairs=64
    ),
    "tiny": dict(lengths=(48, 96), steps=4, warmup=1, pairs=8, curve_steps=12, curve_fp32_steps=6, curve_pairs=16),
}
CURVE_WARMUP = 20  # absolute warm-up steps for both curves, so their schedules agree step for step
BEGAN = time.perf_counter()


def say(message: str) -> None:
    print(f"[bench_gpu +{time.perf_counter() - BEGAN:6.1f}s] {message}", flush=True)


class Results:
    """results.json, rewritten whole (write, then rename) after every change."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.data = folder / "results.json", {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        from dpo.files import json_text

        tmp.write_text(json_text(self.data, self.path, observations=True, indent=2, default=str))
        os.replace(tmp, self.path)


# ── one training run, measured ───────────────────────────────────────────────────────────────
def recipe_trainer(work: Path, name: str, pairs, tokenizer, length: int, steps: int, flags: dict):
    """The phi-2 recipe's trainer (recipes/dpo_phi2.yaml + `flags`) on `pairs`, for `steps` steps."""
    from benchmarks.training_workers import recipe_settings
    from dpo.train.config import load_recipe_args
    from dpo.train.trainer import build_dpo_trainer

    settings = {
        "model_name_or_path": work / "model",
        "dataset_name": "synthetic",  # the recipe's required field; the pairs are handed over below
        "output_dir": work / "runs" / name,
        "max_length": length,
        "max_steps": steps,
        "per_device_train_batch_size": 2,  # the T4 setting: the YAML's auto would choose its own on a GPU
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        **({"reference_cache_dir": work / "refcache"} if flags.get("reference_cache", True) else {}),
        **flags,
    }
    _, training_args, model_args = load_recipe_args(
        recipe_settings(RECIPE), RECIPE, [f"--{k}={v}" for k, v in settings.items()]
    )
    return build_dpo_trainer(model_args, training_args, pairs, None, tokenizer)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(name: str, build, shape: dict, length: int, warmup: int, compute: str, reference_inline: bool, cap=None):
    """Build (`build()`) and train one configuration; a failure (out of memory, a stop on a non-finite value,
    any error) is recorded, not raised. Returns what was measured."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.training_workers import Meter, measure
    from dpo.compat import fp16_loss_scale, fused_lm_head_model
    from dpo.train.safety.guards import NonFiniteTraining

    cuda = torch.cuda.is_available()
    free_memory()
    record = {"name": name, "length": length, "compute": compute, "status": "ok", "scales": []}
    record["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB if cuda else None
    if cap and cuda:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
        record["cap_gib"] = cap / GiB
    trainer, meter, began = None, Meter(), time.perf_counter()
    say(f"{name}: building")
    try:
        trainer = build()
        record["build_s"] = time.perf_counter() - began
        record["fused_lm_head"] = fused_lm_head_model(trainer) is not None
        record["learning_rate"] = trainer.args.learning_rate  # TRL's default and the recipe's differ: losses too
        measure(trainer, meter, torch.cuda.synchronize if cuda else lambda: None)

        class Scale(TrainerCallback):
            def on_step_end(self, *_, built=trainer, **__):
                record["scales"].append(fp16_loss_scale(built))

        trainer.add_callback(Scale())
        say(f"{name}: built in {record['build_s']:.1f} s; training {trainer.args.max_steps} steps")
        trainer.train()
    except torch.OutOfMemoryError as err:
        record["status"], record["error"] = "out of memory", str(err).splitlines()[0][:300]
    except NonFiniteTraining as err:
        record["status"], record["error"], record["first_nonfinite_step"] = "non-finite", str(err), err.step
    except Exception as err:  # a benchmark records every failure and goes on to the next run
        record["status"], record["error"] = "error", f"{type(err).__name__}: {str(err)[:500]}"
    history = trainer.state.log_history if trainer is not None else []
    record["losses"] = [h["loss"] for h in history if "loss" in h]
    record["grad_norms"] = [h.get("grad_norm") for h in history if "loss" in h]
    record["steps"] = len(meter.step_ends)
    if cuda:
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    timed = record["steps"] - warmup
    if timed > 0:
        seconds = meter.step_ends[-1] - meter.step_ends[warmup - 1]
        tokens = meter.step_tokens[-1] - meter.step_tokens[warmup - 1]
        flops = tokens * gpu_flops.flops_per_token(shape, length, reference_inline)
        peak = gpu_flops.peak_flops(torch.cuda.get_device_name(0) if cuda else None, compute)
        record.update(timed_steps=timed, step_s=seconds / timed, tokens_per_s=tokens / seconds)
        record.update(model_tflops=flops / seconds / 1e12, mfu=flops / seconds / peak if peak else None)
    record["padding"] = 1 - meter.tokens / meter.padded if meter.padded else None
    record["seconds"] = time.perf_counter() - began
    del trainer
    if cap and cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    free_memory()
    say(f"{name}: {summary(record)}")
    return record


def summary(r: dict) -> str:
    parts = [r["status"], f"{r['steps']} steps"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tokens/s")
    if r.get("peak_allocated_gib") is not None:
        parts.append(f"peak {r['peak_allocated_gib']:.2f} GiB allocated / {r['peak_reserved_gib']:.2f} reserved")
    return ", ".join(parts) + (f" ({r['error']})" if r.get("error") else "")


def liger_support() -> str | None:
    """None when liger-kernel can patch phi; else why use_liger_kernel cannot be measured here."""
    import importlib.metadata as md

    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed"
    if "phi" not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        version = md.version("liger-kernel")  # the module has no __version__
        return f"liger-kernel {version} has no kernels for model_type phi (only phi3): use_liger_kernel would change nothing"
    return None


# ── the phases ───────────────────────────────────────────────────────────────────────────────
def environment() -> dict:
    """Device, driver, versions, and measured matmul rates (the ceilings actually reachable there)."""
    import importlib.metadata as md
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    if not torch.cuda.is_available():
        return {**env, "device": "CPU (no CUDA)"}
    props = torch.cuda.get_device_properties(0)
    env.update(device=props.name, capability=f"sm{props.major}{props.minor}", memory_gib=props.total_memory / GiB)
    env["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)
    for dtype, n in ((torch.bfloat16, 8192), (torch.float32, 4096)):
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        env[f"matmul_tflops_{str(dtype).split('.')[1]}"] = 10 * 2 * n**3 / (time.perf_counter() - began) / 1e12
        del a, b
    free_memory()
    return env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="phi2")
    parser.add_argument("--results", required=True, help="folder for results.json and gpu_section.md")
    parser.add_argument("--workdir", default="/tmp/dpo-bench-gpu", help="model, runs and reference cache")
    parser.add_argument("--phases", default="env,t4_budget,cells,fp16_curve,speed")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoConfig

    from dpo.train.model_checks import load_tokenizer

    s, results, work = SCALES[args.scale], Results(Path(args.results)), Path(args.workdir)
    phases = args.phases.split(",")
    results.put("settings", {**s, "scale": args.scale, "phases": phases, "recipe": "recipes/dpo_phi2.yaml"})
    if "env" in phases:
        results.put("env", environment())
        say(f"environment: {results.data['env']}")
    if not built_model(args.scale, work / "model"):  # whole, and of this scale
        began = time.perf_counter()
        results.put("model", {**make_model(args.scale, work / "model"), "seconds": time.perf_counter() - began})
        say(
            f"model: {results.data['model']['parameters']:,} parameters saved in {results.data['model']['seconds']:.1f} s"
        )
    tokenizer = load_tokenizer(str(work / "model"))
    yaml_lora = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]  # recipes/dpo_phi2.yaml
    shape = gpu_flops.model_shape(AutoConfig.from_pretrained(work / "model"), 16, yaml_lora)
    results.put("shape", shape)
    longest, runs = max(s["lengths"]), {}
    pairs = {length: synthetic_pairs(tokenizer, s["pairs"], length) for length in s["lengths"]}

    def recipe_run(name, precision, length, steps, extra=None, cap=None, data=None, warmup=None):
        p = PRECISIONS[precision]
        flags = {**p["flags"], **(extra or {})}
        cached = flags.get("reference_cache", True)  # recipes/dpo_phi2.yaml: reference_cache: true

        def build():
            return recipe_trainer(work, name, data or pairs[length], tokenizer, length, steps, flags)

        record = run(
            name, build, shape, length, s["warmup"] if warmup is None else warmup, p["compute"], not cached, cap
        )
        record["settings"] = {k: v for k, v in flags.items()}
        runs[name] = record
        results.put("runs", runs)
        return record

    if "t4_budget" in phases:
        attempts = [recipe_run(f"t4_fp32_{longest}", "t4_fp32", longest, s["steps"], cap=T4_CAP)]
        for fallback in T4_FALLBACKS:
            last = attempts[-1]
            if last["status"] == "ok" and last.get("peak_allocated_gib", 0) < T4_TARGET / GiB:
                break
            attempts.append(
                recipe_run(
                    f"t4_fp32_{longest}_fallback{len(attempts)}", "t4_fp32", longest, s["steps"], fallback, T4_CAP
                )
            )
        results.put(
            "t4_budget",
            {"cap_gib": T4_CAP / GiB, "target_gib": T4_TARGET / GiB, "attempts": [a["name"] for a in attempts]},
        )
    if "cells" in phases:
        for precision in PRECISIONS:
            for length in s["lengths"]:
                if f"{precision}_{length}" not in runs:  # the capped T4 run is that cell when it ran
                    recipe_run(f"{precision}_{length}", precision, length, s["steps"])
    if "fp16_curve" in phases:
        curve_pairs = synthetic_pairs(tokenizer, s["curve_pairs"], longest, seed=1)
        schedule = {"warmup_steps": CURVE_WARMUP}
        fp16 = recipe_run("curve_fp16", "fp16", longest, s["curve_steps"], schedule, data=curve_pairs)
        fp32 = recipe_run("curve_fp32", "t4_fp32", longest, s["curve_fp32_steps"], schedule, data=curve_pairs)
        common = list(zip(fp16["losses"], fp32["losses"]))
        gaps = [abs(a - b) for a, b in common]
        results.put(
            "fp16_curve",
            {
                "steps_run": fp16["steps"],
                "first_nonfinite_step": fp16.get("first_nonfinite_step"),
                "skipped_steps": sum(1 for g in fp16["grad_norms"] if g is None or g != g or abs(g) == float("inf")),
                "final_loss_scale": fp16["scales"][-1] if fp16["scales"] else None,
                "compared_steps": len(common),
                "max_abs_loss_gap": max(gaps) if gaps else None,
                "mean_abs_loss_gap": sum(gaps) / len(gaps) if gaps else None,
                "fp32_loss_change": fp32["losses"][0] - fp32["losses"][-1] if fp32["losses"] else None,
            },
        )
    if "speed" in phases:
        cpu = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}
        common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=longest)
        common.update(max_steps=s["steps"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
        for name, extra in (("trl_defaults", {}), ("trl_precompute", {"precompute_ref_log_probs": True})):
            from benchmarks.training_workers import trl_trainer
            from dpo.train.speed.kernels import portable_4bit_layers, use_portable_4bit_kernels

            def build(name=name, extra=extra):
                out = str(work / "runs" / name)
                with (
                    portable_4bit_layers()
                ):  # CPU only (dpo/train/speed/kernels.py): TRL's precompute runs in __init__
                    trainer = trl_trainer(
                        str(work / "model"), pairs[longest], tokenizer, output_dir=out, **common, **cpu, **extra
                    )
                use_portable_4bit_kernels(trainer.model)
                return trainer

            runs[name] = run(name, build, shape, longest, s["warmup"], "bf16", not extra)
            results.put("runs", runs)
        recipe_run(
            "recipe_plain",
            "bf16",
            longest,
            s["steps"],
            {"reference_cache": False, "train_sampling_strategy": "random"},
        )
        if f"bf16_{longest}" not in runs:
            recipe_run(f"bf16_{longest}", "bf16", longest, s["steps"])
        why_not = liger_support()
        if why_not is None:
            recipe_run("recipe_liger", "bf16", longest, s["steps"], {"use_liger_kernel": True})
        results.put("liger", why_not or "measured: recipe_liger")
    from benchmarks.gpu_section import markdown
    from dpo.files import write_text_atomic

    folder = Path(args.results)
    write_text_atomic(
        folder / "gpu_section.md", markdown(results.data, "make gpu", folder.resolve(), folder.resolve())
    )
    say(f"done: {results.path}")


if __name__ == "__main__":
    main()
