"""Token counts of rendered pairs, exactly as TRL's DPOTrainer tokenizes them, in memory that stays near
the size of the text even for a row of tens of megabytes.

    measure_pairs(texts, tokenizer, chat, max_length=1024)   # [(prompt, chosen, rejected, same_after_cut), ...]
    count_tokens(texts, tokenizer, chat)                      # [(prompt, chosen, rejected), ...]

`texts` are dpo.data.formats.render's (prompt, prompt+chosen, prompt+rejected) strings. TRL tokenizes the
prompt and prompt+answer separately; the answer starts where the two token sequences diverge
(dpo_trainer.tokenize_fn), and its collator keeps `ids[:max_length]` (keep_start) or `ids[-max_length:]`
(keep_end). `same_after_cut`: what the model trains on is the same sequence and the same completion mask
for chosen and rejected once cut to max_length, so the pair teaches nothing (zero gradient).

A fast tokenizer turning one text into N tokens holds about a kilobyte per token (ids, offsets, token
strings, masks, in Rust and then in Python): a 50 MB row took 10 GB. Texts longer than LONG_TEXT
characters are tokenized in windows cut at a single space between two words, kept as int32 arrays
(4 bytes a token, at most the text's own bytes). Whether such cuts change the tokens is checked once per
tokenizer on a sample (`_windows_are_exact`): tokenizers whose normalizer prepends to every text
(legacy SentencePiece) fail it and get the whole text tokenized at once, as before.
"""

from __future__ import annotations

import re

import numpy as np

LONG_TEXT = 200_000  # characters; below it a row is tokenized in one batched call (~50k tokens, ~50 MB at most)
WINDOW = 100_000  # characters per window for longer texts
# A cut point: one space between two non-space characters, at least CUT_MARGIN characters before the window's
# end; no special-token text ("<|im_start|>", 12 characters) or BPE merge crosses a single space
CUT_MARGIN = 64
_CUT = re.compile(r"(?<=\S) (?=\S)")

_EXACT: dict[int, bool] = {}  # id(tokenizer's backend) -> windows give the whole text's tokens


def common_prefix_length(a, b) -> int:
    """How many leading tokens two id sequences share: where TRL's answer starts (dpo_trainer.tokenize_fn)."""
    n = min(len(a), len(b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
        return int(differ[0]) if len(differ) else n
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def _cut_points(text: str, window: int) -> list[int] | None:
    """Window ends: a single space between words, as far on as possible, windows at most `window` characters;
    None when some stretch has no such space (one long word, text without spaces)."""
    cuts, start = [], 0
    while len(text) - start > window:
        limit = start + window - CUT_MARGIN
        cut = None
        for match in _CUT.finditer(text, max(start + 1, limit - window // 2), limit):
            cut = match.start()
        if cut is None:
            return None
        cuts.append(cut)
        start = cut
    return cuts


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text with add_special_tokens=True (a BOS, ...)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    k = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[:k], full[k + len(plain) :]


def _windowed_ids(text: str, tokenizer, add_special_tokens: bool, window: int) -> np.ndarray | None:
    cuts = _cut_points(text, window)
    if cuts is None:
        return None
    bounds = [0, *cuts, len(text)]
    parts = [
        np.asarray(tokenizer(text[a:b], add_special_tokens=False)["input_ids"], dtype=np.int32)
        for a, b in zip(bounds, bounds[1:])
    ]
    if add_special_tokens:
        before, after = _special_ends(tokenizer)
        parts = [np.asarray(before, dtype=np.int32), *parts, np.asarray(after, dtype=np.int32)]
    return np.concatenate(parts)


SAMPLE = (
    "Human: What's 2+2?  It's 4, isn't it? Yes: 4.\n\nAssistant: Sure -- \"four\" (4) is right; "
    "café naïve 東京 😀 x=1,y=2 <|im_start|>user\nhi<|im_end|> <|endoftext|> \t tab  double  spaces... "
)


def _windows_are_exact(tokenizer) -> bool:
    """Once per tokenizer: do window cuts (_CUT) give the tokens of the whole text? A sample of mixed text
    cut every ~100 characters (the rule at a small scale) against the whole sample, with and without
    special tokens."""
    key = id(getattr(tokenizer, "backend_tokenizer", tokenizer))
    if key not in _EXACT:
        sample = SAMPLE * 8
        _EXACT[key] = all(
            (ids := _windowed_ids(sample, tokenizer, special, window=CUT_MARGIN + 100)) is not None
            and ids.tolist() == tokenizer(sample, add_special_tokens=special)["input_ids"]
            for special in (False, True)
        )
    return _EXACT[key]


def token_ids(text: str, tokenizer, add_special_tokens: bool, window: int | None = None):
    """`tokenizer(text)["input_ids"]`; a text over LONG_TEXT characters is tokenized in windows (of WINDOW
    characters) into an int32 array when that gives the same ids (`_windows_are_exact`)."""
    window = window or WINDOW
    if len(text) > max(LONG_TEXT, window) and _windows_are_exact(tokenizer):
        ids = _windowed_ids(text, tokenizer, add_special_tokens, window)
        if ids is not None:
            return ids
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _in_window(ids, n: int, max_length: int, truncation_mode: str):
    """(kept ids, completion tokens kept) of prompt+answer ids whose prompt is `n` tokens, as TRL's collator cuts."""
    if truncation_mode == "keep_end":
        return ids[-max_length:], min(len(ids), max_length, len(ids) - n)
    return ids[:max_length], max(0, min(len(ids), max_length) - n)


def _same_after_cut(pc, pr, n: int, max_length: int | None, truncation_mode: str) -> bool:
    if max_length is None or (len(pc) <= max_length and len(pr) <= max_length):
        return False  # nothing is cut: the doctor's chosen == rejected check covers uncut pairs
    (c, kept_c), (r, kept_r) = (_in_window(ids, n, max_length, truncation_mode) for ids in (pc, pr))
    return kept_c == kept_r and len(c) == len(r) and bool(np.array_equal(np.asarray(c), np.asarray(r)))


def measure_pairs(
    texts: list[tuple[str, str, str]],
    tokenizer,
    chat: bool,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> list[tuple[int, int, int, bool]]:
    """(prompt, chosen, rejected lengths, same after the max_length cut) per row; tokens as TRL counts them, or
    characters without a tokenizer (then nothing is cut). Chat text is tokenized without extra special tokens
    (the template has them), plain text with the tokenizer's defaults."""
    if tokenizer is None:
        return [(len(p), len(pc) - len(p), len(pr) - len(p), False) for p, pc, pr in texts]
    short = [i for i, triple in enumerate(texts) if max(map(len, triple)) <= LONG_TEXT]
    flat = [t for i in short for t in texts[i]]
    batched = iter(tokenizer(flat, add_special_tokens=not chat)["input_ids"]) if flat else iter(())
    out = []
    for triple in texts:
        if max(map(len, triple)) <= LONG_TEXT:
            p, pc, pr = next(batched), next(batched), next(batched)
        else:  # one long row at a time, each text in windows
            p, pc, pr = (token_ids(t, tokenizer, not chat) for t in triple)
        n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
        out.append((n, len(pc) - n, len(pr) - n, _same_after_cut(pc, pr, n, max_length, truncation_mode)))
    return out


def count_tokens(texts: list[tuple[str, str, str]], tokenizer, chat: bool) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths per row: `measure_pairs` without the max_length cut."""
    return [row[:3] for row in measure_pairs(texts, tokenizer, chat)]
