"""BENCHMARKS.md's GPU section, from the results folder that benchmarks/gpu_run.py fills.

    python benchmarks/gpu_section.py RESULTS.json                  # print it
    python benchmarks/gpu_section.py RESULTS.json --out BENCHMARKS.md --command "..."   # replace (or add) it there

Beside results.json it reads, when they are there: every pytest*.log (the summary line and the failed tests of
each `pytest -m gpu`) and notes.md (what whoever ran it adds by hand: what a failure was, what was rerun),
and it links the folder's raw files. A run cut short still gives a section: whatever was measured, and the
phases that are missing named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sections import write_section  # noqa: E402

SECTION = "## GPU: the phi-2 recipe at phi-2 size (`benchmarks/bench_gpu.py`)"
FP32 = "fp32 compute (T4 default before this run)"  # bench_gpu's t4_fp32 setting; a T4 now gets fp16
LABELS = {
    "t4_fp32": FP32,
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


def pytest_result(log: Path) -> str:
    """A pytest log's summary line ("1 failed, 9 passed in 87.12s"), with the failed tests named."""
    text = log.read_text(errors="replace")
    sums = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped)\b.*?) in [\d.]+s", text, re.M)
    failed = re.findall(r"^(?:FAILED|ERROR) \S+::(\S+)", text, re.M)
    result = sums[-1] if sums else "no summary line (cut short?)"
    return result + (f" ({', '.join(dict.fromkeys(failed))})" if failed else "")


def run_lines(folder: Path | None, base: Path | None) -> list[str]:
    """The raw files (linked from `base`, the folder of the Markdown file), each pytest -m gpu's result,
    and the folder's notes.md, when the results folder is known."""
    if folder is None or not folder.is_dir():
        return []

    def link(name: str) -> str:
        target = folder / name
        return f"[{name}]({os.path.relpath(target, base) if base else name})"

    raw = sorted(p.name for p in folder.iterdir() if p.is_file())
    lines = ["", "Raw output, as the run wrote it: " + ", ".join(link(n) for n in raw) + "."]
    logs = sorted(folder.glob("pytest*.log"), key=lambda p: (p.name != "pytest.log", p.name))
    if logs:
        lines.append("`pytest -m gpu`: " + "; ".join(f"{link(p.name)}: {pytest_result(p)}" for p in logs) + ".")
    notes = folder / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return lines


def learning_rate(r: dict, source: str) -> float | None:
    """The run's learning rate: recorded by bench_gpu.py, or (older results) what its configuration takes:
    TRL's DPOConfig default for TRL's runs, recipes/dpo_phi2.yaml's for the recipe's."""
    if r.get("learning_rate") is not None:
        return r["learning_rate"]
    if source == "trl":
        import dataclasses

        from dpo.compat import DPOConfig

        return next(f.default for f in dataclasses.fields(DPOConfig) if f.name == "learning_rate")
    import yaml

    return yaml.safe_load((ROOT / "recipes" / "dpo_phi2.yaml").read_text()).get("learning_rate")


def budget_lines(data: dict, runs: dict, longest: int) -> list[str]:
    budget = data.get("t4_budget")
    lines = [
        "",
        f"**T4 budget** ({longest} tokens, the recipe's defaults but for precision, under a 15 GiB per-process cap):",
    ]
    if not budget:
        return lines + ["- not run"]
    for name in budget["attempts"]:
        r = runs[name]
        peak = r.get("peak_allocated_gib")
        fits = r["status"] == "ok" and peak is not None and peak < budget["target_gib"]
        extra = {k: v for k, v in r["settings"].items() if k not in ("bf16", "fp16", "dtype")}
        if peak is None:
            lines.append(f"- {r['name']}: {r['status']}; no CUDA, so no GPU memory was measured")
            continue
        verdict = "below" if fits else "not below"
        lines.append(
            f"- {extra or 'recipe defaults'}, {FP32}: {r['status']}, peak {_num(peak, '.2f')} GiB allocated / "
            f"{_num(r.get('peak_reserved_gib'), '.2f')} GiB reserved: **{verdict} {budget['target_gib']:.0f} GiB**"
        )
    fp16 = runs.get(f"fp16_{longest}")
    if fp16 and fp16.get("peak_allocated_gib") is not None:
        cap = f"under the {fp16['cap_gib']:.0f} GiB cap" if fp16.get("cap_gib") else "uncapped"
        lines.append(
            f"- fp16 mixed precision (the T4 default since this run, dpo/train/hardware.py) at {longest} tokens, {cap}: "
            f"{fp16['status']}, peak {fp16['peak_allocated_gib']:.2f} GiB allocated / "
            f"{_num(fp16.get('peak_reserved_gib'), '.2f')} GiB reserved"
        )
    return lines


def curve_lines(curve: dict | None) -> list[str]:
    lines = ["", "**fp16 verdict** (fp16 mixed precision, the longest length, LoRA weights kept in fp32):"]
    if not curve:
        return lines + ["- not run"]
    nonfinite = curve["first_nonfinite_step"]
    return lines + [
        f"- {curve['steps_run']} steps: "
        + (f"**non-finite at step {nonfinite}**" if nonfinite else "every loss finite")
        + f"; {curve['skipped_steps']} step(s) skipped by the gradient scaler; final loss scale "
        f"{_num(curve['final_loss_scale'], 'g')}",
        f"- against fp32 compute over the first {curve['compared_steps']} steps of the same schedule: "
        f"largest |loss difference| {_num(curve['max_abs_loss_gap'], '.2e')}, mean "
        f"{_num(curve['mean_abs_loss_gap'], '.2e')} (the fp32 loss moved {_num(curve['fp32_loss_change'], '.3f')} "
        "over those steps)",
    ]


def speed_lines(runs: dict, longest: int) -> list[str]:
    lines = [
        "",
        f"**Speed against TRL** (bf16, the GPU's own precision, {longest} tokens, same pairs and batch; per training "
        "step, so TRL's precompute pass and the recipe's cache fill, both before the first step, are not in it):",
        "",
        "| configuration | tokens/s | vs TRL defaults | vs TRL + precompute | peak allocated (GiB) |",
        "|---|---|---|---|---|",
    ]
    base, informed = (runs.get(k, {}).get("tokens_per_s") for k in ("trl_defaults", "trl_precompute"))
    for key, label in SPEED.items():
        r = runs.get(f"bf16_{longest}" if key == "recipe_both" else key)
        if not r:
            continue
        speed = r.get("tokens_per_s")
        ratios = [f"{speed / ref:.2f}x" if speed and ref else "-" for ref in (base, informed)]
        lines.append(
            f"| {label} | {_num(speed, '.0f')} | {' | '.join(ratios)} | {_num(r.get('peak_allocated_gib'), '.2f')} |"
        )
    recipe, trl = runs.get(f"bf16_{longest}"), runs.get("trl_precompute")
    if recipe and trl and recipe.get("tokens_per_s") and trl.get("tokens_per_s") and base:
        ratio = recipe["tokens_per_s"] / trl["tokens_per_s"]
        lines += [
            "",
            f"**Finding**: per step at {longest} tokens in bf16, the recipe (cache + grouping) ran "
            f"{recipe['tokens_per_s']:.0f} tokens/s against TRL + precompute_ref_log_probs {trl['tokens_per_s']:.0f} "
            f"({ratio:.2f}x) and TRL defaults {base:.0f} ({recipe['tokens_per_s'] / base:.2f}x); peak allocated "
            f"memory {_num(recipe.get('peak_allocated_gib'), '.2f')} vs {_num(trl.get('peak_allocated_gib'), '.2f')} GiB. "
            + (
                "On this GPU the recipe is **not** faster per step than an informed TRL user; the speed claims of the "
                "CPU sections above stand as CPU claims only. Why is not measured yet: the runs differ in more than "
                "the cache (TRL's are built as `trl dpo --load_in_4bit` builds them, benchmarks/training_workers.py, "
                "model loaded in float32 under bf16 autocast; the recipe's load it in bfloat16), and no profile of "
                "either step on the GPU has been taken."
                if ratio < 1
                else "On this GPU the recipe is faster per step than an informed TRL user as well."
            ),
        ]
    trl_defaults = runs.get("trl_defaults")
    if recipe and trl_defaults:
        lr_trl, lr_recipe = learning_rate(trl_defaults, "trl"), learning_rate(recipe, "recipe")
        lines.append(
            f"\nLosses are not compared here: TRL's runs train at TRL's default learning rate ({_num(lr_trl, 'g')}), "
            f"the recipe's at recipes/dpo_phi2.yaml's ({_num(lr_recipe, 'g')}), so their loss curves differ by "
            "design; the learning rate does not change the work of a step."
        )
    return lines


def markdown(data: dict, command: str, folder: Path | None = None, base: Path | None = None) -> str:
    """The section. `folder`: the results folder (its pytest logs, notes.md and raw files are named and
    linked from `base`, the folder of the Markdown file; None: links are file names)."""
    env, runs, s = data.get("env", {}), data.get("runs", {}), data.get("settings", {})
    lines = [SECTION, "", f"The run: `{command}` ({s.get('scale', '?')} scale), on a CUDA machine without network."]
    lines.append(
        f"Device: {env.get('device', '?')} ({env.get('capability', '?')}, {_num(env.get('memory_gib'), '.0f')} GiB); "
        f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, trl {env.get('trl')}, peft {env.get('peft')}, accelerate {env.get('accelerate')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, datasets {env.get('datasets')}. Matmuls measured there: bf16 "
        f"{_num(env.get('matmul_tflops_bfloat16'), '.0f')} TFLOP/s, fp32 {_num(env.get('matmul_tflops_float32'), '.0f')} "
        f"TFLOP/s (TF32 {'on' if env.get('tf32_matmul') else 'off'})."
    )
    lines += run_lines(folder, base)
    lines += [
        "",
        "The model has microsoft/phi-2's exact architecture with **random weights** (no download is possible there); "
        "no real T4 was used: the T4 budget is an H200 under a 15 GiB memory cap. Each run is the phi-2 recipe's code "
        "path (recipes/dpo_phi2.yaml: 4-bit NF4 base, LoRA r16, activation checkpointing, batch 2, reference cache, "
        f"length grouping), one batch per step, {s.get('steps')} steps, the first {s.get('warmup')} untimed; "
        "synthetic truthy-shaped pairs (chosen fills max_length, rejected about 3/4). Tokens/s counts non-padding "
        "tokens. MFU: model FLOPs (policy forward + input-gradient backward + the reference forward when not cached; "
        "benchmarks/gpu_flops.py) over the datasheet dense peak of the precision the matmuls run in.",
        "",
        "| precision | tokens | peak allocated (GiB) | peak reserved (GiB) | tokens/s | model TFLOP/s | MFU | steps | finite |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, label in LABELS.items():
        for length in s.get("lengths", []):
            r = runs.get(f"{precision}_{length}")
            lines.append(cell_row(label, r) if r else f"| {label} | {length} | not run | | | | | | |")
    longest = max(s.get("lengths", [0]))
    lines += budget_lines(data, runs, longest)
    lines += curve_lines(data.get("fp16_curve"))
    lines += speed_lines(runs, longest)
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
    if "liger" in data:  # runs before bench_gpu read the version from the package metadata wrote "liger-kernel ?"
        liger = data["liger"].replace("liger-kernel ?", f"liger-kernel {env.get('liger-kernel', '?')}")
        lines.append(f"\nLiger: {liger}.")
    if "rounds" not in data:
        lines.append(
            "\nThe rounds recipe's generation speed: not measured in this run (bench_gpu.py had no rounds phase)."
        )
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
    results = Path(args.results).resolve()
    base = Path(args.out).resolve().parent if args.out else Path.cwd()
    text = markdown(json.loads(results.read_text()), args.command, results.parent, base)
    if args.out:
        write_section(Path(args.out), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
