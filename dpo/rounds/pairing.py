"""Pairs from scored samples: per prompt, the best answer against the worst (max_min) or against a random
lower-scored one (max_random), as in RLHFlow's Online-RLHF.

A prompt gives no pair when every answer has the same reward (a tie: OpenRLHF paired a text with itself
there), when the margin chosen - rejected is below `min_margin` (a near tie: the reward cannot tell them
apart), or when the two texts are the same string (two samples can coincide; a pair of one text with
itself trains nothing). Each dropped prompt is counted by its reason.
"""

from __future__ import annotations

import random

RULES = ("max_min", "max_random")
DROP_REASONS = ("tie", "near_tie", "same_text")


def pick_pair(answers: list[str], rewards: list[float], rule: str, min_margin: float, rng: random.Random):
    """(chosen index, rejected index, None) or (None, None, reason). Among equal rewards the first answer wins."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    lower = [i for i in range(len(rewards)) if rewards[i] < rewards[best]]
    if not lower:
        return None, None, "tie"
    if rule == "max_min":
        worst = min(lower, key=lambda i: (rewards[i], i))
    elif rule == "max_random":
        worst = rng.choice(lower)
    else:
        raise ValueError(f"pairing rule {rule!r} is not one of {RULES}")
    if rewards[best] - rewards[worst] < min_margin:
        return None, None, "near_tie"
    if answers[best] == answers[worst]:
        return None, None, "same_text"
    return best, worst, None


def make_pairs(samples: list[dict], rule: str, min_margin: float, seed: int) -> tuple[list[dict], dict]:
    """DPO rows {prompt, chosen, rejected, chosen_reward, rejected_reward} from samples rows
    {prompt, answers: [{text, reward}]}, and the counts {kept, dropped, tie, near_tie, same_text}."""
    rng = random.Random(seed)
    pairs, counts = [], {"kept": 0, "dropped": 0, **dict.fromkeys(DROP_REASONS, 0)}
    for row in samples:
        texts = [a["text"] for a in row["answers"]]
        rewards = [a["reward"] for a in row["answers"]]
        best, worst, reason = pick_pair(texts, rewards, rule, min_margin, rng)
        if reason:
            counts["dropped"] += 1
            counts[reason] += 1
            continue
        counts["kept"] += 1
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": texts[best],
                "rejected": texts[worst],
                "chosen_reward": rewards[best],
                "rejected_reward": rewards[worst],
            }
        )
    return pairs, counts


def training_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as DPOTrainer reads them: a chat prompt (message list) gets its answers as assistant
    messages, so TRL applies the policy's chat template; a text prompt keeps text answers."""
    rows = []
    for p in pairs:
        if isinstance(p["prompt"], list):
            rows.append(
                {
                    "prompt": p["prompt"],
                    "chosen": [{"role": "assistant", "content": p["chosen"]}],
                    "rejected": [{"role": "assistant", "content": p["rejected"]}],
                }
            )
        else:
            rows.append({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]})
    return rows
