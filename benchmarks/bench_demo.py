"""Time `make demo` end to end and by phase; write the results to BENCHMARKS.md.

    python benchmarks/bench_demo.py                      # 3 runs (~2-4 min); rewrites BENCHMARKS.md
    python benchmarks/bench_demo.py --runs 1 --out /tmp/BENCHMARKS.md

`make demo` runs `python recipes/dpo_sentiment_tiny.py` once the virtual environment exists; that command is what
is timed, as a fresh process each run (interpreter start and imports included). The phases come
from the `seconds` the recipe writes to metrics.json; "start-up" is the rest (Python, imports,
config). The demo is seeded, so the runs must also agree on every metric: checked and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sections import write_section  # noqa: E402

SECTION = "## `make demo` (`python recipes/dpo_sentiment_tiny.py`), end to end"
PHASES = ("sft", "pairs", "dpo", "evaluate")
RESULT_KEYS = (
    "reference_reward",
    "policy_reward",
    "kl",
    "heldout_reward_accuracy",
    "reference_well_formed",
    "policy_well_formed",
    "reference_length",
    "policy_length",
)


def run_demo(output_dir: Path) -> tuple[float, dict]:
    """One `python recipes/dpo_sentiment_tiny.py` (`make demo`) in a fresh process; returns (wall seconds, its metrics.json)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "recipes/dpo_sentiment_tiny.py", "--output_dir", str(output_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads((output_dir / "metrics.json").read_text())


def markdown(walls: list[float], runs: list[dict], load_before: tuple, load_after: tuple) -> str:
    m = runs[0]
    same = all({k: r[k] for k in RESULT_KEYS} == {k: m[k] for k in RESULT_KEYS} for r in runs)
    agreement = (
        "one run"
        if len(runs) == 1
        else f"identical in all {len(runs)} runs: it is seeded"
        if same
        else "RUNS DISAGREE"
    )
    lines = [
        SECTION,
        "",
        f"Made by `python benchmarks/bench_demo.py --runs {len(runs)}`; this section is its output. Each run is a fresh",
        "process (interpreter start and imports included) after the environment is installed, as `make demo`",
        "runs it. Phases are the recipe's own timers (metrics.json `seconds`); start-up is the remainder.",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU used; "
        f"Python {platform.python_version()}, torch {torch.__version__}. Load average (1, 5, 15 min) "
        f"before: {', '.join(f'{x:.2f}' for x in load_before)}; after: {', '.join(f'{x:.2f}' for x in load_after)}. "
        "Other processes shared the cores, so treat single timings as noisy.",
        "",
        "| run | end to end (s) | start-up (s) | 1. SFT pi_ref (s) | 2. pairs (s) | 3. QLoRA DPO (s) | 4. evaluate (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (wall, r) in enumerate(zip(walls, runs), start=1):
        s = r["seconds"]
        lines.append(
            f"| {i} | {wall:.1f} | {wall - sum(s[p] for p in PHASES):.1f} | "
            + " | ".join(f"{s[p]:.1f}" for p in PHASES)
            + " |"
        )
    med = lambda xs: statistics.median(xs)  # noqa: E731
    lines.append(
        f"| median | {med(walls):.1f} | {med([w - sum(r['seconds'][p] for p in PHASES) for w, r in zip(walls, runs)]):.1f} | "
        + " | ".join(f"{med([r['seconds'][p] for r in runs]):.1f}" for p in PHASES)
        + " |"
    )
    lines += [
        "",
        f"What the demo measured ({agreement}):",
        "",
        "| | pi_ref | pi_theta (after DPO) |",
        "|---|---|---|",
        f"| mean ground-truth reward (held-out prompts) | {m['reference_reward']:+.3f} | {m['policy_reward']:+.3f} |",
        f"| KL(pi_theta \\|\\| pi_ref), nats per completion | 0 | {m['kl']:.3f} ± {m['kl_stderr']:.3f} |",
        f"| implicit-reward accuracy, {m['heldout_pairs']} held-out pairs | - | {m['heldout_reward_accuracy']:.1%} |",
        f"| well-formed completions | {m['reference_well_formed']:.1%} | {m['policy_well_formed']:.1%} |",
        f"| mean completion length, words | {m['reference_length']:.2f} | {m['policy_length']:.2f} |",
        "",
        f"{m['train_pairs']} training pairs, {m['dpo_steps']} DPO steps (loss {'+'.join(m['loss_type'])}, beta {m['beta']}).",
        "The reward-KL frontier over beta and loss types: benchmarks/README.md.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "bench_demo"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    walls, runs = [], []
    for i in range(args.runs):
        wall, metrics = run_demo(Path(args.workdir) / f"run{i + 1}")
        walls.append(wall)
        runs.append(metrics)
        print(f"run {i + 1}: {wall:.1f} s end to end; phases {metrics['seconds']}", flush=True)
    write_section(Path(args.out), markdown(walls, runs, load_before, os.getloadavg()), SECTION)
    print(f"median {statistics.median(walls):.1f} s; written to {args.out}")


if __name__ == "__main__":
    main()
