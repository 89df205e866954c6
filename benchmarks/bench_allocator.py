"""Peak memory against speed under glibc's allocator settings: the shipped recipe with a warm reference
cache (configuration 6 of bench_training.py), each setting in a fresh process, interleaved.

    python benchmarks/bench_allocator.py            # its BENCHMARKS.md section (about 10 min on 2 CPU cores)
    python benchmarks/bench_allocator.py --rounds 2 # more rounds, the order reversed every other one

Why: part of the recipe's peak resident memory is freed memory glibc keeps for reuse. This asks whether any
allocator setting gives that memory back without the speed: each row is the same code on the same pairs;
only the environment differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the dpo package of this checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_training import DATA, FULL, MODEL, cpu_name, prepare_pairs, run_worker, versions  # noqa: E402
from sections import write_section  # noqa: E402

SECTION = "## glibc allocator settings: peak memory against speed (`benchmarks/bench_allocator.py`)"
MIB = 2**20
# Setting any of glibc's thresholds by hand turns its dynamic mmap threshold off (mallopt(3)); the default
# threshold starts at 128 KiB and rises, up to 32 MiB, to the size of the largest block freed so far.
SETTINGS = {
    "glibc defaults (as shipped)": {},
    "MALLOC_MMAP_THRESHOLD_=16 MiB": {"MALLOC_MMAP_THRESHOLD_": str(16 * MIB)},
    "MALLOC_MMAP_THRESHOLD_=4 MiB": {"MALLOC_MMAP_THRESHOLD_": str(4 * MIB)},
    "MALLOC_ARENA_MAX=1, MALLOC_TRIM_THRESHOLD_=64 MiB": {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_TRIM_THRESHOLD_": str(64 * MIB),
    },
}


def markdown(runs: list[dict], settings: dict) -> str:
    """One row per setting: median training tokens/s and the highest peak over its rounds, both against
    the defaults' row."""
    rows = {}
    for r in runs:
        rows.setdefault(r["setting"], []).append(r)
    summary = {}
    for name, rs in rows.items():
        speeds = sorted(r["tokens"] / r["seconds"] for r in rs)
        summary[name] = (speeds[len(speeds) // 2], max(r["peak_rss_mb"] for r in rs), rs[0]["losses"])
    base_speed, base_peak, base_losses = summary[next(iter(SETTINGS))]
    out = [
        SECTION,
        "",
        f"Made by `python benchmarks/bench_allocator.py --rounds {settings['rounds']}`; rewrite this section by running it again.",
        f"Machine: {settings['cpu']}, {os.cpu_count()} CPU cores ({settings['threads']} torch threads), no GPU; {settings['versions']}.",
        f"Work: configuration 6 of the training table (the shipped recipe, warm reference cache) on {settings['pairs']} "
        f"HH-RLHF pairs, max_length {settings['max_length']}; each setting a fresh process, {settings['rounds']} "
        "interleaved round(s); only the environment differs.",
        "",
        "| glibc setting | training tokens/s | speed vs defaults | peak memory (GB) | memory vs defaults | same losses |",
        "|---|---|---|---|---|---|",
    ]
    for name, (speed, peak, losses) in summary.items():
        out.append(
            f"| {name} | {speed:.0f} | {speed / base_speed:.2f}x | {peak / 1024:.2f} | {peak / base_peak:.2f}x | "
            f"{'yes' if losses == base_losses else 'NO'} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=FULL["pairs"])
    parser.add_argument("--max_length", type=int, default=FULL["max_length"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model_name_or_path", dest="model", help=f"default: {MODEL} from python -m dpo.models")
    parser.add_argument("--dataset_name", default=str(DATA))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_allocator"))
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file whose section is rewritten")
    parser.add_argument("--json", help="also write the runs here")
    args = parser.parse_args()

    from dpo.log import log
    from dpo.train.model_checks import load_tokenizer

    if args.model is None:
        from dpo.offline.pip_models import default_cache_dir, materialize

        args.model = str(materialize(MODEL, default_cache_dir(MODEL)))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    args.workdir = tempfile.mkdtemp(prefix="run-", dir=args.workdir)
    pairs, _ = prepare_pairs(
        args.dataset_name,
        load_tokenizer(args.model),
        args.pairs,
        args.max_length,
        0,
        Path(args.workdir) / "pairs.jsonl",
    )
    run_worker("cache_build", args)  # the warm cache every setting reads
    runs = []
    for round_ in range(args.rounds):
        order = list(SETTINGS.items())
        for name, env in order if round_ % 2 == 0 else reversed(order):
            runs.append({**run_worker("recipe_warm", args, env), "setting": name, "round": round_})
            r = runs[-1]
            log(
                f"round {round_ + 1}, {name}: {r['tokens'] / r['seconds']:.0f} tokens/s, {r['peak_rss_mb'] / 1024:.2f} GB peak"
            )
    settings = {
        "rounds": args.rounds,
        "pairs": pairs,
        "max_length": args.max_length,
        "threads": args.threads,
        "cpu": cpu_name(),
        "versions": versions(),
    }
    text = markdown(runs, settings)
    write_section(Path(args.out), text, SECTION)
    if args.json:
        from dpo.files import json_text, write_text_atomic

        result = {"settings": settings, "runs": runs}
        write_text_atomic(args.json, json_text(result, args.json, observations=True, indent=2))
    print(text)


if __name__ == "__main__":
    main()
