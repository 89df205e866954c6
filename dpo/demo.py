"""`make demo`: watch DPO align a model and measure that it did. No GPU, no internet, well under
2 minutes on 2 CPU cores (BENCHMARKS.md).

    python -m dpo.demo                          # = python recipes/dpo_sentiment_tiny.py
    python -m dpo.demo --beta 0.5               # any recipe setting can be overridden

Runs recipes/dpo_sentiment_tiny.py with its YAML: the DPO paper's controlled-sentiment
experiment in miniature (SFT a tiny Phi model -> sample and label preference pairs -> QLoRA
DPO through the phi-2 recipe's code path -> evaluate on held-out prompts), then prints the
before/after and where the report is (outputs/sentiment_tiny/report.md).
"""

import os
import sys
import time
import warnings

# Everything is built locally: never reach for the Hub, and keep the output to what matters.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()  # dataset .map() bars: a few thousand rows, instant
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not for this audience
    from dpo.config import load_recipe

    metrics = load_recipe("dpo_sentiment_tiny").main(list(sys.argv[1:] if argv is None else argv))
    print(summary(metrics, time.time() - start), flush=True)
    return metrics


if __name__ == "__main__":
    main()
