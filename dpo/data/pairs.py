"""Preference rows in any supported layout -> TRL's explicit-prompt pairs, one output row per input row.

    raw = load_preference_data("trl-lib/ultrafeedback_binarized")   # dpo/data/loading.py
    pairs, layout = to_pairs(raw, source="trl-lib/ultrafeedback_binarized")
    # recipes call dpo.data.doctor.check_data(raw, source, tokenizer): to_pairs, the chat template (returned as report.chat_template), checks

Layouts, detected from the column names and the first row (extra columns are ignored):

    layout           columns                                                   e.g.
    text             prompt | question | instruction, chosen, rejected: text   jondurbin/truthy-dpo-v0.1 (+ system),
                     [+ system | system_prompt]                                Intel/orca_dpo_pairs (question + system)
    conversational   chosen, rejected: message lists [{"role", "content"}]     trl-lib/ultrafeedback_binarized (implicit
                     [+ prompt: text or message list]                          prompt), HuggingFaceH4/ultrafeedback_binarized
    hh               chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..."    Anthropic/hh-rlhf (multi-turn)
                     transcripts, no prompt column

Two responses and a label or a score saying which is better (PKU-SafeRLHF, SHP, HelpSteer2, raw
UltraFeedback; `label_column:` / `score_columns:`): dpo/data/preferences.py picks chosen and rejected per row.
Conversational rows may call tools (assistant `tool_calls`, `tool` turns, a `tools` column): dpo/data/tools.py.
Nested layouts (OpenAI's input.messages / preferred_output / non_preferred_output) are read through
dpo/data/nested.py as columns named by their paths.

Any other column names: `Columns(prompt="query", chosen="good", ...)`, in a recipe's YAML as
`prompt_column: query`, `chosen_column: good`, ... When chosen and rejected hold the whole
conversation (hh, conversational without a prompt, or with a prompt *string* as in H4's
ultrafeedback), the prompt is the turns they share, up to the last assistant reply.

Output, one row per input row (nothing is dropped here: `problem` says what is wrong with a row
and dpo.data.doctor drops and counts it), in TRL's explicit-prompt format:

    prompt_format="chat" (default)  prompt/chosen/rejected are message lists; TRL renders them with the
                                    tokenizer's chat template (dpo/data/formats.py: PLAIN_CHAT_TEMPLATE when it has none).
                                    Text rows become [system], user: prompt / assistant: answer.
    prompt_format="text"            plain strings, joined as they are: TRL trains on prompt + chosen + EOS.
                                    Text rows: "<system>\\n\\n<prompt>" (or `text_format(row)`, e.g. phi2_qa_format);
                                    hh rows: the transcript up to and including the last "\\n\\nAssistant:".

Chat rows go to TRL as messages, not as text we render: TRL then tokenizes them with the chat
template itself (no second BOS from tokenizing a rendered text, no EOS appended after the
template's own end of turn), and dpo.data.doctor counts tokens the same way.

Schema errors (missing value, wrong type, malformed message) stop with the file, the row and
the field (dpo/data/loading.py: RowLocator).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from datasets import Dataset

from dpo.data.formats import plain_text_format
from dpo.data.loading import FILE_COLUMN, FILE_ROW_COLUMN, RowLocator, late_system_error, messages_field, text_field
from dpo.data.nested import unnest
from dpo.data.preferences import HISTORY, Preference, detect_preference
from dpo.data.prompts import DIVERGE, NO_SHARED_PROMPT, parse_hh, reply_problem, split_hh_text, split_shared_prompt  # noqa: F401  (DIVERGE: callers import the drop reasons from here)
from dpo.data.tools import TOOLS_COLUMN, offers_tools, pairs_features, tools_field
from dpo.errors import UserError

# Column names tried, in order, when the YAML names none (`prompt_column:` etc.).
PROMPT_NAMES = ("prompt", "question", "instruction")
SYSTEM_NAMES = ("system", "system_prompt")

# Why a row cannot be used as it is; dpo.data.doctor drops these rows and counts them by reason.
EMPTY_PROMPT = "empty prompt"  # no user turn with any text: nothing to condition the answers on


# ── layouts ──────────────────────────────────────────────────────────────────────────


@dataclass
class Columns:
    """Column names when the data's differ from the usual ones; None = detect."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = None
    label: str | None = None  # the column saying which of two responses is better (dpo/data/preferences.py)
    scores: list[str] | None = None  # a score column per response, or the score key of a completions list
    tools: str | None = None  # the tools each row offers (conversational rows; dpo/data/tools.py)


@dataclass
class Layout:
    """What `detect_layout` found: the kind of data and the columns it reads."""

    kind: str  # "text", "conversational" or "hh"
    chosen: str
    rejected: str
    prompt: str | None = None
    prompt_kind: str | None = None  # "text" or "messages" when there is a prompt column
    system: str | None = None
    full_conversations: bool = False  # chosen/rejected start with the prompt's turns (first row)
    preference: Preference | None = None  # label / score layouts: which answer is chosen, row by row
    tools: str | None = None  # the column of the tools offered (dpo/data/tools.py; refused on text rows)

    def describe(self) -> str:
        """e.g. 'text pairs (prompt=question, chosen, rejected, system)'; label and score layouts say
        how the chosen answer is picked: 'text pairs (prompt, system; chosen = the better of ...)'."""
        answers = (("chosen", self.chosen), ("rejected", self.rejected))
        if self.preference is not None and self.preference.kind != "check":
            answers = ()
        used = [
            role if col == role else f"{role}={col}"
            for role, col in (("prompt", self.prompt), *answers, ("system", self.system), ("tools", self.tools))
            if col
        ]
        if self.preference is not None:
            how = self.preference.describe()
            used.append(how if self.preference.kind == "check" else f"chosen = {how}")
        if self.kind == "conversational":
            kind = "conversational, prompt = " + (
                "shared turns"
                if self.prompt is None or (self.full_conversations and self.prompt_kind != "messages")
                else f"{self.prompt} column"
            )
        else:
            kind = {"text": "text pairs", "hh": "Human/Assistant transcripts, prompt = shared turns"}[self.kind]
        return f"{kind} ({', '.join(used)})"


def _first_value(data: Dataset, column: str):
    """The first non-null, non-empty value of `column` (its kind decides the layout): an empty list says no kind,
    that row is dropped as empty later. [] when only empty lists come first, None when nothing does."""
    values = data[:100][column]
    found = next((v for v in values if v is not None and v != []), None)
    return [] if found is None and any(v == [] for v in values) else found


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], key: str, source: str) -> str | None:
    if wanted:
        if wanted not in names:
            raise UserError(f"{source}: {key}: '{wanted}' is not a column; the data has {names}")
        return wanted
    return next((c for c in candidates if c in names), None)


def detect_layout(data: Dataset, source: str, columns: Columns | None = None) -> Layout:
    """Which layout `data` is in, from its column names and first row; UserError if none fits."""
    # Hints name the column options only to callers that have them (dpo_any.py, the doctor); the
    # phi-2 recipe passes no Columns and gets pointed at dpo_any.py instead.
    mappable = columns is not None
    columns = columns or Columns()
    names = [c for c in data.column_names if c not in (FILE_COLUMN, FILE_ROW_COLUMN)]
    prompt = _pick(names, columns.prompt, PROMPT_NAMES, "prompt_column", source)  # named columns are checked first
    system = _pick(names, columns.system, SYSTEM_NAMES, "system_column", source)
    tools = _pick(names, columns.tools, (TOOLS_COLUMN,), "tools column", source)
    chosen = _pick(names, columns.chosen, ("chosen",), "chosen_column", source)
    rejected = _pick(names, columns.rejected, ("rejected",), "rejected_column", source)
    preference = detect_preference(data, names, source, columns if mappable else None, chosen, rejected)
    if preference is not None and preference.kind != "check":  # the first response decides the kind of data
        chosen = rejected = preference.columns()[0]
        if prompt is None and preference.responses == ("human_ref_A", "human_ref_B") and HISTORY in names:
            prompt = HISTORY  # SHP: the Reddit post the comments answer
    missing = [f for f, c in (("chosen", chosen), ("rejected", rejected)) if c is None]
    if missing:
        how = (
            "set chosen_column: / rejected_column: in the YAML (--chosen_column / --rejected_column); if the data "
            "has two responses and a column saying which is better, or a score per response, set label_column: / "
            "score_columns: instead"
            if mappable
            else "rename them, or use recipes/dpo_any.py, which maps other column names"
        )
        raise UserError(
            f"{source}: missing field(s) {missing}; the data has {names}. If yours are named differently, {how}"
        )
    first = _first_value(data, chosen)
    if preference is not None and preference.kind == "completions":  # the first completion's response
        first = (first or [{}])[0].get("response")
    prompt_value = _first_value(data, prompt) if prompt else None
    prompt_kind = None if prompt is None else ("messages" if _is_messages(prompt_value) else "text")
    if _is_messages(first):
        return Layout(
            "conversational",
            chosen,
            rejected,
            prompt,
            prompt_kind,
            system,
            first[0].get("role") != "assistant",
            preference,
            tools,
        )
    if isinstance(first, str):
        if prompt is not None:
            if prompt_kind == "messages":
                raise UserError(
                    f"{source}: column '{prompt}' holds messages but '{chosen}' holds text; use one kind for both"
                )
            return Layout("text", chosen, rejected, prompt, "text", system, preference=preference, tools=tools)
        if "Assistant:" in first and "Human:" in first:
            return Layout("hh", chosen, rejected, None, None, system, preference=preference, tools=tools)
        how = (
            "name the prompt column in the YAML: prompt_column: <name>"
            if mappable
            else "rename it to prompt, or use recipes/dpo_any.py, which maps other column names"
        )
        raise UserError(
            f"{source}: no prompt column (looked for {list(PROMPT_NAMES)}) and '{chosen}' is not a "
            f"Human/Assistant transcript; {how}"
        )
    if first is None:
        raise UserError(f"{RowLocator(source, data).at(1, chosen)}: missing (no value)")
    raise UserError(
        f"{RowLocator(source, data).at(1, chosen)}: expected text or a list of messages, got {type(first).__name__} ({first!r:.60})"
    )


# ── conversions ──────────────────────────────────────────────────────────────────────


def _system_message(system) -> list[dict]:
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _with_system(prompt: list[dict], system: str | None, rows: RowLocator, n: int, layout: Layout) -> list[dict]:
    """`prompt` opened by the system column's text when it has no system message of its own (an empty one gives
    way); the same text twice is kept once; two that differ are refused in one line (one would be dropped)."""
    if prompt and prompt[0]["role"] == "system" and not prompt[0]["content"].strip():
        prompt = prompt[1:]  # an empty system message says nothing: the column's, if any, takes its place
    if prompt and prompt[0]["role"] != "system":
        return _system_message(system) + prompt
    if prompt and _system_message(system) and prompt[0]["content"].strip() != system.strip():
        raise UserError(
            f"{rows.at(n, layout.system)}: the prompt opens with a system message of its own (a transcript's "
            "preamble, or a message), and it differs from this one; keep one (the column, or the message)"
        )
    return prompt


def _convert_row(raw: dict, layout: Layout, rows: RowLocator, n: int, chat: bool, text_format) -> dict:
    """One input row -> {prompt, chosen, rejected, problem}; UserError on a schema error."""
    if layout.preference is not None:  # label / score layouts: this row's chosen and rejected fields
        raw, chosen, rejected, problem = layout.preference.pick(raw, lambda field: rows.at(n, field))
        pair = _convert_row(
            raw,
            dataclasses.replace(layout, chosen=chosen, rejected=rejected, preference=None),
            rows,
            n,
            chat,
            text_format,
        )
        return {**pair, "problem": problem or pair["problem"]}
    system = None
    if layout.system is not None and raw.get(layout.system) is not None:
        system = text_field(raw[layout.system], rows.at(n, layout.system))
    if layout.kind != "conversational" and layout.tools and offers_tools(raw[layout.tools]):
        raise UserError(
            f"{rows.at(n, layout.tools)}: tools offered on a row of text, where they would be ignored: tools render "
            "through a chat template, so give prompt, chosen and rejected as lists of messages"
        )

    if layout.kind == "text":
        fields = {"system": system or ""}
        for role, column in (("prompt", layout.prompt), ("chosen", layout.chosen), ("rejected", layout.rejected)):
            fields[role] = text_field(raw[column], rows.at(n, column))
        problem = "" if fields["prompt"].strip() else EMPTY_PROMPT
        if not chat:
            return {**text_format(fields), "problem": problem}
        return {
            "prompt": _system_message(system) + [{"role": "user", "content": fields["prompt"]}],
            "chosen": [{"role": "assistant", "content": fields["chosen"]}],
            "rejected": [{"role": "assistant", "content": fields["rejected"]}],
            "problem": problem,
        }

    if layout.kind == "hh":
        chosen = text_field(raw[layout.chosen], rows.at(n, layout.chosen))
        rejected = text_field(raw[layout.rejected], rows.at(n, layout.rejected))
        if not chat:
            prompt, chosen, rejected, problem = split_hh_text(chosen, rejected)
            problem = problem or _empty_prompt_problem(parse_hh(prompt))
            turns = parse_hh(prompt)
            if system and system.strip() and _with_system(turns, system, rows, n, layout) != turns:
                prompt = system + prompt  # no preamble of its own (one that differs is refused)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem}
        prompt, chosen, rejected, problem = split_shared_prompt(parse_hh(chosen), parse_hh(rejected))
        prompt = _with_system(prompt, system, rows, n, layout)
        problem = problem or _empty_prompt_problem(prompt)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem}

    # conversational
    chosen = messages_field(raw[layout.chosen], rows.at(n, layout.chosen))
    rejected = messages_field(raw[layout.rejected], rows.at(n, layout.rejected))
    if layout.prompt_kind == "messages":
        prompt = messages_field(raw[layout.prompt], rows.at(n, layout.prompt))
        k = len(prompt)
        if chosen[:k] == prompt and rejected[:k] == prompt:  # full conversations: cut the prompt off
            chosen, rejected = chosen[k:], rejected[k:]
        problem = NO_SHARED_PROMPT if not prompt else reply_problem(chosen, rejected)
    elif layout.prompt_kind == "text" and chosen and chosen[0]["role"] == "assistant":
        # prompt string + answer-only message lists
        prompt = [{"role": "user", "content": text_field(raw[layout.prompt], rows.at(n, layout.prompt))}]
        problem = reply_problem(chosen, rejected)
    else:
        # implicit prompt (trl-lib) or prompt string + full conversations (HuggingFaceH4): shared turns
        prompt, chosen, rejected, problem = split_shared_prompt(chosen, rejected)
    prompt = _with_system(prompt, system, rows, n, layout)
    problem = problem or _empty_prompt_problem(prompt)
    for column, reply in ((layout.chosen, chosen), (layout.rejected, rejected)):  # answer-only lists after a prompt
        if late := next((i for i, m in enumerate(reply, start=1) if m["role"] == "system"), None):
            raise UserError(late_system_error(rows.at(n, column), late))
    tools = tools_field(raw[layout.tools], rows.at(n, layout.tools)) if layout.tools else None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": problem, "tools": tools}


def _empty_prompt_problem(prompt: list[dict]) -> str:
    """EMPTY_PROMPT when no user turn of the prompt holds any text (a system text alone is no prompt)."""
    return "" if any(m["role"] == "user" and m["content"].strip() for m in prompt) else EMPTY_PROMPT


def to_pairs(
    data: Dataset,
    source: str,
    columns: Columns | None = None,
    prompt_format: str = "chat",
    text_format=None,
    progress: bool | None = None,
) -> tuple[Dataset, Layout]:
    """Convert every row of `data` to TRL's explicit-prompt format; see the module docstring.

    Returns (pairs, layout). `pairs` has one row per input row, in order, with columns
    prompt, chosen, rejected, row (1-based input row number) and problem ("" or why the row is
    unusable). Schema errors (missing value, wrong type, malformed message) raise UserError
    naming the source, row and field. `text_format(row)` formats text rows in text format
    (default `plain_text_format`); it takes {system, prompt, chosen, rejected} strings.
    """
    if prompt_format not in ("chat", "text"):
        raise UserError(f"prompt_format: '{prompt_format}' is not one of ['chat', 'text']")
    if len(data) == 0:
        raise UserError(f"{source}: the data has no rows")
    named = columns is not None and any((columns.prompt, columns.chosen, columns.rejected))
    data, nested = unnest(data, source, named)  # OpenAI's input.messages / preferred_output / ...: dpo/data/nested.py
    if nested:
        columns = dataclasses.replace(columns or Columns(), **nested)
    layout = detect_layout(data, source, columns)
    chat = prompt_format == "chat"
    if text_format is not None and layout.kind != "text":  # first: a recipe with its own format has no prompt_format
        raise UserError(
            f"{source}: this recipe's prompt format takes single-turn text rows (prompt, chosen, rejected); "
            f"this data is {layout.describe()}. Use recipes/dpo_any.py, which reads every supported layout"
        )
    if not chat and layout.kind == "conversational":
        raise UserError(f"{source}: conversational data (message lists) needs prompt_format: chat")
    text_format = text_format or plain_text_format
    rows = RowLocator(source, data)
    wanted = [c for c in (layout.prompt, layout.chosen, layout.rejected, layout.system, layout.tools) if c]
    if layout.preference is not None:
        wanted = list(dict.fromkeys([*wanted, *layout.preference.columns()]))
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], TOOLS_COLUMN: [], "row": [], "problem": []}
    batch_size = 1000
    from tqdm.auto import tqdm

    show = len(data) >= 20_000 if progress is None else progress
    n = 0
    for batch in tqdm(
        data.select_columns(wanted).iter(batch_size=batch_size),
        total=-(-len(data) // batch_size),
        desc="converting rows (batches of 1000)",
        disable=not show,
        file=sys.stderr,
    ):
        for values in zip(*(batch[c] for c in wanted)):
            n += 1
            pair = _convert_row(dict(zip(wanted, values)), layout, rows, n, chat, text_format)
            for key in ("prompt", "chosen", "rejected", "problem", TOOLS_COLUMN):
                out[key].append(pair.get(key))
            out["row"].append(n)
    assert n == len(data), "every input row gives exactly one output row"
    features = pairs_features(out)  # rows with tool calls or tools: each message kept as the JSON it is
    if features is None:
        del out[TOOLS_COLUMN]
    return Dataset.from_dict(out, features=features), layout
