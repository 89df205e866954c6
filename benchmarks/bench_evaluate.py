"""Time `python -m dpo.evaluate` per prompt on a real SmolLM2-135M-Instruct run, as it is now and as it was before:
its four generations (greedy and sampled answers of pi_theta and pi_ref) in one decode loop or three, and its
log-probabilities (held-out pairs, sampled answers for the KL) with each prompt fed once per model for all its answers
or each row fed whole; write the BENCHMARKS.md section.

    python benchmarks/bench_evaluate.py                                  # ~5-10 min on 2 cores; rewrites BENCHMARKS.md
    python benchmarks/bench_evaluate.py --rounds 1 --out /tmp/BENCHMARKS.md

The run evaluated is made here first: one DPO step of the recipe on 16 real HH-RLHF pairs (data/hh-rlhf/), 4 held
out. Each measurement is evaluate() in this process on the same run (the 4-bit base dequantized once on a CPU, every
path), the paths (CONFIGS) interleaved, `--rounds` times. They must give the same answers, greedy and sampled, so the
same accuracy and lengths (`agree`); the margin and KL differ in float32 summation order only (bounded per row by
tests/evaluation/test_scoring.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sections import cpu_name, versions, write_section  # noqa: E402

SECTION = "## `python -m dpo.evaluate` per prompt (`benchmarks/bench_evaluate.py`)"
HH = ROOT / "data" / "hh-rlhf"


def make_run(folder: Path) -> Path:
    """A finished SmolLM2 DPO run (one step) to evaluate, on 16 real HH pairs."""
    from datasets import load_dataset

    from dpo.files import jsonl_text
    from dpo.offline.pip_models import default_cache_dir, materialize

    model = materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))
    files = sorted(str(p) for p in HH.glob("*.jsonl*"))
    rows = load_dataset("json", data_files=files, split="train").select(range(16))
    data = folder / "pairs.jsonl"
    data.write_text(jsonl_text([{k: r[k] for k in ("chosen", "rejected")} for r in rows], data))
    out = folder / "run"
    argv = ["--config", str(ROOT / "recipes" / "dpo_smollm2_hh.yaml"), "--model_name_or_path", str(model)]
    argv += ["--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "1", "--test_size", "0.25"]
    argv += ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--reference_cache", "false"]
    argv += ["--warmup_steps", "0", "--save_strategy", "no", "--eval_strategy", "no", "--max_length", "128"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dpo_any.py"), *argv], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"the run to evaluate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


# name -> evaluate()'s switches: the decode loops, and whether a prompt's answers share its forward
CONFIGS = {
    "3 loops, rows whole": {"one_loop": False, "shared_prompts": False},  # before the work
    "1 loop, rows whole": {"one_loop": True, "shared_prompts": False},
    "1 loop, prompts shared": {"one_loop": True, "shared_prompts": True},  # now
}
BEFORE, NOW = "3 loops, rows whole", "1 loop, prompts shared"


def agree(a: dict, b: dict) -> bool:
    """The same answers give the same accuracy and lengths, exactly. The margin and KL are not compared here: the
    shared-prompt log-probs differ from whole-row ones in float32 summation order only, which
    tests/evaluation/test_scoring.py bounds row by row (the table shows both)."""
    exact = [k for k in a if k.endswith(("accuracy", "_length_policy", "_length_reference", "length_ratio"))]
    return bool(exact) and all(a[k] == b[k] for k in exact)


def timed(run: Path, switches: dict, prompts: int, tokens: int) -> tuple[float, dict]:
    from dpo.evaluation.evaluate import evaluate

    began = time.perf_counter()
    metrics = evaluate(run, num_prompts=prompts, max_new_tokens=tokens, batch_size=8, seed=0, **switches)
    wall = time.perf_counter() - began
    answers = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    return wall, metrics, answers


def markdown(seconds: dict, metrics: dict, prompts: int, tokens: int, rounds: int) -> str:
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = [a / b for a, b in zip(seconds[BEFORE], seconds[NOW])]
    lines = [
        SECTION,
        "",
        f"Made by `python benchmarks/bench_evaluate.py --rounds {rounds}`; this section is its output. Machine: "
        f"{cpu_name()}, {os.cpu_count()} cores; {versions()}.",
        "",
        f"SmolLM2-135M-Instruct after one DPO step on real HH-RLHF pairs (4-bit NF4 base + LoRA r16), "
        f"`evaluate(num_prompts={prompts}, max_new_tokens={tokens})`: the implicit rewards on the held-out pairs, "
        "greedy and sampled answers of pi_theta and pi_ref, and the KL, all in one process after loading. "
        "The 4-bit base is dequantized once (dpo/train/speed/dequant.py). Decode loops: the four generations in "
        "three (the greedy answers of both models in one, a sampled loop per model; each prompt fed 4 times) or in "
        "one, each prompt fed once per model (dpo/evaluation/answers.py; the same answers token for token). "
        "Log-probabilities: each row fed whole, prompt and answer, in padded batches, or each prompt fed once per "
        "model with its answers (chosen, rejected, sampled) over its KV cache (dpo/evaluation/scoring.py; the same "
        "values up to float32 summation order). Interleaved, one after the other, each round.",
        "",
        "| | per prompt (s), median | whole evaluation (s), each round | held-out accuracy | margin | KL |",
        "|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        each = ", ".join(f"{s:.1f}" for s in seconds[name])
        m = metrics[name]
        lines.append(
            f"| {name} | {med[name] / prompts:.2f} | {each} | {m['reward_accuracy']:.3f} | "
            f"{m['reward_margin']:.5f} | {m['kl']:.4f} |"
        )
    lines += ["", f"Now ({NOW}) against before ({BEFORE}): **{statistics.median(ratio):.1f}x** faster (rounds: "]
    lines[-1] += ", ".join(f"{r:.1f}x" for r in ratio) + ")."
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        run = make_run(Path(tmp))
        seconds, metrics, answers = {name: [] for name in CONFIGS}, {}, {}
        for _ in range(args.rounds):
            for name, switches in CONFIGS.items():
                wall, metrics[name], answers[name] = timed(run, switches, args.prompts, args.max_new_tokens)
                seconds[name].append(wall)
    if any(answers[name] != answers[NOW] for name in CONFIGS):  # greedy and sampled: the same answers
        sys.exit(f"the paths answer differently: {answers}")
    if not all(agree(metrics[name], metrics[NOW]) for name in CONFIGS):
        sys.exit(f"the paths disagree: {metrics}")
    text = markdown(seconds, metrics, args.prompts, args.max_new_tokens, args.rounds)
    write_section(Path(args.out), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
