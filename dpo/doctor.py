"""The data doctor: check every preference pair before any model is loaded, so no GPU time goes
to bad rows. Runs inside every recipe, and alone:

    python -m dpo.doctor data.jsonl
    python -m dpo.doctor trl-lib/ultrafeedback_binarized --model Qwen/Qwen2.5-0.5B-Instruct --max_length 1024
    python -m dpo.doctor Anthropic/hh-rlhf --model outputs/tiny-phi --histogram outputs/hh_lengths.png
    python -m dpo.doctor my.csv --prompt_column question --chosen_column good --rejected_column bad
    python -m dpo.doctor truthy.jsonl --model microsoft/phi-2 --prompt_format text --text_format phi2
                                      # as recipes/dpo_phi2.py formats and counts it

What it does, on the pairs from dpo.data.to_pairs:
  * schema errors (missing field, wrong type, malformed JSON line, empty file) stop with the file,
    the row and the field; they are raised while loading and converting (dpo.data);
  * degenerate rows are dropped and counted by reason, with a warning (`fail=True`,
    `--fail_on_degenerate`, or `degenerate_rows: fail` in a recipe's YAML: stop instead);
  * length statistics in tokens, exactly as TRL's DPOTrainer will tokenize (chat template or
    text + EOS): median, p95, max of prompt / chosen / rejected, and the share of rows that
    `max_length` truncates. Without --model, lengths are in characters and no row is dropped
    for length;
  * invariant, asserted: rows in = rows kept + rows dropped with a reason.

Exit status: 0 (degenerate rows dropped, with a warning), 2 with a one-line message on a schema
error or, with --fail_on_degenerate, on any degenerate row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from dpo.data import (
    DIVERGE,
    NO_SHARED_PROMPT,
    PLAIN_CHAT_TEMPLATE,
    Columns,
    ensure_chat_template,
    is_chat,
    load_preference_data,
    phi2_qa_format,
    to_pairs,
)
from dpo.errors import UserError, exit_on_user_error

# Drop reasons, in the order they are checked: a row is counted once, under the first that applies.
EMPTY = "empty chosen or rejected"
IDENTICAL = "chosen identical to rejected"
DUPLICATE = "duplicate of an earlier row"
PROMPT_TOO_LONG = "prompt alone >= max_length tokens"
REASONS = (NO_SHARED_PROMPT, DIVERGE, EMPTY, IDENTICAL, DUPLICATE, PROMPT_TOO_LONG)

# --text_format: a recipe's own formatting of text rows (prompt_format text), by name.
TEXT_FORMATS = {"none": None, "phi2": phi2_qa_format}

TRL_DEFAULT_MAX_LENGTH = 1024  # DPOConfig.max_length's default in TRL 1.16
CHUNK = 1000  # rows rendered and tokenized per batch: one progress-bar tick
SHOW_ROWS = 5  # row numbers listed per drop reason


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
        if self.rows_kept:
            lines.append(f"  {self.unit:<10}{'median':>8}{'p95':>8}{'max':>8}")
            for part in ("prompt", "chosen", "rejected"):
                values = self.lengths[part]
                lines.append(
                    f"  {part:<10}{np.median(values):>8.0f}{np.percentile(values, 95):>8.0f}{values.max():>8}"
                )
            if self.unit != "tokens":
                lines.append(
                    "  (no tokenizer: lengths in characters; pass --model to count tokens and check max_length)"
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


# ── rendering and token counts, exactly as TRL's DPOTrainer does them ──────────────────


def render(prompt, chosen, rejected, tokenizer) -> tuple[str, str, str]:
    """(prompt text, prompt+chosen text, prompt+rejected text) as TRL builds them.

    Chat format: the chat template, with the generation prompt after the prompt. Text: the
    strings joined, EOS appended to each answer unless it already ends with it.
    """
    if isinstance(chosen, str):
        eos = getattr(tokenizer, "eos_token", None) or ""
        return prompt, prompt + _with_eos(chosen, eos), prompt + _with_eos(rejected, eos)
    if tokenizer is None:
        return (
            _render_plain(prompt, True),
            _render_plain(prompt + chosen, False),
            _render_plain(prompt + rejected, False),
        )
    apply = tokenizer.apply_chat_template
    return (
        apply(prompt, tokenize=False, add_generation_prompt=True),
        apply(prompt + chosen, tokenize=False),
        apply(prompt + rejected, tokenize=False),
    )


def _with_eos(text: str, eos: str) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def _render_plain(messages: list[dict], add_generation_prompt: bool) -> str:
    """PLAIN_CHAT_TEMPLATE in Python, for character counts when no tokenizer is given (no EOS)."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"])
        else:
            name = {"user": "Human", "assistant": "Assistant"}.get(m["role"], m["role"].capitalize())
            out.append(f"\n\n{name}: {m['content']}")
    return "".join(out) + ("\n\nAssistant:" if add_generation_prompt else "")


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def count_tokens(texts: list[tuple[str, str, str]], tokenizer, chat: bool) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths per row; tokens as TRL counts them, or characters without a tokenizer.

    TRL tokenizes the prompt and prompt+answer separately; the answer starts where the two
    token sequences diverge (dpo_trainer.tokenize_fn). Chat text is tokenized without extra
    special tokens (the template has them), plain text with the tokenizer's defaults.
    """
    if tokenizer is None:
        return [(len(p), len(pc) - len(p), len(pr) - len(p)) for p, pc, pr in texts]
    flat = [t for triple in texts for t in triple]
    ids = tokenizer(flat, add_special_tokens=not chat)["input_ids"]
    out = []
    for i in range(0, len(ids), 3):
        p, pc, pr = ids[i], ids[i + 1], ids[i + 2]
        n = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out.append((n, len(pc) - n, len(pr) - n))
    return out


# ── checks ─────────────────────────────────────────────────────────────────────────────


def _is_empty(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not any(m["content"].strip() for m in answer)


def _same(a, b) -> bool:
    if isinstance(a, str):
        return a.strip() == b.strip()
    return [(m["role"], m["content"].strip()) for m in a] == [(m["role"], m["content"].strip()) for m in b]


def _key(prompt, chosen, rejected) -> bytes:
    return hashlib.blake2b(
        json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode(), digest_size=16
    ).digest()


def examine(
    pairs: Dataset,
    tokenizer=None,
    max_length: int | None = TRL_DEFAULT_MAX_LENGTH,
    truncation_mode: str = "keep_start",
    source: str = "data",
    layout: str = "",
    fail: bool = False,
    progress: bool | None = None,
) -> DoctorReport:
    """Check every row of `pairs` (from dpo.data.to_pairs); return the report with the kept pairs.

    Drops, by the first reason that applies: the conversion's problem (no shared prompt, replies
    that differ before the last turn), empty chosen or rejected, chosen identical to rejected,
    duplicate of an earlier row, and (with a tokenizer, under TRL's default keep_start truncation)
    a prompt that alone fills max_length, which TRL would otherwise drop silently. `fail=True`
    raises UserError instead of dropping.
    """
    from tqdm.auto import tqdm

    chat = is_chat(pairs)
    if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "chat-format pairs need a tokenizer with a chat template; call dpo.data.ensure_chat_template first"
        )
    rows_in = len(pairs)
    columns = pairs[:]  # every column as Python lists: one pass over the Arrow table
    prompts, chosens, rejecteds = columns["prompt"], columns["chosen"], columns["rejected"]
    row_numbers = columns.get("row") or list(range(1, rows_in + 1))
    problems = columns.get("problem") or [""] * rows_in
    drops: list[tuple[int, str]] = []

    def drop(reason: str, row: int) -> None:
        drops.append((row, reason))

    # cheap checks on every row
    candidates: list[int] = []
    seen: set[bytes] = set()
    for i, (prompt, chosen, rejected) in enumerate(zip(prompts, chosens, rejecteds)):
        if problems[i]:
            drop(problems[i], row_numbers[i])
        elif _is_empty(chosen) or _is_empty(rejected):
            drop(EMPTY, row_numbers[i])
        elif _same(chosen, rejected):
            drop(IDENTICAL, row_numbers[i])
        elif (key := _key(prompt, chosen, rejected)) in seen:
            drop(DUPLICATE, row_numbers[i])
        else:
            seen.add(key)
            candidates.append(i)

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
                texts.append(render(prompts[i], chosens[i], rejecteds[i], tokenizer))
            except Exception as err:  # a chat template refusing the row (e.g. no system role)
                raise UserError(
                    f"{source}, row {row_numbers[i]}: the chat template failed on this row: {err}"
                ) from None
        for i, text, counts in zip(chunk, texts, count_tokens(texts, tokenizer, chat)):
            if check_length and counts[0] >= max_length:
                drop(PROMPT_TOO_LONG, row_numbers[i])
                continue
            kept.append(i)
            lengths.append(counts)
            if not example:
                example = {"prompt": text[0], "chosen": text[1][len(text[0]) :]}

    report = DoctorReport(
        source=source,
        rows_in=rows_in,
        kept=pairs.select(kept).select_columns(["prompt", "chosen", "rejected"]),
        dropped=Counter(reason for _, reason in drops),
        drops=sorted(drops),
        kept_rows=[row_numbers[i] for i in kept],
        unit="tokens" if tokenizer is not None else "characters",
        max_length=max_length,
        layout=layout,
        example=example,
    )
    arr = np.array(lengths, dtype=np.int64).reshape(-1, 3)
    report.lengths = {"prompt": arr[:, 0], "chosen": arr[:, 1], "rejected": arr[:, 2]}
    if max_length is not None and tokenizer is not None:
        report.truncated = int((arr[:, 0] + np.maximum(arr[:, 1], arr[:, 2]) > max_length).sum())
    assert report.rows_in == report.rows_kept + report.rows_dropped == len(report.kept_rows) + len(report.drops), (
        "a row was lost without a reason"
    )
    if fail and report.rows_dropped:
        raise UserError(
            f"{report.warning()[len('warning: ') :]}. Degenerate rows fail this run "
            f"(degenerate_rows: fail / --fail_on_degenerate); fix them, or drop them with degenerate_rows: drop"
        )
    return report


# ── histogram ──────────────────────────────────────────────────────────────────────────


def plot_lengths(report: DoctorReport, path: str | Path) -> Path:
    """Histograms of prompt / chosen / rejected lengths and of the full sequence, with max_length marked."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's inline backend alone

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
    fig.savefig(path, dpi=110)
    return path


# ── one call for recipes, and the command line ────────────────────────────────────────────


def check_data(
    data: Dataset,
    source: str,
    tokenizer=None,
    *,
    columns: Columns | None = None,
    prompt_format: str = "chat",
    text_format=None,
    max_length: int | None = TRL_DEFAULT_MAX_LENGTH,
    truncation_mode: str = "keep_start",
    degenerate_rows: str = "drop",
) -> DoctorReport:
    """to_pairs + examine: convert the raw rows and check every one. What recipes call."""
    if degenerate_rows not in ("drop", "fail"):
        raise UserError(f"degenerate_rows: '{degenerate_rows}' is not one of ['drop', 'fail']")
    pairs, layout = to_pairs(data, source, columns, prompt_format, text_format)
    template = ""
    if is_chat(pairs):
        if tokenizer is None or ensure_chat_template(tokenizer) or tokenizer.chat_template == PLAIN_CHAT_TEMPLATE:
            template = ", plain template"
        else:
            template = ", tokenizer's chat template"
    fmt = (
        f"{prompt_format} format"
        + template
        + (
            f" ({getattr(text_format, '__name__', 'custom text_format')})"
            if text_format and not is_chat(pairs)
            else ""
        )
    )
    report = examine(
        pairs,
        tokenizer,
        max_length,
        truncation_mode,
        source,
        f"{layout.describe()}; {fmt}",
        fail=degenerate_rows == "fail",
    )
    if report.rows_kept == 0:
        raise UserError(f"{source}: no usable pair, every row was dropped:\n{report.table()}")
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpo.doctor",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", help="hub dataset id or local .jsonl/.json/.parquet/.csv file or folder")
    p.add_argument("--model", help="tokenizer (hub id or local folder) to count tokens with; without it, characters")
    p.add_argument(
        "--max_length", type=int, default=TRL_DEFAULT_MAX_LENGTH, help="as in the recipe's YAML (default: TRL's 1024)"
    )
    p.add_argument("--truncation_mode", default="keep_start", choices=["keep_start", "keep_end"])
    p.add_argument("--histogram", help="write a PNG of the length distributions here")
    p.add_argument("--split", default="train")
    p.add_argument("--config", dest="config_name", help="hub dataset configuration name")
    p.add_argument(
        "--prompt_format",
        default="chat",
        choices=["chat", "text"],
        help="chat: the tokenizer's chat template (default); text: the strings as they are",
    )
    p.add_argument(
        "--text_format",
        default="none",
        choices=list(TEXT_FORMATS),
        help="with --prompt_format text, a recipe's own prompt format for text rows: phi2 = "
        "recipes/dpo_phi2.py's 'Instruct: <prompt>\\nOutput: <answer>' (dpo.data.phi2_qa_format); "
        "none = <system>\\n\\n<prompt> (default)",
    )
    for role in ("prompt", "chosen", "rejected", "system"):
        p.add_argument(f"--{role}_column", help=f"the column holding the {role}, if not detected")
    p.add_argument("--fail_on_degenerate", action="store_true", help="exit 2 instead of dropping degenerate rows")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> DoctorReport:
    """Command-line entry point: load, check, print the table; UserError -> message and exit 2."""

    @exit_on_user_error
    def run() -> DoctorReport:
        args = _parser().parse_args(argv)
        if args.text_format != "none" and args.prompt_format != "text":
            raise UserError(f"--text_format {args.text_format} formats text rows: add --prompt_format text")
        tokenizer = None
        if args.model:
            from dpo.model import load_tokenizer

            tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        data = load_preference_data(args.dataset, args.config_name, args.split)
        columns = Columns(args.prompt_column, args.chosen_column, args.rejected_column, args.system_column)
        report = check_data(
            data,
            args.dataset,
            tokenizer,
            columns=columns,
            prompt_format=args.prompt_format,
            text_format=TEXT_FORMATS[args.text_format],
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            degenerate_rows="fail" if args.fail_on_degenerate else "drop",
        )
        print(report.table())
        if report.example:
            print(
                f"first pair as the model sees it:\n  prompt: {report.example['prompt']!r:.300}\n"
                f"  chosen: {report.example['chosen']!r:.300}"
            )
        if warning := report.warning():
            print(warning, file=sys.stderr)
        if args.histogram:
            print(f"length histogram written to {plot_lengths(report, args.histogram)}")
        return report

    return run()


if __name__ == "__main__":
    main()
