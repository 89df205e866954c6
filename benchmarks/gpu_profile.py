"""The GPU step profile (issue 38): where a training step's time goes, TRL + precompute_ref_log_probs against the
phi-2 recipe and the recipe with each speed change on its own, at phi-2's size with random weights.

    python benchmarks/gpu_profile.py --results DIR                       # phi-2 size on a CUDA GPU (make gpu)
    python benchmarks/gpu_profile.py --scale tiny --results DIR          # the tiny phi on a CPU: every code path
    python benchmarks/gpu_profile.py --configs recipe,trl_precompute --sizes 1024 --runs 3 --results DIR

Every run (a configuration at a size) is a process of its own, so memory, compiled kernels and allocator state do
not leak from one to the next. Runs are interleaved: round r runs every cell once (cells by tier, then table
order) before round r+1, so drift (clocks, temperature, page cache) lands on every configuration alike. A run:
build the trainer, `warmup` steps, `timed` steps timed by phase (benchmarks/phase_clock.py: CUDA events), then
`profiled` steps under torch.profiler (benchmarks/kernel_classes.py: kernel time by class, GPU busy %, launches
and host syncs per step). Per cell: median and spread (min-max) over runs of tokens/s and of each phase.

A configuration the installed code cannot run (a setting it does not know yet) is reported as skipped with the
reason; one that fails records its error. Before each run the budget is checked against what the cell's earlier
runs took (or the table's estimate): a run that would not fit is skipped, named. profile.json is rewritten after
every run, profile_section.md (benchmarks/profile_section.py) at the end; profile-runs.log keeps each child's output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.profile_plan import CONFIGS, DEFAULT_CELLS, NOT_SEPARABLE, SCALES, SIZES, GiB, cells_of, plan  # noqa: E402
from dpo.errors import exit_on_user_error  # noqa: E402
from dpo.files import json_text, write_text_atomic  # noqa: E402

BEGAN = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_profile +{time.perf_counter() - BEGAN:6.1f}s] {message}", flush=True)


# ── one run, in its own process ──────────────────────────────────────────────────────────────
def pairs_for(tokenizer, scale: str, size: str, n: int):
    from datasets import concatenate_datasets

    from benchmarks.phi2_random import synthetic_pairs

    _, lengths = SIZES[size][scale]
    per = -(-n // len(lengths))
    return concatenate_datasets([synthetic_pairs(tokenizer, per, length, seed=i) for i, length in enumerate(lengths)])


def build(cfg: dict, args, tokenizer, steps: int, pairs):
    import torch

    max_length, _ = SIZES[args.size][args.scale]
    out = Path(args.workdir) / "runs" / f"{args.config}-{args.size}-{args.run}-{os.getpid()}"
    if cfg["side"] == "trl":
        from benchmarks.training_workers import trl_trainer

        cpu = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}
        common = dict(max_length=max_length, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none")
        return trl_trainer(
            args.model,
            pairs,
            tokenizer,
            cfg["dtype"],
            output_dir=str(out),
            disable_tqdm=True,
            **common,
            **cpu,
            **cfg["settings"],
        )
    from benchmarks.bench_gpu import recipe_trainer

    flags = {"reference_cache_dir": Path(args.workdir) / f"refcache-{args.size}", **cfg["settings"]}
    return recipe_trainer(Path(args.workdir), out.name, pairs, tokenizer, max_length, steps, flags)


def label_lm_head() -> None:
    """A profiler range around TRL's fused LM head forward (its backward is named by autograd already)."""
    import torch

    from dpo.compat import FusedLMHeadFunction as function  # TRL's fused LM head, an autograd Function

    apply = function.apply
    if getattr(apply, "labelled", False):  # runs in one process (--in-process): once
        return

    def labelled(*args, **kwargs):
        with torch.profiler.record_function("profile::lm_head"):
            return apply(*args, **kwargs)

    labelled.labelled = True
    function.apply = labelled


def worker(args) -> dict:
    import torch

    from benchmarks import gpu_flops, kernel_classes
    from benchmarks.phase_clock import PhaseClock
    from dpo.train.model_checks import load_tokenizer

    cfg, s, cuda = CONFIGS[args.config], SCALES[args.scale], torch.cuda.is_available()
    record = {"config": args.config, "size": args.size, "run": args.run, "status": "ok"}
    record["device"] = torch.cuda.get_device_name(0) if cuda else "CPU"
    if cuda and cfg.get("cap_gib"):
        torch.cuda.set_per_process_memory_fraction(
            cfg["cap_gib"] * GiB / torch.cuda.get_device_properties(0).total_memory
        )
    tokenizer = load_tokenizer(args.model)
    if cfg["side"] == "generation":
        return {**record, **generation(args.model, tokenizer, args.scale)}
    auto = "auto_" if cfg.get("steps") == "auto" else ""  # `auto` cells: their own step counts (SCALES)
    warmup, timed, profiled = (s[auto + key] for key in ("warmup", "timed", "profiled"))
    steps = warmup + timed + profiled
    pairs = pairs_for(tokenizer, args.scale, args.size, s[auto + "pairs"])
    began = time.perf_counter()
    try:
        trainer = build(cfg, args, tokenizer, steps, pairs)
    except Exception as err:  # a setting refused, out of memory while loading: recorded
        return {**record, "status": "error", "error": f"building: {type(err).__name__}: {str(err)[:400]}"}
    record["build_s"] = time.perf_counter() - began
    a = trainer.args
    record.update(
        micro_batch=a.per_device_train_batch_size,
        accumulation=a.gradient_accumulation_steps,
        optim=getattr(a.optim, "value", a.optim),
    )
    record.update(activation_checkpointing=bool(getattr(a, "activation_checkpointing", a.gradient_checkpointing)))
    record["dtype"] = str(next(p for p in trainer.model.parameters() if p.is_floating_point()).dtype)
    clock, tokens, marks = PhaseClock(cuda), [torch.zeros((), dtype=torch.long, device=a.device)], []
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *rest, **kwargs):  # on the device: no host sync added to the step
        tokens[0] = tokens[0] + inputs["attention_mask"].sum()
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = counting
    clock.install(trainer)
    label_lm_head()
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    )

    def at_step_end(ended: int) -> None:
        marks.append(tokens[0].clone())
        if ended == warmup + timed:
            profiler.__enter__()
        elif ended == steps:
            profiler.__exit__(None, None, None)

    clock.on_step_end.append(at_step_end)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError as err:
        record["status"], record["error"] = "out of memory", str(err).splitlines()[0][:300]
    except Exception as err:  # recorded, the next run goes on
        record["status"], record["error"] = "error", f"{type(err).__name__}: {str(err)[:400]}"
    if record["status"] != "ok":
        return record
    per_step = clock.steps()  # steps 2..N (module phase_clock); timed: steps warmup+1 .. warmup+timed
    counts = [int(t) for t in marks]
    first = warmup - 1
    window = per_step[first : first + timed]
    step_tokens = [counts[i + 1] - counts[i] for i in range(first, first + timed)]
    seconds = sum(w["seconds"] for w in window)
    record.update(timed_steps=len(window), steps=window, step_tokens=step_tokens)
    record["tokens_per_s"] = sum(step_tokens) / seconds
    under = per_step[first + timed : first + timed + profiled]
    window_us = 1e6 * sum(p["seconds"] for p in under) if under else None
    record["profile"] = kernel_classes.summarize(profiler.events(), profiled, window_us)
    if cuda:
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    # Model FLOPs (benchmarks/gpu_flops.py; the reference is cached or precomputed on both sides) over the datasheet
    # dense bf16 peak of the named GPU; None on a CPU, where the same code runs
    _, lengths = SIZES[args.size][args.scale]
    shape = gpu_flops.model_shape(trainer.model.config, 16, ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    flops = gpu_flops.flops_per_token(shape, statistics.mean(lengths), reference_inline=False)
    peak = gpu_flops.peak_flops(record["device"] if cuda else None, "bf16")
    record.update(model_tflops=record["tokens_per_s"] * flops / 1e12, peak_tflops=peak and peak / 1e12)
    record["mfu"] = peak and record["tokens_per_s"] * flops / peak
    return record


def generation(model: str, tokenizer, scale: str) -> dict:
    """The rounds' batched sampler against one prompt at a time, on the 4-bit base (dpo.rounds.models)."""
    import torch

    from dpo.compat import ModelConfig
    from dpo.evaluation.sampling import Sampling, generation_speed
    from dpo.rounds.models import load_policy

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    model_args = ModelConfig(model_name_or_path=model, load_in_4bit=True, bnb_4bit_quant_type="nf4", dtype=dtype)

    class Args:
        trust_remote_code, fp16, model_init_kwargs = False, False, None

    policy = load_policy(model_args, Args, None)
    prompts = [f"Instruct: question {i}: why is the sky blue?\nOutput:" for i in range(8 if scale == "phi2" else 2)]
    new = 32 if scale == "phi2" else 4
    return generation_speed(policy, tokenizer, prompts, 2, Sampling(1.0, 1.0, new, 64), seed=0)


# ── the driver ───────────────────────────────────────────────────────────────────────────────
def support(args) -> dict:
    """Per recipe configuration: None when the installed recipe accepts its settings, else why not (parsed and
    checked as the recipe would, before any weights load)."""
    import contextlib
    import io

    from benchmarks.bench_gpu import RECIPE
    from benchmarks.training_workers import recipe_settings
    from dpo.errors import UserError
    from dpo.train.config import load_recipe_args

    out = {}
    for name, cfg in CONFIGS.items():
        if cfg["side"] != "recipe":
            out[name] = None
            continue
        flags = {"model_name_or_path": args.model, "dataset_name": "synthetic", "max_steps": 4, **cfg["settings"]}
        flags["output_dir"] = Path(args.workdir) / "runs" / "support-check"
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                load_recipe_args(recipe_settings(RECIPE), RECIPE, [f"--{k}={v}" for k, v in flags.items()])
            out[name] = None
        except (UserError, SystemExit) as refused:
            why = (str(refused) if isinstance(refused, UserError) else err.getvalue()) or repr(refused)
            out[name] = " ".join(why.split())[:300]
    return out


def summarize_cell(records: list[dict]) -> dict:
    from benchmarks.phase_clock import PHASES

    ok = [r for r in records if r["status"] == "ok" and r.get("tokens_per_s")]
    if not ok:
        return {"runs": 0}

    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    step = [statistics.median([w["seconds"] for w in r["steps"]]) for r in ok]
    phases = {p: spread([statistics.median([w["phases"][p] for w in r["steps"]]) for r in ok]) for p in PHASES}
    out = {"runs": len(ok), "tokens_per_s": spread([r["tokens_per_s"] for r in ok]), "step_s": spread(step)}
    out["phases_s"] = phases
    for key in ("micro_batch", "accumulation", "peak_allocated_gib", "mfu", "peak_tflops", "optim", "dtype"):
        out[key] = ok[-1].get(key)
    prof = [r["profile"] for r in ok]
    out["profile"] = {
        "kernel_ms_per_step": {
            c: statistics.median(p["kernel_ms_per_step"][c] for p in prof) for c in prof[0]["kernel_ms_per_step"]
        },
        **{k: statistics.median(p[k] for p in prof) for k in ("launches_per_step", "syncs_per_step")},
        "busy_pct": statistics.median(p["busy_pct"] for p in prof) if prof[0]["busy_pct"] is not None else None,
        "source": prof[0]["source"],
        "top": prof[-1].get("top"),
    }
    return out


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="phi2")
    parser.add_argument("--results", required=True)
    parser.add_argument("--workdir", default="/tmp/dpo-gpu-profile", help="model, runs, reference caches")
    parser.add_argument("--cells", help="size:config,...;size:... (default: DEFAULT_CELLS of the scale)")
    parser.add_argument("--runs", type=int, help="runs per cell (default: the scale's)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: the scale's)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for every run together")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "SIZE", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="every run in this process (tests: tiny scale)")
    args = parser.parse_args(argv)
    if args.steps:
        SCALES[args.scale].update(timed=args.steps, auto_timed=args.steps)  # tests: fewer steps
    if args.worker:
        record = run_child(args, *args.worker)
        print(
            "RESULT " + json_text(record, "the profile child's RESULT line", observations=True, default=str),
            flush=True,
        )
        return 0
    return drive(args)


def run_child(args, config: str, size: str, run: str) -> dict:
    """What one child process does: prepare (the model, the configurations' support) or one run."""
    args = argparse.Namespace(**{**vars(args), "config": config, "size": size, "run": int(run)})
    if args.scale == "tiny":  # a tiny model on a small CPU: two OpenMP threads waiting on each other are 10-50x slower
        import torch

        torch.set_num_threads(1)
    if config == "prepare":  # the model when it is not there yet, and which configurations the recipe accepts
        from benchmarks.phi2_random import built_model, make_model

        made = None
        if not built_model(args.scale, Path(args.model)):
            made = {k: v for k, v in make_model(args.scale, Path(args.model)).items() if k != "config"}
        return {"model": made or {"folder": args.model, "reused": True}, "support": support(args)}
    return worker(args)


def drive(args) -> int:
    from benchmarks.bench_gpu import Results

    s, results, work = SCALES[args.scale], Results(Path(args.results)), Path(args.workdir)
    results.path = Path(args.results) / "profile.json"  # beside bench_gpu.py's results.json in `make gpu`
    cells, runs = cells_of(args.cells or DEFAULT_CELLS[args.scale]), args.runs or s["runs"]
    order = plan(cells, runs)
    model = work / "model"
    settings = {**s, "scale": args.scale, "runs": runs, "cells": [list(c) for c in cells], "budget_s": args.budget}
    results.put("settings", {**settings, "order": [list(o) for o in order], "not_separable": NOT_SEPARABLE})
    results.put(
        "configs",
        {n: {k: v for k, v in c.items() if k != "settings"} | {"settings": c["settings"]} for n, c in CONFIGS.items()},
    )
    guess = sum(s["auto_est_s" if CONFIGS[c].get("steps") else "est_s"] for c, _, _ in order)
    say(f"{len(order)} runs planned, about {guess} s before measuring; budget {args.budget:.0f} s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, __file__, "--scale", args.scale, "--results", args.results, "--workdir", str(work)]
    base += ["--model", str(model)] + (["--steps", str(args.steps)] if args.steps else [])

    def child(what: list[str], limit: float):
        began = time.perf_counter()
        if args.in_process:  # tests at the tiny scale: everything in this process, no time limit
            try:
                record = run_child(argparse.Namespace(**{**vars(args), "model": str(model)}), *what)
            except Exception as err:  # as a child's crash: recorded, the next run goes on
                return None, f"{type(err).__name__}: {str(err)[:300]}", 0.0
            return (
                json.loads(json_text(record, "an in-process run's record", observations=True, default=str)),
                None,
                0.0,
            )
        try:
            proc = subprocess.run(base + ["--worker", *what], env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return None, f"killed at the budget after {limit:.0f} s", time.perf_counter() - began
        with open(Path(args.results) / "profile-runs.log", "a") as log:  # every child's own output, for a failure
            log.write(f"=== {' '.join(what)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            return None, f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}", 0.0
        return json.loads(lines[-1][len("RESULT ") :]), None, time.perf_counter() - began

    supported = {}
    if order:  # in a child: the driver never holds GPU memory
        prepared, error, _ = child(["prepare", "any", "0"], max(1.0, args.budget - (time.perf_counter() - BEGAN)))
        results.put("model", (prepared or {}).get("model") or {"error": error})
        supported = prepared["support"] if prepared else {name: error for name in CONFIGS}
    results.put("support", supported)
    records, walls = [], {}
    for config, size, run in order:
        left = args.budget - (time.perf_counter() - BEGAN)
        estimate = max(walls.get((config, size), [s["auto_est_s" if CONFIGS[config].get("steps") else "est_s"]]))
        base_record = {"config": config, "size": size, "run": run}
        if supported.get(config):
            record = {**base_record, "status": "skipped", "reason": supported[config]}
        elif estimate > left:
            record = {
                **base_record,
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left, about {estimate:.0f} s needed",
            }
        else:
            say(f"{config} at {size}, run {run + 1}: started")
            got, error, wall = child([config, size, str(run)], left)
            record = got or {**base_record, "status": "error", "error": error}
            record["wall_s"] = wall
            walls.setdefault((config, size), []).append(wall)
        say(f"{config} at {size}, run {run + 1}: {record['status']} {record.get('tokens_per_s') or ''}")
        records.append(record)
        if record.get("device") and "env" not in results.data:
            results.put("env", {"device": record["device"]})
        results.put("runs", records)
        cell = [r for r in records if (r["config"], r["size"]) == (config, size)]
        results.put("cells", {**results.data.get("cells", {}), f"{config}@{size}": summarize_cell(cell)})
    from benchmarks.profile_section import markdown

    write_text_atomic(Path(args.results) / "profile_section.md", markdown(results.data))
    say(f"done: {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
