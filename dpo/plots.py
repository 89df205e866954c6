"""Training curves from a Trainer's log history, as one PNG people can glance at."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # drawn without pyplot: no global backend switch, so

# notebooks keep their inline plots

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
    fig.savefig(path, dpi=110)
    return path
