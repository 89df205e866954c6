"""Phase 4 of the controlled-sentiment experiment (dpo/offline/sentiment.py has the task and phases 1-2):
ground-truth reward and KL of pi_theta against pi_ref on held-out prompts, the report
(metrics.json, report.md), and the before/after summary `make demo` prints.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from dpo.files import json_text, write_text_atomic
from dpo.offline.sentiment import decode, n_words, reward, sample, well_formed
from dpo.scratch.logps import completion_logps
from dpo.train.adapters import as_reference


# ── phase 4: evaluation ─────────────────────────────────────────────────────────────────────
def score(tokenizer, completions) -> dict:
    """Mean ground-truth reward, length (words) and well-formed share of sampled completions."""
    texts = [decode(tokenizer, c) for c in completions]
    rewards = [reward(t) for t in texts]
    return {
        "texts": texts,
        "reward": sum(rewards) / len(rewards),
        "length": sum(map(n_words, texts)) / len(texts),  # words, to catch length exploitation
        "well_formed": sum(map(well_formed, texts)) / len(texts),
    }


def sample_and_score(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> dict:
    return score(tokenizer, sample(model, tokenizer, prompts, max_new_tokens, seed)[1])


def evaluate_alignment(
    policy, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, reference: bool = True
) -> dict:
    """Ground-truth reward of pi_ref and pi_theta on `prompts`, and a Monte-Carlo KL(pi_theta || pi_ref).

    `policy` is the trained PeftModel; pi_ref is the same model as DPO's reference: adapters
    disabled, or the frozen SFT adapter when DPO started from one (dpo.train.adapters.as_reference). KL is estimated from samples y ~ pi_theta:
    KL = E[log pi_theta(y|x) - log pi_ref(y|x)], reported with its standard error.
    Both models sample with the same seed, so where they agree they write the same review.
    `reference=False` skips sampling pi_ref (its reward does not change during training).
    """
    pad = tokenizer.eos_token_id
    if reference:
        with as_reference(policy):
            _, ref_completions = sample(policy, tokenizer, prompts, max_new_tokens, seed)
    prompt_ids, pol_completions = sample(policy, tokenizer, prompts, max_new_tokens, seed)
    logp_policy = completion_logps(policy, prompt_ids, pol_completions, pad)
    with as_reference(policy):
        logp_ref = completion_logps(policy, prompt_ids, pol_completions, pad)
    log_ratio = (logp_policy - logp_ref).double()
    pol = score(tokenizer, pol_completions)
    metrics = {
        "policy_reward": pol["reward"],
        "policy_length": pol["length"],
        "policy_well_formed": pol["well_formed"],
        "kl": log_ratio.mean().item(),
        "kl_stderr": (log_ratio.std() / math.sqrt(len(log_ratio))).item(),
        "eval_prompts": len(prompts),
    }
    if not reference:
        return {"metrics": metrics, "samples": []}
    ref = score(tokenizer, ref_completions)
    metrics.update(
        reference_reward=ref["reward"], reference_length=ref["length"], reference_well_formed=ref["well_formed"]
    )
    samples = [
        {"prompt": p, "reference": r, "reference_reward": reward(r), "policy": q, "policy_reward": reward(q)}
        for p, r, q in zip(prompts, ref["texts"], pol["texts"])
    ]
    return {"metrics": metrics, "samples": samples}


class PhaseClock:
    """Wall-clock seconds per phase: `clock.lap("sft")` closes the phase that just ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self._last = round(now - self._last, 2), now


# ── the report ──────────────────────────────────────────────────────────────────────────────
REPORT_FILES = ("metrics.json", "report.md")  # write_report's, beside the run's own files


def drop_report(output_dir) -> list[str]:
    """Once a run's new files are in place: the report of the run they replaced is removed, so that a failure
    before the new one is written leaves no report rather than the old numbers beside the new adapter. Returns
    the names removed (files only: a link is removed as a link)."""
    gone = [n for n in REPORT_FILES if (Path(output_dir) / n).is_file() or (Path(output_dir) / n).is_symlink()]
    for name in gone:
        (Path(output_dir) / name).unlink()
    return gone


def write_report(output_dir, metrics: dict, samples: list[dict], settings: dict, n_samples: int = 8) -> Path:
    """metrics.json and report.md (before/after table, sample completions) in `output_dir`, each whole or absent."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_text = json_text(metrics, output_dir / "metrics.json", observations=True, indent=2, sort_keys=True)
    write_text_atomic(output_dir / "metrics.json", metrics_text + "\n")
    m = metrics
    lines = [
        "# DPO controlled-sentiment demo (the DPO paper's IMDb experiment in miniature)",
        "",
        f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}.",
        f"Evaluated on {m['eval_prompts']} prompts about topics never seen in a preference pair.",
        "Reward: net positive-word rate in [-1, 1]; a well-formed review tops out at 0.5.",
        "",
        "| | pi_ref (SFT, 4-bit, adapters off) | pi_theta (after DPO) |",
        "|---|---|---|",
        f"| mean ground-truth reward | {m['reference_reward']:.3f} | {m['policy_reward']:.3f} |",
        f"| KL(pi_theta \\|\\| pi_ref), nats per completion | 0 | {m['kl']:.3f} ± {m['kl_stderr']:.3f} |",
        f"| mean completion length, words | {m['reference_length']:.2f} | {m['policy_length']:.2f} |",
        f"| well-formed completions | {m['reference_well_formed']:.1%} | {m['policy_well_formed']:.1%} |",
        f"| implicit-reward accuracy, held-out pairs | - | {m['heldout_reward_accuracy']:.1%} |",
        "",
        f"Preference pairs: {m['train_pairs']} for training, {m['heldout_pairs']} held out "
        f"({m['train_ties']} tied samples dropped). SFT reference reward before 4-bit loading: "
        f"{m['sft_fp32_reward']:.3f}.",
        "",
        "## Samples (same held-out prompts; reward in brackets)",
        "",
        "| prompt | pi_ref | pi_theta |",
        "|---|---|---|",
    ]
    for s in samples[:n_samples]:
        lines.append(
            f"| {s['prompt']} | {s['reference'].strip()} ({s['reference_reward']:+.2f}) "
            f"| {s['policy'].strip()} ({s['policy_reward']:+.2f}) |"
        )
    lines += ["", "Training curves: training_curves.png. Every setting of the run: resolved_config.yaml.", ""]
    return write_text_atomic(output_dir / "report.md", "\n".join(lines))


def summary(m: dict, seconds: float) -> str:
    """The before/after, as a few aligned lines."""
    rows = [
        (
            "mean ground-truth reward",
            f"{m['reference_reward']:+.3f}",
            f"{m['policy_reward']:+.3f}",
            "net positive-word rate; 0.5 = every adjective positive",
        ),
        ("KL(pi_theta || pi_ref)", "0", f"{m['kl']:.2f} nats", f"per completion, Monte Carlo, +-{m['kl_stderr']:.2f}"),
        (
            "well-formed reviews",
            f"{m['reference_well_formed']:.0%}",
            f"{m['policy_well_formed']:.0%}",
            "the SFT corpus's grammar",
        ),
        (
            "mean length (words)",
            f"{m['reference_length']:.2f}",
            f"{m['policy_length']:.2f}",
            "a jump here would mean length exploitation",
        ),
    ]
    lines = [
        "",
        "DPO demo: controlled sentiment (the DPO paper's IMDb experiment in miniature)",
        f"{m['eval_prompts']} held-out prompts, topics never seen in a preference pair",
        "",
        f"  {'':26s}{'pi_ref':>10s}   {'pi_theta':>12s}",
    ]
    lines += [f"  {name:26s}{before:>10s} ->{after:>12s}   {note}" for name, before, after, note in rows]
    lines += [
        f"  {'implicit-reward accuracy':26s}{'':>10s}   {m['heldout_reward_accuracy']:>12.1%}   on {m['heldout_pairs']} held-out pairs",
        "",
        f"  report: {m['report']}  ({seconds:.0f} s end to end)",
        "",
    ]
    return "\n".join(lines)
