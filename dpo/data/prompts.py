"""Where the prompt ends when chosen and rejected hold whole conversations: the turns they share, up to
the last assistant reply (message lists, and Anthropic HH's "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts).
dpo/data/pairs.py calls these for implicit-prompt rows; a row they cannot split carries its problem, which
dpo.data.doctor drops and counts.
"""

from __future__ import annotations

import os
import re

# Why a row cannot be split; dpo.data.doctor drops these rows and counts them by reason.
NO_SHARED_PROMPT = "chosen and rejected share no prompt"
DIVERGE = "chosen and rejected differ before the last reply"

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # a turn opens the text or follows a blank line


def split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict], str]:
    """Implicit prompt: the messages chosen and rejected share, up to the last assistant reply.

    Returns (prompt, chosen reply, rejected reply, problem); problem is "" for a usable row.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # a shared reply belongs to the answer
        n -= 1
    prompt, chosen_reply, rejected_reply = chosen[:n], chosen[n:], rejected[n:]
    if not any(m["role"] == "user" for m in prompt):
        return prompt, chosen_reply, rejected_reply, NO_SHARED_PROMPT
    return prompt, chosen_reply, rejected_reply, reply_problem(chosen_reply, rejected_reply)


def reply_problem(chosen: list[dict], rejected: list[dict]) -> str:
    # an answer is the assistant's turns, with the results of the tools it called between them
    return DIVERGE if any(m["role"] not in ("assistant", "tool") for m in chosen + rejected) else ""


def parse_hh(transcript: str) -> list[dict]:
    """An HH transcript ("\\n\\nHuman: q\\n\\nAssistant: a...") as messages; text before the first turn is a system message."""
    parts = _HH_TURN.split(transcript)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def split_hh_text(chosen: str, rejected: str) -> tuple[str, str, str, str]:
    """HH in text form: the prompt is the shared transcript up to and including the last "\\n\\nAssistant:".

    Returns (prompt, chosen reply, rejected reply, problem); the replies keep their leading space.
    """
    shared = os.path.commonprefix([chosen, rejected])
    k = shared.rfind(HH_ASSISTANT)
    if k < 0 or (HH_HUMAN not in shared[:k] and not shared.startswith("Human:")):
        return "", chosen, rejected, NO_SHARED_PROMPT
    cut = k + len(HH_ASSISTANT)
    prompt, chosen_reply, rejected_reply = chosen[:cut], chosen[cut:], rejected[cut:]
    if HH_HUMAN in chosen_reply or HH_HUMAN in rejected_reply:
        return prompt, chosen_reply, rejected_reply, DIVERGE
    return prompt, chosen_reply, rejected_reply, ""
