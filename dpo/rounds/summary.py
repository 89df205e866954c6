"""The run's summary, rebuilt from the rounds' own round.json files after every round:

rounds.json   the settings, the starting model's held-out reward, and every round's numbers
rounds.md     the same as a table
rounds.png    held-out reward against KL to the starting model, round by round, with 95% intervals
"""

from __future__ import annotations

from pathlib import Path

from dpo.files import numbered_folders, read_json_object, save_figure, write_text_atomic
from dpo.train.safety.checkpoints import write_json_atomic

HELDOUT_SHAPE = {k: (float, None) for k in ("reward", "reward_low", "reward_high", "kl", "kl_low", "kl_high")}
ROUND_SHAPE = {
    "round": (int, None),
    "samples": (dict, None),
    "pairs": (dict, int),
    "train_pairs": (int, None),
    "heldout_pairs": (int, None),
    "heldout": (dict, None),
    "seconds": (dict, float),
    "reference": (str, None),
}
SUMMARY_SHAPE = {"settings": (dict, None), "initial": (dict, None), "rounds": (list, dict)}


def read_summary(output_dir: Path) -> dict | None:
    """rounds.json, verified; None when the folder has none yet."""
    path = Path(output_dir) / "rounds.json"
    if not path.is_file():
        return None
    return read_json_object(path, SUMMARY_SHAPE, f"delete {path}: it is rebuilt from the rounds' own files")


# The settings a folder's rounds ran with, written before round 1 starts and kept whatever happens to
# rounds.json (rebuilt from the rounds' own files when deleted): a rerun is compared with it even when it
# was stopped inside round 1, before rounds.json existed.
SETTINGS_RECORD = "rounds_settings.json"
RECORD_SHAPE = {"settings": (dict, None), "training": (dict, None)}


def read_settings_record(output_dir: Path) -> dict | None:
    """rounds_settings.json, verified; None when the folder has none."""
    path = Path(output_dir) / SETTINGS_RECORD
    if not path.exists():
        return None
    fix = f"it records the settings of the rounds in {output_dir}; use another output_dir"
    return read_json_object(path, RECORD_SHAPE, fix)


def write_settings_record(output_dir: Path, header: dict) -> None:
    write_json_atomic(Path(output_dir) / SETTINGS_RECORD, {k: header[k] for k in RECORD_SHAPE})


def finished_rounds(output_dir: Path) -> list[int]:
    """The numbers of the rounds whose round.json exists (each written last, when its round finished)."""
    return numbered_folders(output_dir, "round-", "round.json")


def _interval(m: dict, key: str, fmt: str) -> str:
    return f"{m[key]:{fmt}} [{m[key + '_low']:{fmt}}, {m[key + '_high']:{fmt}}]"


def markdown(header: dict, records: list[dict]) -> str:
    k = header["settings"]["samples_per_prompt"]
    initial = header["initial"]
    lines = [
        "# On-policy DPO in rounds (recipes/dpo_rounds.py)",
        "",
        f"Reward: {header['settings']['reward']}; pairing {header['settings']['pairing']}, reference "
        f"{header['settings']['reference']}, K = {k}, keep_pairs {header['settings']['keep_pairs']}.",
        f"Held-out prompts: {initial['n']}; the starting model's held-out reward {_interval(initial, 'reward', '+.3f')}.",
        "Intervals are 95% (mean +- 1.96 standard errors). KL is to the starting model, nats per answer (Monte Carlo).",
        "",
        f"| round | sampled reward (mean / best-of-{k}) | pairs kept / dropped (ties, near-ties, same text) | trained on | "
        "held-out reward | KL to start | implicit-reward accuracy | seconds (sample, score, pair, train, evaluate) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p, s, t = r["pairs"], r["samples"], r["seconds"]
        accuracy = r.get("implicit_reward_accuracy")
        phases = ", ".join(f"{t.get(name, 0):.0f}" for name in ("sample", "score", "pair", "train", "evaluate"))
        lines.append(
            f"| {r['round']} | {s['mean_reward']:+.3f} / {s['best_of_k']:+.3f} | {p['kept']} / {p['dropped']} "
            f"({p['tie']}, {p['near_tie']}, {p['same_text']}) | {r['train_pairs']} pairs | "
            f"{_interval(r['heldout'], 'reward', '+.3f')} | {_interval(r['heldout'], 'kl', '.2f')} | "
            f"{'-' if accuracy is None else f'{accuracy:.1%}'} on {r['heldout_pairs']} | {phases} |"
        )
    return "\n".join(lines) + "\n"


def plot(header: dict, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [{"round": 0, "heldout": header["initial"]}, *records]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [p["heldout"]["kl"] for p in points]
    ys = [p["heldout"]["reward"] for p in points]
    xerr = [
        [p["heldout"]["kl"] - p["heldout"]["kl_low"] for p in points],
        [p["heldout"]["kl_high"] - p["heldout"]["kl"] for p in points],
    ]
    yerr = [
        [p["heldout"]["reward"] - p["heldout"]["reward_low"] for p in points],
        [p["heldout"]["reward_high"] - p["heldout"]["reward"] for p in points],
    ]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f" {p['round']}", (x, y), fontsize=9)
    ax.set_xlabel("KL(pi || pi_start), nats per answer")
    ax.set_ylabel("held-out reward")
    ax.set_title(f"DPO in rounds (reference: {header['settings']['reference']}); 0 = the starting model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)  # whole or not at all
    plt.close(fig)


def write_summary(output_dir: Path, header: dict, records: list[dict]) -> dict:
    """rounds.json, rounds.md and rounds.png from `header` (settings, initial) and the rounds' records."""
    summary = {**header, "rounds": records}
    write_json_atomic(Path(output_dir) / "rounds.json", summary)
    write_text_atomic(Path(output_dir) / "rounds.md", markdown(header, records))
    plot(header, records, Path(output_dir) / "rounds.png")
    return summary
