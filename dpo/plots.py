"""Pictures people would rather look at than read, one PNG each: training curves from a Trainer's
log history, and the data doctor's length histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend switch, notebooks keep their inline plots

from dpo.files import save_figure

PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("reward margin (chosen - rejected)", ("rewards/margins", "eval_rewards/margins")),
    ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("sequence log-prob", ("logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected")),
)


def plot_training_curves(log_history: list[dict], path: str | Path, title: str = "DPO training") -> Path | None:
    """One panel per metric group, x = optimizer step. Returns the path, or None with nothing logged."""
    if not any("loss" in entry for entry in log_history):
        return None
    fig = Figure(figsize=(4.2 * len(PANELS), 3.4))
    axes = fig.subplots(1, len(PANELS))
    for ax, (label, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(e["step"], e[key]) for e in log_history if key in e]
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs, ys, marker="." if len(xs) < 30 else None, label=key, linestyle="--" if "eval" in key else "-"
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)  # whole or not at all
    return path


def plot_lengths(report, path: str | Path) -> Path:
    """The data doctor's lengths (a dpo.data.doctor_report.DoctorReport): histograms of prompt / chosen /
    rejected lengths and of the full sequence, with max_length marked."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    bins = 40
    for part in ("prompt", "chosen", "rejected"):
        if len(report.lengths[part]):
            left.hist(report.lengths[part], bins=bins, histtype="step", linewidth=1.5, label=part)
    left.set_title(f"parts ({report.unit})", fontsize=10)
    total = report.lengths["prompt"] + np.maximum(report.lengths["chosen"], report.lengths["rejected"])
    if len(total):
        right.hist(total, bins=bins, color="tab:gray")
    if report.max_length is not None and report.unit == "tokens":
        right.axvline(report.max_length, color="tab:red", linestyle="--", label=f"max_length {report.max_length}")
    right.set_title(f"prompt + longer answer ({report.unit})", fontsize=10)
    for ax in (left, right):
        ax.set_ylabel("rows")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{report.source}: {report.rows_kept} pairs kept of {report.rows_in}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)  # whole or not at all
    return path
