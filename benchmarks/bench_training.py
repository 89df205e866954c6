"""DPO training speed and memory on CPU, whole runs: the seed article's loop, TRL's defaults, TRL as an
informed user runs it (precompute_ref_log_probs), and this repo's shipped recipe, on the same real pairs.

    python benchmarks/bench_training.py                  # the BENCHMARKS.md table (about 80 min on 2 CPU cores)
    python benchmarks/bench_training.py --quick          # a few minutes: fewer, shorter pairs, one round
    python benchmarks/bench_training.py --json out.json  # the same numbers for machines
    python benchmarks/bench_training.py --profile        # instead: where a recipe step's time and memory go
    python benchmarks/bench_training.py --quick --fork_workers  # a rehearsal: workers forked, imports left out

Model: SmolLM2-135M-Instruct (python -m dpo.models); data: Anthropic HH-RLHF harmless-base
(data/hh-rlhf/), converted and checked by the data doctor as recipes/dpo_any.py does. Every
configuration trains the same `--pairs` pairs (seeded pick) for one epoch at the settings of
recipes/dpo_smollm2_hh.yaml (8 pairs a step, max_length 256, keep_end, fp32, 4-bit NF4 base + LoRA r16 on
every linear layer; the TRL configurations get the same model, LoRA and data), each in a fresh
process whose wall time is the "whole run" (start-up, loading, the reference pass, training) and
whose peak resident memory is its own. The configurations run interleaved, `--rounds` times,
reversing the order every other round, so that load from other processes falls on all of them
alike; the seed loop runs in the first round only (it is the memory baseline, and the slowest).

  1 seed loop          full fine-tuning, a second fp32 copy as reference, chosen and rejected in
                       separate forwards under policy and reference (4 forwards), AdamW
  2 TRL defaults       DPOTrainer(model id, peft_config, 4-bit base), every other DPOConfig field TRL's
  3 TRL + precompute   2 with precompute_ref_log_probs=True: what a user who knows TRL runs; the pairs in
                       memory (Dataset.from_list), so TRL computes the reference pass every run (cold)
  3w TRL, warm         3 with the pairs read as a TRL user reads a file (load_dataset("json", ...)): TRL 1.16
                       keeps its precompute results beside the dataset's cache files and reuses them, filled
                       once before the rounds (its own disk cache: every later run of the same pairs)
  4 recipe, padded     recipes/dpo_any.py with the shipped YAML, packing: false, an empty reference cache
  5 recipe             the shipped YAML as it is (packing, cache, length grouping), an empty cache
  6 recipe, warm cache 5 with the cache filled (every later run, resume or sweep run of the same pairs)
  7 recipe, wider      5 with the step taken as 4 micro-batches of 2 pairs instead of the YAML's 8 of 1
                       (memory against speed; batched into other steps, so its losses are not 5's)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the dpo package of this checkout
from benchmarks.sections import cpu_name, versions, write_section  # noqa: E402

WORKERS = ROOT / "benchmarks" / "training_workers.py"
PROFILER = ROOT / "benchmarks" / "training_profile.py"  # --profile's worker, a process of its own
sys.path.insert(0, str(WORKERS.parent))
from training_profile import PROFILE_SECTION, profile_markdown  # noqa: E402
from training_workers import BATCH, WIDER, shipped  # noqa: E402

MICRO = shipped("per_device_train_batch_size")  # pairs per forward in the recipe

CONFIGS = {
    "seed_loop": "1. seed loop (full FT, fp32 reference copy, 4 forwards)",
    "trl_defaults": "2. TRL defaults (4-bit base + LoRA)",
    "trl_precompute": "3. TRL + precompute_ref_log_probs, cold",
    "trl_precompute_warm": "3w. TRL + precompute_ref_log_probs, warm (its own disk cache)",
    "recipe_padded": "4. recipe, packing off, cold cache",
    "recipe": "5. recipe as shipped, cold cache",
    "recipe_warm": "6. recipe as shipped, warm cache",
    "recipe_wider": f"7. = 5, {BATCH // WIDER} micro-batches of {WIDER} pairs a step",
}
BASELINE = "trl_precompute"  # the informed user: the headline ratio is against this one (cold against cold)
WARM_BASELINE = "trl_precompute_warm"  # and the recipe's warm cache against TRL's warm one
SEED_ROUNDS = 1  # rounds that run the seed loop
MODEL = "smollm2-135m-instruct"
DATA = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SECTION = "## DPO training: speed and memory (`benchmarks/bench_training.py`)"
FULL = dict(pairs=48, max_length=256, rounds=3)
QUICK = dict(pairs=16, max_length=128, rounds=1)
PROFILE = dict(pairs=64, max_length=512, rounds=1)  # --profile's settings (its own section)

# The bar for "the same losses": per-step DPO losses are logged and read to 4 decimals; packing and the
# cache change summation order only, which moves fp32 sums by ~1e-6 relative (tests/train/speed/).
SAME_LOSS = 1e-4


# ── data: the same pairs for every configuration ────────────────────────────────────────────
def prepare_pairs(dataset: str, tokenizer, n: int, max_length: int, seed: int, path: Path) -> tuple[int, dict]:
    """Convert and check every row as recipes/dpo_any.py does (the data doctor); write a seeded pick of `n`
    pairs. Also returns the padding share of the recipe's forward batches (MICRO pairs) over ALL kept pairs:
    random, length-grouped, and the floor inside a pair."""
    from dpo.data.doctor import check_data
    from dpo.data.loading import load_preference_data
    from dpo.train.speed.sampler import PairLengthGroupedSampler, padding_floor, padding_fraction

    rows = load_preference_data(dataset, None, "train")
    report = check_data(rows, dataset, tokenizer, max_length=max_length, truncation_mode=shipped("truncation_mode"))
    kept, lengths = report.kept, report.lengths
    chosen = [min(max_length, int(p + c)) for p, c in zip(lengths["prompt"], lengths["chosen"])]
    rejected = [min(max_length, int(p + r)) for p, r in zip(lengths["prompt"], lengths["rejected"])]
    shuffled = random.Random(seed).sample(range(len(kept)), len(kept))
    grouped = PairLengthGroupedSampler([max(c, r) for c, r in zip(chosen, rejected)], MICRO, seed=seed).order(0)
    padding = {
        "pairs": len(kept),
        "random": padding_fraction(chosen, rejected, shuffled, MICRO),
        "grouped": padding_fraction(chosen, rejected, grouped, MICRO),
        "floor": padding_floor(chosen, rejected),
    }
    from dpo.files import jsonl_text

    rows = [{k: kept[i][k] for k in ("prompt", "chosen", "rejected")} for i in shuffled[:n]]
    Path(path).write_text(jsonl_text(rows, path))
    return min(n, len(kept)), padding


# ── the parent: prepare, run the configurations interleaved, write the table ──────────────────
def run_worker(config: str, args, env: dict | None = None, forks=None) -> dict:
    """One configuration in a fresh process, this one's environment plus `env`; its RESULT plus `whole_s`,
    the process's wall time. With `forks` (--fork_workers: benchmarks/fork_runner.py's ForkServer) the process
    is forked from one that imported the libraries once: `whole_s` then leaves out 6-18 s of imports."""
    script = PROFILER if config == "profile" else WORKERS
    cmd = [str(script), config, "--model", args.model, "--workdir", args.workdir]
    cmd += ["--max_length", str(args.max_length), "--threads", str(args.threads)]
    if forks is not None and env:  # read at process start (allocator, threads): a fork would silently ignore it
        raise ValueError(f"a forked worker cannot take an environment of its own: {sorted(env)}")
    began = time.perf_counter()
    if forks is None:
        proc = subprocess.run(
            [sys.executable, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        status, stdout, stderr = forks.run(cmd)  # this process's environment (an env of its own is refused above)
    whole = time.perf_counter() - began
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if status or not lines:
        sys.exit(f"{config} {env or ''} failed (exit {status}):\n{stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "whole_s": whole}


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize(results: list[dict], pairs: int) -> dict:
    """Per configuration: whole-run seconds of every round and their median, the median reference pass,
    training tokens/s of the median round, the highest peak memory, padding, the losses."""
    out = {}
    for config in CONFIGS:
        runs = [r for r in results if r["config"] == config]
        mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        out[config] = {
            "whole_s": [round(r["whole_s"], 1) for r in runs],
            "whole_median_s": median([r["whole_s"] for r in runs]),
            "reference_s": median([r["reference_s"] for r in runs]),
            "train_s": median([r["seconds"] for r in runs]),
            "tokens_per_s": mid["tokens"] / mid["seconds"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "padding": 1 - mid["tokens"] / mid["padded_tokens"],
            "mean_loss": sum(mid["losses"]) / len(mid["losses"]),
            "losses": mid["losses"],
            "first_margins": [r["first_margin"] for r in runs],  # rewards/margins of step 1, each round
        }
    return out


def round_ratios(results: list[dict], config: str, baseline: str = BASELINE) -> list[float]:
    """baseline's whole-run time over config's, round by round (each pair ran side by side)."""
    by_round: dict[int, dict] = {}
    for r in results:
        by_round.setdefault(r["round"], {})[r["config"]] = r["whole_s"]
    return [times[baseline] / times[config] for times in by_round.values() if config in times and baseline in times]


def largest_loss_difference(summary: dict, a: str, b: str) -> float:
    return max(abs(x - y) for x, y in zip(summary[a]["losses"], summary[b]["losses"], strict=True))


def margins(summary: dict, config: str) -> str:
    return ", ".join(f"{x:+.4f}" for x in summary[config]["first_margins"])


def markdown(summary: dict, results: list[dict], caches: dict, settings: dict, load: tuple, padding: dict) -> str:
    s, base, seed = summary, summary[BASELINE], summary["seed_loop"]
    cache, trl_cache = caches["recipe"], caches["trl"]
    pairs = settings["pairs"]
    cold = round_ratios(results, "recipe")
    warm = round_ratios(results, "recipe_warm", WARM_BASELINE)
    warm_ratio = s[WARM_BASELINE]["whole_median_s"] / s["recipe_warm"]["whole_median_s"]
    rows = [
        SECTION,
        "",
        f"Made by `{settings['command']}`; rewrite this section by running it again.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores ({settings['threads']} torch threads), no GPU; {versions()}.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load[0])}; after: "
        f"{', '.join(f'{x:.2f}' for x in load[1])}. Ratios come from configurations run side by side, interleaved.",
        "",
        f"Work: {pairs} HH-RLHF harmless-base pairs (seeded pick), recipes/dpo_smollm2_hh.yaml's settings ({BATCH} "
        f"pairs a step, max_length {settings['max_length']}, keep_end, fp32, 4-bit base + LoRA r16 on every linear "
        f"layer) for every configuration, one epoch; the recipe takes each step as {BATCH // MICRO} accumulated "
        f"batches of {MICRO} (its YAML), TRL and the seed loop as one batch of {BATCH}. Rounds: {settings['rounds']}, "
        f"interleaved (the seed loop in the first only). Model: {settings['model']}. A whole run is the "
        "process's wall time: start-up, loading, the reference pass, training"
        + (
            " (forked, --fork_workers: without the imports; peak memory includes the forking process's)."
            if "--fork_workers" in settings["command"]
            else "."
        ),
        "",
        f"**Recipe as shipped against TRL + precompute_ref_log_probs, whole run, cold against cold: "
        f"{s[BASELINE]['whole_median_s'] / s['recipe']['whole_median_s']:.2f}x** (5 vs 3, median times; round by round "
        f"{', '.join(f'{x:.2f}x' for x in cold)}); **warm against warm: {warm_ratio:.2f}x** (6, the recipe's reference "
        f"cache, vs 3w, TRL's own disk cache; round by round {', '.join(f'{x:.2f}x' for x in warm)}); against TRL's "
        f"defaults {s['trl_defaults']['whole_median_s'] / s['recipe']['whole_median_s']:.2f}x cold.",
        "",
        "| configuration | whole run (s), by round | median (s) | vs 3 (cold) | reference pass (s) | training tokens/s | "
        "padding | peak memory (GB) | memory vs 1 | mean loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, label in CONFIGS.items():
        c = s[config]
        reference = f"{c['reference_s']:.1f}" if c["reference_s"] >= 0.05 else "-"  # the warm cache: a lookup
        rows.append(
            f"| {label} | {', '.join(f'{x:.1f}' for x in c['whole_s'])} | {c['whole_median_s']:.1f} | "
            f"{base['whole_median_s'] / c['whole_median_s']:.2f}x | {reference} | {c['tokens_per_s']:.0f} | "
            f"{100 * c['padding']:.1f}% | {c['peak_rss_mb'] / 1024:.2f} | {c['peak_rss_mb'] / seed['peak_rss_mb']:.2f}x | "
            f"{c['mean_loss']:.4f} |"
        )
    ours_ref = pairs / s["recipe"]["reference_s"]
    rows += [
        "",
        f"Reference pass (cold): the recipe's cache fill scores {ours_ref:.2f} pairs/s (batched at the eval batch size, "
        f"longest first, packed, under torch.inference_mode), TRL's precompute {pairs / base['reference_s']:.2f} pairs/s "
        f"on the same pairs ({ours_ref * base['reference_s'] / pairs:.2f}x). Filled alone before the rounds (the warm "
        f"caches): the recipe's, {cache['pairs']} pairs in {cache['seconds']:.1f} s; TRL's, {trl_cache['seconds']:.1f} s "
        f"(3w's reference pass: reading it back, {s[WARM_BASELINE]['reference_s']:.2f} s).",
        "",
        f"First step's margin (rewards/margins; the policy is the reference at step 1, so 0 up to rounding, and a "
        f"reference value that is not the model's own moves it), each round: TRL cold (3) {margins(s, BASELINE)}, "
        f"TRL warm (3w) {margins(s, WARM_BASELINE)}; recipe cold (5) {margins(s, 'recipe')}, recipe warm (6) "
        f"{margins(s, 'recipe_warm')}. The recipe checks its cached values against a fresh reference pass on a "
        "sample before training (its parity check); TRL reads its cache as it is.",
        "",
        f"Packing: training tokens/s {s['recipe']['tokens_per_s']:.0f} packed against {s['recipe_padded']['tokens_per_s']:.0f} "
        f"padded ({s['recipe']['tokens_per_s'] / s['recipe_padded']['tokens_per_s']:.2f}x, same batches: 4 vs 5). Over all "
        f"{padding['pairs']} kept pairs of the file (the recipe's batches of {MICRO}, max_length {settings['max_length']}), padding is "
        f"{100 * padding['random']:.1f}% of the batch with random batches, {100 * padding['grouped']:.1f}% length-grouped, "
        f"{100 * padding['floor']:.1f}% the floor no batching removes (each pair's shorter answer padded to its longer "
        "one), and 0.0% packed (the row holds real tokens only).",
        "",
        f"Micro-batches: the shipped {BATCH // MICRO} x {MICRO} pairs a step (5) against {BATCH // WIDER} x {WIDER} (7): peak "
        f"memory {s['recipe']['peak_rss_mb'] / 1024:.2f} against {s['recipe_wider']['peak_rss_mb'] / 1024:.2f} GB "
        f"({s['recipe']['peak_rss_mb'] / s['recipe_wider']['peak_rss_mb']:.2f}x), training tokens/s "
        f"{s['recipe']['tokens_per_s']:.0f} against {s['recipe_wider']['tokens_per_s']:.0f} "
        f"({s['recipe']['tokens_per_s'] / s['recipe_wider']['tokens_per_s']:.2f}x). A micro-batch's activations live until "
        "its backward, and glibc keeps the blocks they freed for the next one: the longest row sets the peak. "
        "7 puts the pairs into other steps (the sampler groups micro-batches), so its losses are its own.",
        "",
        f"Quality: same pairs, same batches, per-step losses: packed against padded (5 vs 4) largest difference "
        f"{largest_loss_difference(s, 'recipe', 'recipe_padded'):.1e}, warm against cold cache (6 vs 5) "
        f"{largest_loss_difference(s, 'recipe_warm', 'recipe'):.1e}, TRL warm against cold (3w vs 3, same batches) "
        f"{largest_loss_difference(s, WARM_BASELINE, BASELINE):.1e} (bar {SAME_LOSS:g}: losses are read to 4 decimals; "
        "summation order moves fp32 sums by ~1e-6 relative). TRL's configurations keep TRL's default learning rate "
        "(1e-6, against the YAML's 5e-4) and batch the pairs in another order, so their losses stay near ln 2 and are "
        "no step-by-step comparison; speed does not depend on either.",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"about 2 minutes: {QUICK}")
    parser.add_argument("--pairs", type=int, help=f"pairs per configuration (default {FULL['pairs']})")
    parser.add_argument("--max_length", type=int, help=f"default {FULL['max_length']}")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {FULL['rounds']})")
    parser.add_argument("--model_name_or_path", dest="model", help=f"default: {MODEL} from python -m dpo.models")
    parser.add_argument("--dataset_name", default=str(DATA))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per configuration")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_training"))
    parser.add_argument("--out", help="Markdown file whose section is rewritten (default: BENCHMARKS.md)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--profile", action="store_true", help="instead: profile the recipe's steps (its own section)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fork_workers",
        action="store_true",
        help="fork each configuration's process from one that imported the libraries once, instead of starting it "
        "fresh (benchmarks/fork_runner.py): a rehearsal 6-18 s a configuration shorter on 2 cores, whose whole-run "
        "times leave out the imports and whose peak memory starts at that process's; the table's command then says "
        "--fork_workers, and --out must be given (never the committed BENCHMARKS.md by default). Not with --profile",
    )
    args = parser.parse_args()
    if args.fork_workers and (args.profile or args.out is None):
        parser.error("--fork_workers is for rehearsals: give --out (not BENCHMARKS.md by default), and not --profile")
    args.out = args.out or str(ROOT / "BENCHMARKS.md")
    for key, value in (QUICK if args.quick else PROFILE if args.profile else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    if not args.fork_workers:
        return run(args)
    from fork_runner import ForkServer

    forks = ForkServer(cwd=os.getcwd())  # relative paths mean what they mean to a fresh worker
    try:
        run(args, forks)
    finally:
        forks.close()


def run(args, forks=None) -> None:
    from dpo.log import log
    from dpo.train.model_checks import load_tokenizer

    if args.model is None:
        from dpo.offline.pip_models import default_cache_dir, materialize

        args.model = str(materialize(MODEL, default_cache_dir(MODEL)))  # built once from the pip GGUF
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = tempfile.mkdtemp(prefix="run-", dir=work)  # a fresh cache and outputs every invocation
    pairs, padding = prepare_pairs(
        args.dataset_name,
        load_tokenizer(args.model),
        args.pairs,
        args.max_length,
        args.seed,
        Path(args.workdir) / "pairs.jsonl",
    )
    if args.profile:
        before = os.getloadavg()
        record = run_worker("profile", args, forks=forks)
        record["load"] = f"{before[0]:.2f} / {os.getloadavg()[0]:.2f}"
        text = profile_markdown(record, args)
        write_section(Path(args.out), text, PROFILE_SECTION)
        return print(text)
    load_before = os.getloadavg()
    cache = run_worker("cache_build", args, forks=forks)  # the warm cache configuration 6 reads
    log(f"reference cache built: {cache['pairs']} pairs in {cache['seconds']:.1f} s")
    trl_cache = run_worker("trl_cache_build", args, forks=forks)  # TRL's own disk cache, which 3w reads
    log(f"TRL's precompute_ref_log_probs cache built: {trl_cache['seconds']:.1f} s")
    results = []
    for round_ in range(args.rounds):
        order = [c for c in CONFIGS if c != "seed_loop" or round_ < SEED_ROUNDS]
        for config in order if round_ % 2 == 0 else reversed(order):
            results.append({**run_worker(config, args, forks=forks), "round": round_})
            r = results[-1]
            log(
                f"round {round_ + 1}, {CONFIGS[config]}: whole run {r['whole_s']:.1f} s (reference "
                f"{r['reference_s']:.1f} s), {r['tokens'] / r['seconds']:.0f} tokens/s, "
                f"{r['peak_rss_mb'] / 1024:.2f} GB peak, mean loss {sum(r['losses']) / len(r['losses']):.4f}"
            )
    summary = summarize(results, pairs)
    command = "python benchmarks/bench_training.py" + (" --quick" if args.quick else "")
    command += " --fork_workers" if forks else ""
    settings = {
        "command": command,
        "model": Path(args.model).name,
        "pairs": pairs,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "threads": args.threads,
    }
    load_after = os.getloadavg()
    caches = {"recipe": cache, "trl": trl_cache}
    text = markdown(summary, results, caches, settings, (load_before, load_after), padding)
    write_section(Path(args.out), text, SECTION)
    if args.json:
        payload = {
            "settings": settings,
            "dataset_padding": padding,
            "versions": versions(),
            "cache_build": cache,
            "trl_cache_build": trl_cache,
            "summary": summary,
            "runs": results,
            "load": [list(load_before), list(load_after)],
        }
        from dpo.files import json_text, write_text_atomic

        write_text_atomic(args.json, json_text(payload, args.json, observations=True, indent=2))
    print(text)


if __name__ == "__main__":
    main()
