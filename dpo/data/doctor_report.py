"""The data doctor's checks and report: every preference pair examined before any model is loaded.

    report = examine(pairs, tokenizer, max_length=1024)   # pairs from dpo.data.pairs.to_pairs
    print(report.summary()); train_on(report.kept)

Degenerate rows are dropped and counted by reason (`fail=True`: stop instead); lengths are
counted in tokens exactly as TRL's DPOTrainer will tokenize (dpo/data/formats.py); the invariant
rows in = rows kept + rows dropped with a reason is asserted. Recipes and the command line go
through dpo/data/doctor.py (`check_data`, `python -m dpo.doctor`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from dpo.compat import TRL_DEFAULT_MAX_LENGTH, TRL_DEFAULT_TRUNCATION_MODE
from dpo.data.formats import is_chat, render
from dpo.data.pairs import DIVERGE, EMPTY_PROMPT, NO_SHARED_PROMPT
from dpo.data.preferences import CONTRADICTS, TIE, TOO_FEW
from dpo.data.tokens import measure_pairs
from dpo.data.tools import TOOLS_COLUMN
from dpo.errors import UserError

# Drop reasons, in the order they are checked: a row is counted once, under the first that applies.
EMPTY = "empty chosen or rejected"
IDENTICAL = "chosen identical to rejected"
# A held-out row that is also a training pair (examine's `training_keys`): the evaluation would score pairs the
# model trained on, or the training preference reversed
IN_TRAINING = "also a training pair"
IN_TRAINING_SWAPPED = "a training pair with chosen and rejected swapped"
# The same prompt with the answers the other way round in another row: each row cancels the other's preference
SWAPPED = "contradicted by another row (same prompt, chosen and rejected swapped)"
DUPLICATE = "duplicate of an earlier row"
PROMPT_TOO_LONG = "prompt alone >= max_length tokens"
# chosen and rejected differ only after max_length: the trained sequences and masks are the same (zero gradient)
SAME_AFTER_CUT = "chosen identical to rejected after truncation to max_length"
REASONS = (
    TIE,
    CONTRADICTS,
    TOO_FEW,
    NO_SHARED_PROMPT,
    DIVERGE,
    EMPTY_PROMPT,
    EMPTY,
    IDENTICAL,
    IN_TRAINING,
    IN_TRAINING_SWAPPED,
    SWAPPED,
    DUPLICATE,
    PROMPT_TOO_LONG,
    SAME_AFTER_CUT,
)

CHUNK = 1000  # rows rendered and tokenized per batch: one progress-bar tick
SHOW_ROWS = 5  # row numbers listed per drop reason
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


@dataclass
class DoctorReport:
    """What the doctor found. `kept` holds the usable pairs (prompt, chosen, rejected) in input order."""

    source: str
    rows_in: int
    kept: Dataset
    dropped: Counter = field(default_factory=Counter)  # reason -> number of rows
    drops: list = field(default_factory=list)  # (row number, reason) for every dropped row
    kept_rows: list = field(default_factory=list)  # input row number of each kept pair
    lengths: dict = field(default_factory=dict)  # "prompt"/"chosen"/"rejected" -> np.ndarray over kept rows
    unit: str = "tokens"
    max_length: int | None = None
    truncated: int = 0  # kept rows whose prompt + longer answer exceeds max_length
    layout: str = ""
    example: dict = field(default_factory=dict)  # the first kept pair as the model sees it (text)
    # With sft=True: input rows kept although DPO drops them (rejected empty or equal to chosen); SFT never reads rejected
    sft_only: list = field(default_factory=list)
    chat_template: str | None = None  # chat rows: the template they were rendered with (check_data's decision)

    @property
    def rows_kept(self) -> int:
        return len(self.kept)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def table(self) -> str:
        """The short table every recipe prints before training."""
        lines = [f"data doctor: {self.source}"]
        if self.layout:
            lines.append(f"  layout      {self.layout}")
        lines.append(f"  rows in   {self.rows_in:>7}")
        for reason in REASONS:
            if self.dropped[reason]:
                first = [row for row, why in self.drops if why == reason][:SHOW_ROWS]
                rows = ", ".join(map(str, first))
                more = ", ..." if self.dropped[reason] > len(first) else ""
                lines.append(f"  dropped   {self.dropped[reason]:>7}  {reason}: row {rows}{more}")
        lines.append(f"  rows kept {self.rows_kept:>7}")
        if self.sft_only:
            first = ", ".join(map(str, self.sft_only[:SHOW_ROWS])) + (
                ", ..." if len(self.sft_only) > SHOW_ROWS else ""
            )
            lines.append(
                f"  of which {len(self.sft_only):>4}  kept for SFT only (rejected empty or equal to chosen; DPO drops them): row {first}"
            )
        if self.rows_kept:
            stats = {
                part: [f"{np.median(v):.0f}", f"{np.percentile(v, 95):.0f}", f"{v.max()}"]
                for part, v in ((part, self.lengths[part]) for part in ("prompt", "chosen", "rejected"))
            }
            # every column as wide as its widest number + 2 spaces (8 at least): 9-digit lengths never run together
            width = max(8, 2 + max(len(cell) for cells in stats.values() for cell in cells))
            lines.append(f"  {self.unit:<10}" + "".join(f"{h:>{width}}" for h in ("median", "p95", "max")))
            for part, cells in stats.items():
                lines.append(f"  {part:<10}" + "".join(f"{cell:>{width}}" for cell in cells))
            if self.unit != "tokens":
                lines.append(
                    "  (no tokenizer: lengths in characters; pass --model_name_or_path to count tokens and check max_length)"
                )
            elif self.max_length is None:
                lines.append("  max_length: none, nothing is truncated")
            else:
                share = 100 * self.truncated / self.rows_kept
                lines.append(
                    f"  truncated by max_length={self.max_length}: {self.truncated} of {self.rows_kept} rows ({share:.1f}%)"
                )
        return "\n".join(lines)

    def summary(self) -> str:
        """The table, then the drop warning if rows were dropped: what a recipe prints."""
        warning = self.warning()
        return self.table() + (f"\n{warning}" if warning else "")

    def warning(self) -> str | None:
        """One line when rows were dropped, None otherwise."""
        if not self.rows_dropped:
            return None
        counts = ", ".join(f"{self.dropped[r]} {r}" for r in REASONS if self.dropped[r])
        first = ", ".join(str(row) for row, _ in self.drops[:SHOW_ROWS])
        return f"warning: {self.source}: dropped {self.rows_dropped} of {self.rows_in} rows ({counts}; first: row {first})"


# ── checks ─────────────────────────────────────────────────────────────────────────────


def _is_empty(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not any(m["content"].strip() or m.get("tool_calls") for m in answer)  # a tool call is an answer


def _same(a, b) -> bool:
    return _stripped(a) == _stripped(b)


def _stripped(value):
    """A prompt or answer as _same compares it: text stripped, messages as (role, stripped content) and the
    tool fields they have (dpo/data/tools.py: two answers calling different tools are different answers)."""
    if isinstance(value, str):
        return value.strip()
    return [(m["role"], m["content"].strip(), *(m[k] for k in TOOL_FIELDS if m.get(k))) for m in value]


def _with_tools(prompt, tools):
    """A prompt as the keys see it: the tools a row offers are part of its context."""
    return prompt if tools is None else [prompt, tools]


def _key(prompt, chosen, rejected) -> bytes:
    return hashlib.blake2b(
        json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode(), digest_size=16
    ).digest()


def pair_keys(pairs: Dataset) -> set[bytes]:
    """The key of every pair of `pairs` (prompt, chosen, rejected) as _same compares them: what examine's
    `training_keys` takes, to drop held-out rows that are training pairs."""
    columns = pairs[:]
    tools = columns.get(TOOLS_COLUMN) or [None] * len(pairs)
    return {
        _key(_with_tools(_stripped(p), t), _stripped(c), _stripped(r))
        for p, c, r, t in zip(columns["prompt"], columns["chosen"], columns["rejected"], tools)
    }


def examine(
    pairs: Dataset,
    tokenizer=None,
    max_length: int | None = TRL_DEFAULT_MAX_LENGTH,
    truncation_mode: str = TRL_DEFAULT_TRUNCATION_MODE,
    source: str = "data",
    layout: str = "",
    fail: bool = False,
    progress: bool | None = None,
    sft: bool = False,
    training_keys: set[bytes] | None = None,
) -> DoctorReport:
    """Check every row of `pairs` (from dpo.data.pairs.to_pairs); return the report with the kept pairs.

    Drops, by the first reason that applies: the conversion's problem (no shared prompt, replies
    that differ before the last turn), empty chosen or rejected, chosen identical to rejected,
    duplicate of an earlier row, and (with a tokenizer, under TRL's default keep_start truncation)
    a prompt that alone fills max_length, which TRL would otherwise drop silently. `fail=True`
    raises UserError instead of dropping. `sft=True`: the pairs feed SFT, which trains on prompt +
    chosen only, so an empty rejected or one equal to chosen drops nothing (`report.sft_only` lists
    those rows) and max_length truncation counts the chosen answer alone. `training_keys` (pair_keys of the
    training pairs) marks `pairs` as held out: a row that is a training pair, as it is or with chosen and
    rejected swapped, is dropped (a held-out split that is a copy of the training split scores training pairs).
    """
    from tqdm.auto import tqdm

    chat = is_chat(pairs)
    if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "chat-format pairs need a tokenizer with a chat template; call dpo.data.formats.ensure_chat_template first"
        )
    rows_in = len(pairs)
    columns = pairs[:]  # every column as Python lists: one pass over the Arrow table
    prompts, chosens, rejecteds = columns["prompt"], columns["chosen"], columns["rejected"]
    tools = columns.get(TOOLS_COLUMN) or [None] * rows_in  # JSON text per row (dpo/data/tools.py), or none
    keyed = [_with_tools(_stripped(p), t) for p, t in zip(prompts, tools)]  # prompts as the keys compare them
    row_numbers = columns.get("row") or list(range(1, rows_in + 1))
    problems = columns.get("problem") or [""] * rows_in
    drops: list[tuple[int, str]] = []

    def drop(reason: str, row: int) -> None:
        drops.append((row, reason))

    # cheap checks on every row
    passed: list[int] = []  # rows no earlier reason drops, with their pair key as _same compares
    keys: dict[int, bytes] = {}
    for i, (chosen, rejected) in enumerate(zip(chosens, rejecteds)):
        unpaired = _is_empty(rejected) or _same(chosen, rejected)  # no preference for DPO to learn
        if problems[i]:
            drop(problems[i], row_numbers[i])
        elif _is_empty(chosen) or (_is_empty(rejected) and not sft):
            drop(EMPTY, row_numbers[i])
        elif unpaired and not sft:
            drop(IDENTICAL, row_numbers[i])
        else:
            passed.append(i)
            keys[i] = _key(keyed[i], _stripped(chosen), _stripped(rejected))
    # a row whose swapped pair (same prompt, chosen and rejected exchanged) is another row: both go
    # (a row with chosen = rejected, kept for SFT, is its own swap: not a contradiction)
    swapped = {_key(keyed[i], _stripped(rejecteds[i]), _stripped(chosens[i])) for i in passed}
    swapped -= {keys[i] for i in passed if _same(chosens[i], rejecteds[i])}
    candidates: list[int] = []
    seen: set[bytes] = set()
    sft_only: set[int] = set()
    training_keys = training_keys or set()
    for i in passed:
        if keys[i] in training_keys:
            drop(IN_TRAINING, row_numbers[i])
        elif _key(keyed[i], _stripped(rejecteds[i]), _stripped(chosens[i])) in training_keys:
            drop(IN_TRAINING_SWAPPED, row_numbers[i])
        elif keys[i] in swapped:
            drop(SWAPPED, row_numbers[i])
        elif (key := _key(_with_tools(prompts[i], tools[i]), chosens[i], rejecteds[i])) in seen:
            drop(DUPLICATE, row_numbers[i])
        else:
            seen.add(key)
            candidates.append(i)
            if _is_empty(rejecteds[i]) or _same(chosens[i], rejecteds[i]):
                sft_only.add(i)

    # lengths, as TRL will tokenize them
    kept: list[int] = []
    lengths: list[tuple[int, int, int]] = []
    example: dict = {}
    check_length = tokenizer is not None and max_length is not None and truncation_mode == "keep_start"
    show = len(candidates) >= 20_000 if progress is None else progress
    for start in tqdm(
        range(0, len(candidates), CHUNK),
        desc="doctor: counting tokens (batches of 1000)",
        disable=not show,
        file=sys.stderr,
    ):
        chunk = candidates[start : start + CHUNK]
        texts = []
        for i in chunk:
            try:
                texts.append(render(prompts[i], chosens[i], rejecteds[i], tokenizer, tools[i]))
            except Exception as err:  # a chat template refusing the row (e.g. no system role)
                raise UserError(
                    f"{source}, row {row_numbers[i]}: the chat template failed on this row: {err}"
                ) from None
        measured = measure_pairs(texts, tokenizer, chat, max_length, truncation_mode)
        for i, text, (*counts, same_after_cut) in zip(chunk, texts, measured):
            if check_length and counts[0] >= max_length:
                drop(PROMPT_TOO_LONG, row_numbers[i])
                continue
            if same_after_cut and not sft:  # SFT trains on chosen alone
                drop(SAME_AFTER_CUT, row_numbers[i])
                continue
            kept.append(i)
            lengths.append(counts)
            if not example:
                example = {"prompt": text[0], "chosen": text[1][len(text[0]) :], "rejected": text[2][len(text[0]) :]}

    report = DoctorReport(
        source=source,
        rows_in=rows_in,
        kept=pairs.select(kept).select_columns(
            [c for c in ("prompt", "chosen", "rejected", TOOLS_COLUMN) if c in columns]
        ),
        dropped=Counter(reason for _, reason in drops),
        drops=sorted(drops),
        kept_rows=[row_numbers[i] for i in kept],
        unit="tokens" if tokenizer is not None else "characters",
        max_length=max_length,
        layout=layout,
        example=example,
        sft_only=[row_numbers[i] for i in kept if i in sft_only],
    )
    arr = np.array(lengths, dtype=np.int64).reshape(-1, 3)
    report.lengths = {"prompt": arr[:, 0], "chosen": arr[:, 1], "rejected": arr[:, 2]}
    if max_length is not None and tokenizer is not None:
        answer = arr[:, 1] if sft else np.maximum(arr[:, 1], arr[:, 2])  # SFT trains on the chosen answer alone
        report.truncated = int((arr[:, 0] + answer > max_length).sum())
    assert report.rows_in == report.rows_kept + report.rows_dropped == len(report.kept_rows) + len(report.drops), (
        "a row was lost without a reason"
    )
    if fail and report.rows_dropped:
        raise UserError(
            f"{report.warning()[len('warning: ') :]}. Degenerate rows fail this run "
            f"(degenerate_rows: fail / --fail_on_degenerate); fix them, or drop them with degenerate_rows: drop"
        )
    return report
