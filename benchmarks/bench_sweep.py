"""A beta sweep end to end, with and without the reference log-prob cache (dpo/train/speed/refcache.py).

    python benchmarks/bench_sweep.py                 # BENCHMARKS.md's sweep section (~10 min on 2 CPU cores)
    python benchmarks/bench_sweep.py --rounds 1      # half the time, one sweep each

Each sweep is `python benchmarks/frontier_sentiment.py --loss_types sigmoid --betas ...` in a fresh
process with a fresh work folder (its own pi_ref, pairs and, with the cache, an empty cache that
its first run fills and the other runs read), timed from start to exit. The two settings run
interleaved (cache, inline, inline, cache, ...) so that load from other processes falls on both.
Quality: each sweep's frontier.csv is compared point by point (reward and KL of every scored step).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_training import cpu_name, versions  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402

SECTION = "## A beta sweep with and without the reference cache (`benchmarks/bench_sweep.py`)"
SETTINGS = {"cache": "true", "inline": "false"}  # --reference_cache


def run_sweep(setting: str, args, folder: Path) -> tuple[float, list[dict]]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frontier_sentiment.py"), "--loss_types", *args.loss_types]
    cmd += ["--betas", *map(str, args.betas), "--out", str(folder / "out"), "--workdir", str(folder / "work")]
    cmd += ["--reference_cache", SETTINGS[setting]]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode:
        sys.exit(f"sweep ({setting}) failed, exit {proc.returncode}:\n{proc.stderr[-4000:]}")
    with open(folder / "out" / "frontier.csv") as f:
        return seconds, list(csv.DictReader(f))


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """Largest |difference| of policy reward or KL over the points both sweeps scored."""
    assert [(r["loss_type"], r["beta"], r["step"]) for r in a] == [(r["loss_type"], r["beta"], r["step"]) for r in b]
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in ("policy_reward", "kl"))


def markdown(times: dict, diff: float, args, load: tuple) -> str:
    cache, inline = (sorted(times[s]) for s in ("cache", "inline"))
    ratio = statistics.median(inline) / statistics.median(cache)
    runs = len(args.loss_types) * len(args.betas)
    return "\n".join(
        [
            SECTION,
            "",
            f"Made by `python benchmarks/bench_sweep.py{' --rounds ' + str(args.rounds) if args.rounds != 2 else ''}`; "
            "rewrite this section by running it again.",
            f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores; {versions()}. Load average (1 min) before / after: "
            f"{load[0]:.2f} / {load[1]:.2f}.",
            "",
            f"One sweep = `benchmarks/frontier_sentiment.py --loss_types {' '.join(args.loss_types)} --betas "
            f"{' '.join(map(str, args.betas))}`: pi_ref SFT, sampled pairs, then {runs} DPO runs of the recipe's "
            "settings scored along the way, end to end in a fresh process and work folder. The two settings ran "
            f"interleaved, {args.rounds} sweep(s) each.",
            "",
            "| reference log-probs | sweep wall time (s), each run | median (s) |",
            "|---|---|---|",
            f"| inline, every step (`--reference_cache false`, TRL's way) | {', '.join(f'{x:.0f}' for x in inline)} | "
            f"{statistics.median(inline):.0f} |",
            f"| cached: computed by the first run, read by the other {runs - 1} | "
            f"{', '.join(f'{x:.0f}' for x in cache)} | {statistics.median(cache):.0f} |",
            "",
            f"**The cached sweep is {ratio:.2f}x as fast end to end.** Same results: the largest difference in "
            f"reward or KL at any scored point of the two settings' last sweeps is {diff:.1e}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="sweeps per setting, interleaved")
    parser.add_argument("--loss_types", nargs="+", default=["sigmoid"])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_sweep"))
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file whose section is rewritten")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()[0]
    times, results = {"cache": [], "inline": []}, {}
    for round_ in range(args.rounds):
        for setting in ("cache", "inline") if round_ % 2 == 0 else ("inline", "cache"):
            seconds, rows = run_sweep(setting, args, Path(tempfile.mkdtemp(prefix=f"{setting}-", dir=args.workdir)))
            times[setting].append(seconds)
            results[setting] = rows
            print(f"round {round_ + 1}, {setting}: {seconds:.0f} s", flush=True)
    text = markdown(times, largest_difference(results["cache"], results["inline"]), args, (before, os.getloadavg()[0]))
    write_section(Path(args.out), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
