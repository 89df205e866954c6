"""BENCHMARKS.md's GPU step-profile section and README's GPU line, from benchmarks/gpu_profile.py's profile.json.

    python benchmarks/profile_section.py PROFILE.json                      # print the section and the README line
    python benchmarks/profile_section.py PROFILE.json --out BENCHMARKS.md  # replace (or add) the section there

Every number is a median over the cell's runs, with the spread (min-max over runs) where a ranking rests on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.kernel_classes import CLASSES  # noqa: E402
from benchmarks.phase_clock import PHASES  # noqa: E402
from dpo.errors import exit_on_user_error  # noqa: E402

SECTION = "## GPU step profile (`benchmarks/gpu_profile.py`)"
BASELINE = "trl_precompute"
ANCHOR = "gpu-step-profile-benchmarksgpu_profilepy"  # GitHub's id of SECTION


def _n(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _spread(s: dict | None, fmt: str = ".0f") -> str:
    if not s:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def _cells(data: dict, size: str) -> list[tuple[str, dict]]:
    cells = data.get("cells", {})
    return [(key.split("@")[0], cells[key]) for key in cells if key.endswith("@" + size) and cells[key].get("runs")]


def config_table(data: dict) -> list[str]:
    support, lines = data.get("support", {}), ["| configuration | what | runs here |", "|---|---|---|"]
    for name, cfg in data.get("configs", {}).items():
        why = support.get(name)
        lines.append(f"| `{name}` | {cfg['what']} | {'skipped: ' + why if why else 'yes'} |")
    for change, why in data.get("settings", {}).get("not_separable", {}).items():
        lines.append(f"| - | {change} | not measured on its own: {why} |")
    return lines


def speed_table(data: dict, size: str) -> list[str]:
    rows = _cells(data, size)
    base = dict(rows).get(BASELINE, {}).get("tokens_per_s")
    lines = [
        "| configuration | runs | pairs per micro-batch x accumulation | tokens/s median (min-max) | vs TRL + precompute "
        "| step s | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in rows:
        ratio = f"{c['tokens_per_s']['median'] / base['median']:.2f}x" if base else "-"
        mfu = "-" if c.get("mfu") is None else f"{100 * c['mfu']:.1f}% of {c['peak_tflops']:.0f} TFLOP/s"
        lines.append(
            f"| `{name}` | {c['runs']} | {c.get('micro_batch')} x {c.get('accumulation')} | {_spread(c['tokens_per_s'])} "
            f"| {ratio} | {_spread(c['step_s'], '.3f')} | {_n(c.get('peak_allocated_gib'), '.1f')} | {mfu} |"
        )
    return lines


def phase_table(data: dict, size: str) -> list[str]:
    lines = ["| configuration | " + " | ".join(PHASES) + " | step |", "|---" * (len(PHASES) + 2) + "|"]
    for name, c in _cells(data, size):
        ms = [f"{1000 * c['phases_s'][p]['median']:.1f}" for p in PHASES]
        lines.append(f"| `{name}` | " + " | ".join(ms) + f" | {1000 * c['step_s']['median']:.1f} |")
    return lines


def kernel_table(data: dict, size: str) -> list[str]:
    head = "| configuration | " + " | ".join(CLASSES) + " | busy % | launches/step | syncs/step |"
    lines = [head, "|---" * (len(CLASSES) + 4) + "|"]
    for name, c in _cells(data, size):
        p = c["profile"]
        ms = [f"{p['kernel_ms_per_step'][k]:.1f}" for k in CLASSES]
        lines.append(
            f"| `{name}` | " + " | ".join(ms) + f" | {_n(p.get('busy_pct'), '.0f')} | {p['launches_per_step']:.0f} "
            f"| {p['syncs_per_step']:.0f} |"
        )
    return lines


def target_table(data: dict, size: str) -> list[str]:
    """Issue 38's targets against the medians: recipe >= 1.1x and `auto` under the T4 cap >= 1.5x TRL + precompute at
    the T4 setting; uncapped `auto` >= 4x the recipe's T4-setting tokens/s, at >= 25% bf16 MFU."""
    cells = dict(_cells(data, size))

    def ratio(name: str, over: str):
        a, b = cells.get(name), cells.get(over)
        return a["tokens_per_s"]["median"] / b["tokens_per_s"]["median"] if a and b else None

    auto = cells.get("recipe_auto") or {}
    rows = [
        ("recipe / TRL + precompute, T4 setting", ratio("recipe", BASELINE), 1.1, "x"),
        ("`auto` under 15 GiB / TRL + precompute at the T4 setting", ratio("recipe_auto_t4", BASELINE), 1.5, "x"),
        ("`auto` uncapped / the recipe at the T4 setting", ratio("recipe_auto", "recipe"), 4.0, "x"),
        ("`auto` uncapped, bf16 MFU", auto.get("mfu") and 100 * auto["mfu"], 25.0, "%"),
    ]
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for what, value, goal, unit in rows:
        met = "-" if value is None else "yes" if value >= goal else "**no**"
        lines.append(f"| {what} | {_n(value, '.2f')}{unit if value is not None else ''} | >= {goal:g}{unit} | {met} |")
    return lines


def generation_line(data: dict) -> str:
    runs = [r for r in data.get("runs", []) if r["config"] == "generation" and r["status"] == "ok"]
    if not runs:
        return "The rounds recipe's batched generation: not measured in this run."
    g = runs[-1]
    return (
        f"The rounds recipe's sampler ({g['sequences']} sequences): batched {g['batched_tokens_per_second']:.0f} "
        f"tokens/s, one prompt at a time {g['one_at_a_time_tokens_per_second']:.0f} tokens/s ({g['speedup']:.1f}x)."
    )


def readme_line(data: dict) -> str:
    """README's GPU speed row (its Results table): the recipe against TRL + precompute at 1024 tokens, the T4
    setting, as the section's medians (each number of the row is in the section it links to)."""
    cells = dict(_cells(data, "1024"))
    base, recipe, auto = cells.get(BASELINE), cells.get("recipe"), cells.get("recipe_auto")
    device = data.get("env", {}).get("device", "the GPU")
    model = "phi-2 size (random weights)" if data.get("settings", {}).get("scale") == "phi2" else "the tiny phi"
    if not (base and recipe):
        return f"GPU ({device}): the step profile did not measure both the recipe and TRL + precompute."
    ratio = recipe["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
    what = (
        f"GPU ({device}, {model}, 1024 tokens, 2 pairs per micro-batch): recipe vs TRL + `precompute_ref_log_probs`, "
        f"tokens/s, medians of {min(recipe['runs'], base['runs'])} interleaved runs"
    )
    value = f"{ratio:.2f}x ({recipe['tokens_per_s']['median']:.0f} vs {base['tokens_per_s']['median']:.0f})"
    if auto:
        value += f"; `auto`: {auto['tokens_per_s']['median']:.0f}"
    return f"| {what} | [{value}](BENCHMARKS.md#{ANCHOR}) | `make gpu` |"


def markdown(data: dict) -> str:
    s = data.get("settings", {})
    out = [
        SECTION,
        "",
        f"Scale {s.get('scale')}: {s.get('runs')} runs per cell, interleaved, each a process of its own; "
        f"{s.get('warmup')} warm-up steps, {s.get('timed')} timed steps ({s.get('auto_timed')} for `auto`), "
        f"{s.get('profiled')} under torch.profiler. Times by phase with CUDA events (perf_counter on a CPU).",
        "",
        *config_table(data),
    ]
    for size in dict.fromkeys(size for _, size in s.get("cells", [])):
        if size == "any":
            continue
        out += ["", f"### {size}", "", *speed_table(data, size), "", *target_table(data, size)]
        out += ["", "Milliseconds per step by phase (medians):", ""]
        out += phase_table(data, size) + ["", "Kernel milliseconds per profiled step by class:", ""]
        out += kernel_table(data, size)
    skipped = [r for r in data.get("runs", []) if r["status"] != "ok"]
    if skipped:
        out += [
            "",
            "Not measured: "
            + "; ".join(
                f"`{r['config']}` at {r['size']} run {r['run'] + 1}: {r['status']} ({r.get('reason') or r.get('error')})"
                for r in skipped
            )
            + ".",
        ]
    out += ["", generation_line(data), "", "README's row (its Results table):", "", readme_line(data)]
    return "\n".join(out) + "\n"


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--out", help="a Markdown file whose section to replace (or add)")
    args = parser.parse_args(argv)
    from dpo.files import read_json_object

    data = read_json_object(
        args.results, {"settings": (dict, None), "runs": (list, dict)}, "pass gpu_profile.py's profile.json", ("runs",)
    )
    text = markdown(data)
    if args.out:
        from benchmarks.sections import write_section

        write_section(Path(args.out), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
