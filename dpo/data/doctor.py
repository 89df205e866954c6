"""The data doctor: check every preference pair before any model is loaded, so no GPU time goes
to bad rows. Runs inside every recipe (`check_data`), and alone, with the recipes' flag names:

    python -m dpo.doctor data.jsonl
    python -m dpo.doctor trl-lib/ultrafeedback_binarized --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --max_length 1024
    python -m dpo.doctor Anthropic/hh-rlhf --model_name_or_path outputs/tiny-phi --histogram outputs/hh_lengths.png
    python -m dpo.doctor my.csv --prompt_column question --chosen_column good --rejected_column bad
    python -m dpo.doctor pku.jsonl --label_column better_response_id      # two responses + which is better
    python -m dpo.doctor pairs.csv --score_columns score_a score_b           # a score per response
    python -m dpo.doctor truthy.jsonl --model_name_or_path microsoft/phi-2 --prompt_format text --text_format phi2
                                      # as recipes/dpo_phi2.py formats and counts it
    python -m dpo.doctor --dataset_name org/data --dataset_config en --dataset_train_split test
    python -m dpo.doctor agent.jsonl --model_name_or_path outputs/tiny-phi --chat_template_path tools.jinja
                                      # tool-calling rows, rendered with a template that shows the calls

What it does, on the pairs from dpo.data.pairs.to_pairs:
  * schema errors (missing field, wrong type, malformed JSON line, empty file) stop with the file,
    the row and the field; they are raised while loading and converting (dpo/data/loading.py, dpo/data/pairs.py);
  * degenerate rows are dropped and counted by reason, with a warning (`fail=True`,
    `--fail_on_degenerate`, or `degenerate_rows: fail` in a recipe's YAML: stop instead);
  * length statistics in tokens, exactly as TRL's DPOTrainer will tokenize (chat template or
    text + EOS): median, p95, max of prompt / chosen / rejected, and the share of rows that
    `max_length` truncates. Without --model_name_or_path, lengths are in characters and no row
    is dropped for length;
  * invariant, asserted: rows in = rows kept + rows dropped with a reason.
The checks and the report live in dpo/data/doctor_report.py, the length histogram in dpo/plots.py.

Exit status: 0 (degenerate rows dropped, with a warning), 2 with a one-line message on a schema
error or, with --fail_on_degenerate, on any degenerate row.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

from datasets import Dataset

from dpo.compat import TRL_DEFAULT_MAX_LENGTH, TRL_DEFAULT_TRUNCATION_MODE
from dpo.data.doctor_report import IN_TRAINING, IN_TRAINING_SWAPPED, DoctorReport, examine, pair_keys
from dpo.data.formats import PLAIN_CHAT_TEMPLATE, chat_template_for, is_chat, phi2_qa_format
from dpo.data.loading import load_preference_data, split_heldout
from dpo.data.pairs import Columns, to_pairs
from dpo.data.tools import TOOLS_COLUMN, check_template, has_tool_messages, template_for_rows
from dpo.errors import UserError, exit_on_user_error
from dpo.files import is_our_figure
from dpo.gate.check import check_flags
from dpo.gate.flags import command_parser, parse_flags
from dpo.log import log
from dpo.plots import plot_lengths
from dpo.train.model_checks import load_tokenizer

# --text_format: a recipe's own formatting of text rows (prompt_format text), by name.
TEXT_FORMATS = {"none": None, "phi2": phi2_qa_format}


# ── one call for recipes ─────────────────────────────────────────────────────────────────


def check_data(
    data: Dataset,
    source: str,
    tokenizer=None,
    *,
    columns: Columns | None = None,
    prompt_format: str = "chat",
    text_format=None,
    max_length: int | None = TRL_DEFAULT_MAX_LENGTH,
    truncation_mode: str = TRL_DEFAULT_TRUNCATION_MODE,
    degenerate_rows: str = "drop",
    sft: bool = False,
    training_keys: set[bytes] | None = None,
    chat_template_path: str | None = None,
) -> DoctorReport:
    """to_pairs + examine: convert the raw rows and check every one. What recipes call. `sft=True`
    for SFT, which never reads rejected (examine keeps rows whose rejected is empty or = chosen).
    `training_keys` (doctor_report.pair_keys of the training pairs): `data` is a held-out split, whose rows
    that are training pairs (as they are or swapped) are dropped; when that leaves none, one line says so.
    Changes nothing it is given: for chat rows the template it rendered them with (`chat_template_path`'s,
    else the tokenizer's own, or the plain one when it has none) is `report.chat_template`, for the caller to
    train with. Rows with tool calls or tools need a template that renders them (dpo/data/tools.py), or stop."""
    if degenerate_rows not in ("drop", "fail"):
        raise UserError(f"degenerate_rows: '{degenerate_rows}' is not one of ['drop', 'fail']")
    pairs, layout = to_pairs(data, source, columns, prompt_format, text_format)
    template, chat_template = "", None
    own = template_for_rows(chat_template_path, is_chat(pairs), f"the rows of {source}")
    if is_chat(pairs):
        if tokenizer is not None:  # before the no-template warning: tool rows with no template stop here
            _check_tool_template(pairs, tokenizer, source, chat_template_path, own)
        chat_template = own or (chat_template_for(tokenizer) if tokenizer is not None else PLAIN_CHAT_TEMPLATE)
        if tokenizer is not None and chat_template != tokenizer.chat_template:  # the caller's tokenizer stays as it is
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = chat_template
        template = (
            f", chat template {chat_template_path}"
            if own
            else ", plain template"
            if chat_template == PLAIN_CHAT_TEMPLATE
            else ", tokenizer's chat template"
        )
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
        sft=sft,
        training_keys=training_keys,
    )
    copies, swapped = report.dropped[IN_TRAINING], report.dropped[IN_TRAINING_SWAPPED]
    if report.rows_kept == 0 and copies + swapped:
        rest = ", the others unusable" if copies + swapped < report.rows_in else ""
        raise UserError(
            f"{source}: no held-out pair left: {copies + swapped} of its {report.rows_in} rows are training pairs "
            f"({copies} the same, {swapped} with chosen and rejected swapped){rest}, so the evaluation would score "
            "pairs the model trained on; give a test split of other pairs, or leave dataset_test_split "
            "unset to hold out test_size of the training rows"
        )
    if report.rows_kept == 0:
        raise UserError(f"{source}: no usable pair, every row was dropped:\n{report.table()}")
    report.chat_template = chat_template
    return report


def _check_tool_template(pairs: Dataset, tokenizer, source: str, path: str | None, own: str | None) -> None:
    """Rows with tool calls, tool results or tools (to_pairs gives their pairs a tools column, and only
    theirs): the template must render them (dpo/data/tools.py)."""
    if TOOLS_COLUMN not in pairs.column_names:
        return
    data = pairs.select_columns(["prompt", "chosen", "rejected", TOOLS_COLUMN, "row"])[:]
    # the first row rendered with the tools offered, and the first whose calls come without tools
    rows = zip(data["prompt"], data["chosen"], data["rejected"], data[TOOLS_COLUMN], data["row"])
    first = {True: None, False: None}
    for p, c, r, t, n in rows:
        if t is not None or has_tool_messages(p, c, r):
            first[t is not None] = first[t is not None] or n
    if first == {True: None, False: None}:
        return
    template = own or tokenizer.chat_template or PLAIN_CHAT_TEMPLATE  # check_data's choice, without its warning
    if own:
        described = f"the chat template {path}"
    elif template == PLAIN_CHAT_TEMPLATE:
        described = (
            f"the plain Human/Assistant template ({tokenizer.name_or_path or 'the tokenizer'} has no chat template)"
        )
    else:
        described = f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"
    # rows with tools are rendered with the tools offered; with named templates, rows of calls without tools may be
    # rendered by another template than rows with tools (dpo/data/tools.py template_problem): each is checked
    for with_tools, row in first.items():
        if row is not None:
            check_template(tokenizer, template, described, source, row, with_tools)


def split_like_dpo(report, test_size: float, seed: int):
    """(train pairs, held-out pairs or None) for SFT from the doctor's `report` (check_data with sft=True).

    The pairs DPO can use are split exactly as recipes/dpo_phi2.py splits them with the same seed, so
    DPO's held-out pairs stay unseen by SFT; the rows only SFT can use (`report.sft_only`: rejected empty
    or equal to chosen) all go to training."""
    from datasets import concatenate_datasets

    only = set(report.sft_only)
    paired = [i for i, row in enumerate(report.kept_rows) if row not in only]
    train, heldout = split_heldout(report.kept.select(paired), test_size, seed)
    if only:
        extra = report.kept.select([i for i, row in enumerate(report.kept_rows) if row in only])
        train = concatenate_datasets([train, extra])
    return train, heldout


def check_training_split(
    script_args, training_args, tokenizer, split: str | None = None, missing_ok: bool = False, **formatting
) -> DoctorReport | None:
    """A recipe's data phase: load `split` (default: the training split) of the data named by
    `script_args` (dataset_name, dataset_config, dataset_train_split) and check every row with
    `check_data`, at the run's max_length and truncation_mode. `formatting`: check_data's prompt_format,
    text_format, columns, degenerate_rows, sft. None only when `missing_ok` and there is no such split."""
    split = split or script_args.dataset_train_split
    raw = load_preference_data(script_args.dataset_name, script_args.dataset_config, split, missing_ok)
    if raw is None:
        return None
    source = (
        script_args.dataset_name
        if split == script_args.dataset_train_split
        else f"{script_args.dataset_name} [{split}]"
    )
    return check_data(
        raw,
        source,
        tokenizer,
        max_length=training_args.max_length,
        truncation_mode=training_args.truncation_mode,
        chat_template_path=getattr(training_args, "chat_template_path", None),
        **formatting,
    )


def check_splits(script_args, training_args, tokenizer, **formatting) -> tuple[DoctorReport, DoctorReport | None]:
    """The doctor on the train split and, if `script_args.dataset_test_split` names one that exists, the test
    split: (train report, test report or None), each table printed (the recipe draws the train split's token
    lengths into output_dir/data_lengths.png once the folder is this run's: dpo.plots.plot_lengths). Test rows
    that are training pairs (the same split under another name, a copy, or training pairs with chosen and rejected
    swapped) are dropped from the test report and counted in its table and warning line. What recipes/dpo_any.py runs, once, on the main process."""
    report = check_training_split(script_args, training_args, tokenizer, **formatting)
    log(report.summary())
    test_split = getattr(script_args, "dataset_test_split", None)
    test = (
        check_training_split(
            script_args, training_args, tokenizer, test_split, True, training_keys=pair_keys(report.kept), **formatting
        )
        if test_split
        else None
    )
    if test is not None:
        log(test.summary())
    return report, test


# ── the command line ─────────────────────────────────────────────────────────────────────


def _parser() -> argparse.ArgumentParser:
    p = command_parser("python -m dpo.doctor", __doc__)
    p.add_argument("dataset", nargs="?", help="the same as --dataset_name, shorter")
    p.add_argument("--dataset_name", help="hub dataset id or local .jsonl/.json/.parquet/.csv file or folder")
    p.add_argument("--dataset_config", help="hub dataset configuration name")
    p.add_argument("--dataset_train_split", default="train", help="the split to check (default: train)")
    p.add_argument(
        "--model_name_or_path",
        help="the model whose tokenizer counts tokens (hub id or local folder); without it, characters",
    )
    p.add_argument(
        "--max_length",
        type=int,
        default=TRL_DEFAULT_MAX_LENGTH,
        help=f"as in the recipe's YAML (default: TRL's {TRL_DEFAULT_MAX_LENGTH})",
    )
    p.add_argument("--truncation_mode", default=TRL_DEFAULT_TRUNCATION_MODE, choices=["keep_start", "keep_end"])
    p.add_argument("--histogram", help="write a PNG of the length distributions here")
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
        "recipes/dpo_phi2.py's 'Instruct: <prompt>\\nOutput: <answer>' (dpo.data.formats.phi2_qa_format); "
        "none = <system>\\n\\n<prompt> (default)",
    )
    for role in ("prompt", "chosen", "rejected", "system"):
        p.add_argument(f"--{role}_column", help=f"the column holding the {role}, if not detected")
    p.add_argument(
        "--label_column",
        help="the column saying which of two responses is better (e.g. PKU-SafeRLHF's better_response_id); dpo/data/preferences.py",
    )
    p.add_argument(
        "--score_columns",
        nargs="+",
        help="a score column per response (e.g. score_a score_b), or the score key of a completions list",
    )
    p.add_argument(
        "--chat_template_path",
        help="a Jinja chat template file (.jinja/.j2) to render chat rows with, instead of the tokenizer's own "
        "(as the recipes' chat_template_path); e.g. one that renders tool calls",
    )
    p.add_argument("--fail_on_degenerate", action="store_true", help="exit 2 instead of dropping degenerate rows")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def histogram_path(name: str) -> Path:
    """Where `--histogram name` writes, checked before any work: a .png file (a name without a suffix
    gets .png, as matplotlib would add it), in a folder that exists or can be made and is writable."""
    path = Path(name).expanduser()
    if path.is_dir() or name.endswith(("/", os.sep)) or not path.name:
        raise UserError(f"--histogram {name}: a folder; give a file name ending in .png")
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise UserError(f"--histogram {name}: the histogram is a PNG image; give a name ending in .png")
    if path.is_dir():
        raise UserError(f"--histogram {name}: a folder; give a file name ending in .png")
    if (path.exists() or path.is_symlink()) and not is_our_figure(path):
        raise UserError(
            f"--histogram {name}: {path} exists and is not a figure these tools wrote; give a new name (nothing is "
            "overwritten)"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"--histogram {name}: {folder} is a file, not a folder; write the histogram elsewhere")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK | (0 if path.exists() else os.X_OK)):
        raise UserError(f"--histogram {name}: {target} is not writable; write the histogram elsewhere")
    return path


def main(argv: list[str] | None = None) -> DoctorReport:
    """Command-line entry point: load, check, print the table; UserError -> message and exit 2."""

    @exit_on_user_error
    def run() -> DoctorReport:
        given = list(sys.argv[1:] if argv is None else argv)
        args = parse_flags(_parser(), given)  # as every command: a flag given twice or unknown is one line
        if args.dataset and args.dataset_name and args.dataset != args.dataset_name:
            raise UserError(f"two datasets given: {args.dataset} and --dataset_name {args.dataset_name}; pass one")
        dataset = args.dataset_name or args.dataset
        if not dataset:
            raise UserError("no dataset: python -m dpo.doctor <hub id or file> (or --dataset_name <hub id or file>)")
        if args.text_format != "none" and args.prompt_format != "text":
            raise UserError(f"--text_format {args.text_format} formats text rows: add --prompt_format text")
        check_flags(args)  # the settings gate (dpo/gate/), as the recipes check the same names
        histogram = histogram_path(args.histogram) if args.histogram else None
        tokenizer = None
        if args.model_name_or_path:
            tokenizer = load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        data = load_preference_data(dataset, args.dataset_config, args.dataset_train_split)
        columns = Columns(
            args.prompt_column,
            args.chosen_column,
            args.rejected_column,
            args.system_column,
            args.label_column,
            args.score_columns,
        )
        report = check_data(
            data,
            dataset,
            tokenizer,
            columns=columns,
            prompt_format=args.prompt_format,
            text_format=TEXT_FORMATS[args.text_format],
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            degenerate_rows="fail" if args.fail_on_degenerate else "drop",
            chat_template_path=args.chat_template_path,
        )
        print(report.table())
        if report.example:
            print(
                f"first pair as the model sees it:\n  prompt: {report.example['prompt']!r:.300}\n"
                f"  chosen: {report.example['chosen']!r:.300}\n  rejected: {report.example['rejected']!r:.300}"
            )
        if warning := report.warning():
            print(warning, file=sys.stderr)
        if histogram:
            print(f"length histogram written to {plot_lengths(report, histogram)}")
        return report

    return run()


if __name__ == "__main__":
    main()
