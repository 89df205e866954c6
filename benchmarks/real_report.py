"""The report of `make real` (benchmarks/real_alignment.py): the final held-out measurements, real_alignment.md
(tables, five answers side by side) and real_alignment.png (the curve). Written only once the plan finished."""

from __future__ import annotations

import platform

import torch
import transformers
from matplotlib.figure import Figure

from dpo.compat import INSTALLED_TRL

ANCHOR = (
    "SmolLM2-135M-Instruct's own DPO (the SmolLM2 team: UltraFeedback, 2 epochs) reports 61.5% reward accuracy on "
    "its evaluation split: a public anchor on other data, not the same pairs"
)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(final: dict, reference_ranking: float) -> str:
    lo = final["accuracy_ci"][0]
    if lo > reference_ranking and final["accuracy"] >= 0.60:
        return "target met: the 95% interval lies above the reference's own ranking, and accuracy is at least 60%"
    return (
        f"target not met: the interval's lower end {pct(lo)} "
        f"{'lies above' if lo > reference_ranking else 'does not lie above'} the reference's own ranking "
        f"{pct(reference_ranking)}, and accuracy {pct(final['accuracy'])} is {'at least' if final['accuracy'] >= 0.6 else 'below'} 60%"
    )


def plot_curve(main: dict, final: dict, reference_ranking: float, path) -> None:
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    steps = [p["step"] for p in main["curve"]]
    ax.plot(steps, [100 * p["accuracy"] for p in main["curve"]], marker="o", label="validation (chooses the stop)")
    ax.plot(
        steps,
        [100 * p["heldout_accuracy"] for p in main["curve"]],
        marker=".",
        label=f"held-out, first {main['curve'][0]['heldout_n']} pairs",
    )
    lo, hi = final["accuracy_ci"]
    ax.errorbar(
        [main["best"]["step"]],
        [100 * final["accuracy"]],
        yerr=[[100 * (final["accuracy"] - lo)], [100 * (hi - final["accuracy"])]],
        fmt="s",
        color="C3",
        capsize=4,
        label=f"reported: all {final['n']} held-out pairs (95% interval)",
    )
    ax.axhline(50, color="gray", linestyle="--", label="chance")
    ax.axhline(100 * reference_ranking, color="C2", linestyle=":", label="reference's own ranking (held-out)")
    ax.axhline(61.5, color="C4", linestyle="-.", label="SmolLM2 team's DPO, UltraFeedback (other data)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("implicit-reward accuracy (%)")
    ax.set_title("DPO of SmolLM2-135M-Instruct on HH-RLHF harmless-base", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from dpo.files import save_figure

    save_figure(fig, path)  # whole or not at all


def markdown(r: dict) -> str:
    f, a, m = r["final"], r["args"], r["main"]
    lo, hi = f["accuracy_ci"]
    b_lo, b_hi = r["reference_ranking_ci"]
    sizes = r["split"]["sizes"]
    ci = lambda t, d=4, s="+": f"{t[0]:{s}.{d}f} | [{t[1]:{s}.{d}f}, {t[2]:{s}.{d}f}]"  # noqa: E731
    lines = [
        "# Real alignment: DPO of SmolLM2-135M-Instruct on Anthropic HH-RLHF (harmless-base)",
        "",
        "> Content warning: the prompts and answers below come from a red-teaming data set and may be upsetting.",
        "",
        f"Command: `{r['command']}`  ",
        f"Wall time: {r['wall_h']:.1f} h of running on {r['machine']}, {r['threads']} torch threads (the plan may have "
        "been resumed; each run's time is summed).  ",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {INSTALLED_TRL}, "
        f"python {platform.python_version()}.",
        "",
        f"**{verdict(f, r['reference_ranking'])}.**",
        "",
        f"Data: {r['split']['doctor']}; one seeded shuffle (seed {a['seed']}) into {sizes['heldout']} held-out, "
        f"{sizes['validation']} validation and {sizes['train']} training pairs. Held-out rows sha256 "
        f"`{r['split']['rows_sha256']['heldout']}`. max_length {a['max_length']} (replies <= {a['max_length'] // 2} "
        "tokens, prompts keep their last turns).",
        "",
        f"Plan: SFT on the chosen replies {a['sft_steps']} steps (lr {a['sft_lr']:g}; 0 = none); learning rate and beta "
        f"chosen on the validation slice from lr {a['grid_lr']} x beta {a['grid_beta']}, {a['select_steps']} steps each: "
        f"**lr {m['lr']:g}, beta {m['beta']:g}**; main run {m['steps']} steps of {a['batch_size']} pairs ({m['stopped']}); "
        f"reported weights: step {m['best']['step']}, the best validation point. LoRA r {a['lora_r']} on every linear layer.",
        "",
        f"## Held-out: {f['n']} pairs never trained on, never used for a choice",
        "",
        "| | value | 95% interval |",
        "|---|---|---|",
        f"| implicit-reward accuracy | **{pct(f['accuracy'])}** | [{pct(lo)}, {pct(hi)}] |",
        f"| reference's own ranking (log pi_ref(chosen) > log pi_ref(rejected)) | {pct(r['reference_ranking'])} | [{pct(b_lo)}, {pct(b_hi)}] |",
    ]
    if r.get("base_ranking") is not None:
        lines.append(f"| SmolLM2-135M-Instruct's own ranking, before SFT | {pct(r['base_ranking'])} | |")
    lines += [
        "| public anchor: " + ANCHOR + " | 61.5% | |",
        "| chance | 50.0% | |",
        f"| mean reward margin beta*(log-ratio chosen - rejected) | {ci(f['margin'])} |",
        f"| held-out DPO loss (ln 2 = 0.6931 at the start) | {ci(f['loss'], s='')} |",
        f"| log-prob displacement of chosen (nats) | {ci(f['chosen_displacement'], 2)} |",
        f"| log-prob displacement of rejected (nats) | {ci(f['rejected_displacement'], 2)} |",
        f"| per-token KL(pi \\|\\| pi_ref) on held-out chosen replies, {r['kl_pairs']} pairs (nats) | {ci(r['kl'], s='')} |",
        f"| greedy answer length, reference -> policy, {len(r['lengths'])} prompts (tokens) | {r['length_ref']:.1f} -> {r['length_policy']:.1f} | |",
        "",
        "Learning rate x beta on the validation slice (accuracy after the short run):",
        "",
        "| lr | beta | validation accuracy | log-ratio margin |",
        "|---|---|---|---|",
        *(
            f"| {c['lr']:g} | {c['beta']:g} | {pct(c['end']['accuracy'])} | {c['end']['logratio_margin']:+.3f} |"
            for c in r["select"]["grid"]
        ),
        "",
        "Main run (`real_alignment.png`):",
        "",
        "| step | validation accuracy | held-out accuracy (plot only) | training loss since the last point |",
        "|---|---|---|---|",
        *(
            f"| {p['step']} | {pct(p['accuracy'])} | {pct(p['heldout_accuracy'])} | "
            + (f"{p['train_loss']:.3f}" if p["train_loss"] is not None else "-")
            + " |"
            for p in m["curve"]
        ),
        "",
        "## Five held-out prompts, greedy answers side by side",
        "",
    ]
    for s in r["samples"]:
        lines += [
            f"**Prompt** (last turn): {s['prompt']}",
            "",
            f"- reference: {s['reference']}",
            f"- policy: {s['policy']}",
            "",
        ]
    return "\n".join(lines) + "\n"
