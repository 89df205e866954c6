"""BENCHMARKS.md's GPU section, from the results.json that benchmarks/bench_gpu.py writes.

    python benchmarks/gpu_section.py RESULTS.json                  # print it
    python benchmarks/gpu_section.py RESULTS.json --out BENCHMARKS.md   # replace (or add) the section there

A run cut short still gives a section: whatever was measured, and the phases that are missing named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sections import write_section  # noqa: E402

SECTION = "## GPU: the phi-2 recipe at phi-2 size (`benchmarks/bench_gpu.py`)"
LABELS = {
    "t4_fp32": "T4 setting (fp32 compute, 4-bit base)",
    "fp16": "fp16 mixed precision",
    "bf16": "bf16 mixed precision",
}
SPEED = {
    "trl_defaults": "TRL defaults (4-bit base + LoRA, bf16)",
    "trl_precompute": "TRL + precompute_ref_log_probs",
    "recipe_plain": "recipe, cache and grouping off",
    "recipe_both": "recipe (cache + grouping), = the bf16 cell",
    "recipe_liger": "recipe + use_liger_kernel",
}


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _finite(r: dict) -> str:
    losses = r.get("losses", [])
    bad = [g for g in r.get("grad_norms", []) if g is None or g != g or abs(g) == float("inf")]
    if r["status"] != "ok":
        return f"**{r['status']}**"
    if any(x != x or abs(x) == float("inf") for x in losses):
        return "**no: a loss**"
    return "yes" if not bad else f"losses yes; {len(bad)} step(s) skipped by the fp16 scaler"


def cell_row(label: str, r: dict) -> str:
    return (
        f"| {label} | {r['length']} | {_num(r.get('peak_allocated_gib'), '.2f')} | {_num(r.get('peak_reserved_gib'), '.2f')} "
        f"| {_num(r.get('tokens_per_s'), '.0f')} | {_num(r.get('model_tflops'), '.1f')} | "
        f"{_num(r.get('mfu') and 100 * r['mfu'], '.1f')}% | {r.get('steps', 0)} | {_finite(r)} |"
    )


def markdown(data: dict, command: str) -> str:
    env, runs, s = data.get("env", {}), data.get("runs", {}), data.get("settings", {})
    lines = [SECTION, "", f"Made by `{command}` ({s.get('scale', '?')} scale); rewrite it by running that again."]
    lines.append(
        f"Device: {env.get('device', '?')} ({env.get('capability', '?')}, {_num(env.get('memory_gib'), '.0f')} GiB); "
        f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, trl {env.get('trl')}, peft {env.get('peft')}, accelerate {env.get('accelerate')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, datasets {env.get('datasets')}. Matmuls measured there: bf16 "
        f"{_num(env.get('matmul_tflops_bfloat16'), '.0f')} TFLOP/s, fp32 {_num(env.get('matmul_tflops_float32'), '.0f')} "
        f"TFLOP/s (TF32 {'on' if env.get('tf32_matmul') else 'off'})."
    )
    lines += [
        "",
        "The model has microsoft/phi-2's exact architecture with **random weights** (no download is possible there); "
        "no real T4 was used. Each run is the phi-2 recipe's code path (recipes/dpo_phi2.yaml: 4-bit NF4 base, "
        f"LoRA r16, activation checkpointing, batch 2, reference cache, length grouping), one batch per step, "
        f"{s.get('steps')} steps, the first {s.get('warmup')} untimed; synthetic truthy-shaped pairs (chosen fills "
        "max_length, rejected about 3/4). Tokens/s counts non-padding tokens. MFU: model FLOPs (policy forward + "
        "input-gradient backward + the reference forward when not cached; benchmarks/gpu_flops.py) over the "
        "datasheet dense peak of the precision the matmuls run in.",
        "",
        "| precision | tokens | peak allocated (GiB) | peak reserved (GiB) | tokens/s | model TFLOP/s | MFU | steps | finite |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, label in LABELS.items():
        for length in s.get("lengths", []):
            r = runs.get(f"{precision}_{length}")
            lines.append(cell_row(label, r) if r else f"| {label} | {length} | not run | | | | | | |")
    budget = data.get("t4_budget")
    lines += ["", "**T4 budget** (the T4 setting at the longest length, under a 15 GiB per-process cap):"]
    if budget:
        for name in budget["attempts"]:
            r = runs[name]
            peak = r.get("peak_allocated_gib")
            fits = r["status"] == "ok" and peak is not None and peak < budget["target_gib"]
            extra = {k: v for k, v in r["settings"].items() if k not in ("bf16", "fp16", "dtype")}
            if peak is None:
                lines.append(f"- {r['name']}: {r['status']}; no CUDA, so no GPU memory was measured")
                continue
            lines.append(
                f"- {'recipe defaults' if not extra else extra}: {r['status']}, peak {_num(peak, '.2f')} GiB allocated / "
                f"{_num(r.get('peak_reserved_gib'), '.2f')} GiB reserved: "
                + (
                    f"**below {budget['target_gib']:.0f} GiB**"
                    if fits
                    else f"**not below {budget['target_gib']:.0f} GiB**"
                )
            )
    else:
        lines.append("- not run")
    curve = data.get("fp16_curve")
    lines += ["", "**fp16 verdict** (fp16 mixed precision, the longest length, LoRA weights kept in fp32):"]
    if curve:
        nonfinite = curve["first_nonfinite_step"]
        lines.append(
            f"- {curve['steps_run']} steps: "
            + (f"**non-finite at step {nonfinite}**" if nonfinite else "every loss finite")
            + f"; {curve['skipped_steps']} step(s) skipped by the gradient scaler; final loss scale "
            f"{_num(curve['final_loss_scale'], 'g')}"
        )
        lines.append(
            f"- against the T4 setting (fp32) over the first {curve['compared_steps']} steps of the same schedule: "
            f"largest |loss difference| {_num(curve['max_abs_loss_gap'], '.2e')}, mean {_num(curve['mean_abs_loss_gap'], '.2e')} "
            f"(the fp32 loss moved {_num(curve['fp32_loss_change'], '.3f')} over those steps)"
        )
    else:
        lines.append("- not run")
    lines += [
        "",
        "**Speed against TRL** (bf16, the GPU's own precision, the longest length, same pairs and batch):",
        "",
    ]
    lines += [
        "| configuration | tokens/s | vs TRL defaults | peak allocated (GiB) | mean loss |",
        "|---|---|---|---|---|",
    ]
    longest = max(s.get("lengths", [0]))
    base = runs.get("trl_defaults", {}).get("tokens_per_s")
    for key, label in SPEED.items():
        r = runs.get(f"bf16_{longest}" if key == "recipe_both" else key)
        if not r:
            continue
        speed, losses = r.get("tokens_per_s"), r.get("losses") or [None]
        ratio = f"{speed / base:.2f}x" if speed and base else "-"
        mean = sum(losses) / len(losses) if losses[0] is not None else None
        lines.append(
            f"| {label} | {_num(speed, '.0f')} | {ratio} | {_num(r.get('peak_allocated_gib'), '.2f')} | {_num(mean, '.4f')} |"
        )
    fused = {name: r.get("fused_lm_head") for name, r in runs.items() if r.get("fused_lm_head") is not None}
    if fused:
        ran = sorted(name for name, on in fused.items() if on)
        vocab, pairs = data.get("shape", {}).get("vocab"), 2  # one batch of 2 pairs per step (bench_gpu.py)
        avoided = 2 * pairs * longest * vocab * 4 / 2**30 if vocab else None  # chosen + rejected rows, fp32 logits
        lines.append(
            f"\nTRL's fused LM head (log-probs without full logits): on in {len(ran)} of {len(fused)} runs"
            + (f" (off in: {', '.join(sorted(set(fused) - set(ran)))})" if len(ran) < len(fused) else "")
            + (
                f". What it saves is computed, not measured (TRL has no switch to turn it off): the full fp32 logits "
                f"of a step at {longest} tokens, 2 pairs x 2 sequences x {longest} x {vocab} x 4 B = {avoided:.2f} GiB, "
                "and their log-softmax copy, are never built."
                if avoided
                else "."
            )
        )
    if "liger" in data:
        lines.append(f"\nLiger: {data['liger']}.")
    missing = [p for p in s.get("phases", []) if p not in ("env",) and p not in data and p not in ("cells", "speed")]
    if missing:
        lines.append(f"\nPhases with no result (cut short?): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.json written by benchmarks/bench_gpu.py")
    parser.add_argument("--out", help="Markdown file whose GPU section is replaced (default: print)")
    parser.add_argument("--command", default="make gpu", help="the command the section names")
    args = parser.parse_args(argv)
    text = markdown(json.loads(Path(args.results).read_text()), args.command)
    if args.out:
        write_section(Path(args.out), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
