"""Which answer is better, when the data does not say chosen/rejected: label and score layouts.

dpo/data/pairs.py reads chosen/rejected columns. Many real preference sets instead hold two responses and
say which is better in another column, or give each response a score. `detect_preference` finds
these layouts from the column names (or from `label_column` / `score_columns` in a recipe's YAML);
`Preference.pick` decides, row by row, which response is chosen.

    layout        columns                                          e.g.
    label         two responses + a column naming the better one   PKU-Alignment/PKU-SafeRLHF: response_0, response_1,
                                                                   better_response_id | safer_response_id (0 or 1);
                                                                   a `preference` column (a, b, 0, 1, ... : the
                                                                   responses' column suffixes, or their names; tie)
                  ... a SHP label: 1 = the first is better         stanfordnlp/SHP: history, human_ref_A, human_ref_B,
                                                                   labels (1 = A, 0 = B), score_A / score_B
                  ... a signed strength: < 0 = the first           nvidia/HelpSteer2 preference: prompt, response_1,
                                                                   response_2, preference_strength (-3..3, 0 = tie)
    scores        two responses + one score each: higher wins      response_a, response_b, score_a, score_b
    completions   a list of {response, <score>}: best vs worst     openbmb/UltraFeedback: instruction, completions:
                                                                   [{response, overall_score, ...}]
    check         chosen/rejected + one score each                 chosen_score / rejected_score, score_chosen /
                                                                   score_rejected (HuggingFaceH4/ultrafeedback_binarized)

Where the scores alone decide (scores, completions, check), equal scores are a tie: the row is
dropped and counted. Where a label decides, scores that exist too are a check. Either way a row
whose scores say the rejected answer is better is dropped and counted (`CONTRADICTS`), never
trained on backwards; dpo.data.doctor reports both reasons. A layout that could be read two ways stops
with one line asking the user to choose (PKU-SafeRLHF has two labels: `label_column` picks one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo.errors import UserError

# Why a row has no usable preference; dpo.data.doctor drops these rows and counts them by reason.
TIE = "tie: neither answer preferred"
CONTRADICTS = "scores say the rejected answer is better"
TOO_FEW = "fewer than two completions"

# Two responses to choose between, as real datasets name them (first, second).
RESPONSE_PAIRS = (
    ("response_0", "response_1"),  # PKU-SafeRLHF
    ("response_1", "response_2"),  # HelpSteer2 preference
    ("response_a", "response_b"),
    ("human_ref_A", "human_ref_B"),  # SHP
)
SHP_PAIR = ("human_ref_A", "human_ref_B")
# Label columns detected next to a response pair, and how their value names the better response.
#   id          the value is the better response's column suffix (0/1, a/b, A/B) or its column name; "tie"
#   first_is_1  1 = the first response, 0 = the second (SHP's `labels`)
#   sign        < 0 = the first, > 0 = the second, 0 = tie (HelpSteer2's `preference_strength`)
LABEL_RULES = {
    "better_response_id": "id",
    "safer_response_id": "id",
    "preference": "id",
    "preference_strength": "sign",
}
SHP_LABEL = "labels"  # detected (first_is_1) only next to SHP's human_ref_A / human_ref_B
CHOSEN_SCORES = (
    ("chosen_score", "rejected_score"),
    ("score_chosen", "score_rejected"),
    ("chosen_rating", "rejected_rating"),
)
COMPLETIONS, COMPLETION_RESPONSE, COMPLETION_SCORE = "completions", "response", "overall_score"  # raw UltraFeedback
HISTORY = "history"  # SHP's prompt column, read as the prompt only for its layout


@dataclass
class Preference:
    """How one layout says which answer is better; `pick` applies it to a row."""

    kind: str  # "label", "scores", "completions" or "check"
    responses: tuple[str, str] = ("", "")  # the two answers (check: chosen, rejected); none for completions
    label: str | None = None
    rule: str = ""  # LABEL_RULES' meanings: "id", "first_is_1", "sign"
    scores: tuple[str, ...] = ()  # a score column per response; completions: the score key in each completion
    completions: str | None = None

    def columns(self) -> list[str]:
        """The data columns `pick` reads."""
        if self.kind == "completions":
            return [self.completions]
        return [*self.responses, *([self.label] if self.label else []), *self.scores]

    def describe(self) -> str:
        a, b = self.responses
        checked = f", checked by {' / '.join(self.scores)}" if self.scores and self.kind in ("label", "check") else ""
        if self.kind == "label":
            return f"the better of {a} / {b} by {self.label}{checked}"
        if self.kind == "scores":
            return f"the higher-scored of {a} / {b} by {' / '.join(self.scores)}, ties dropped"
        if self.kind == "completions":
            return f"best vs worst of {self.completions} by '{self.scores[0]}', ties dropped"
        return f"checked by {' / '.join(self.scores)}, ties dropped"

    def pick(self, raw: dict, where) -> tuple[dict, str, str, str]:
        """(row values, chosen field, rejected field, problem) for one row; `where(field)` names a field
        in an error. Completions become fields "completions[i].response" of the returned values."""
        if self.kind == "completions":
            return self._pick_completion(raw, where)
        a, b = self.responses
        if self.kind == "label":
            better = self._label_choice(raw[self.label], where(self.label))
        else:  # scores and check: the scores decide
            better = None
        scores = [_number(raw[c], where(c)) for c in self.scores]
        by_scores = None if not scores or scores[0] == scores[1] else (0 if scores[0] > scores[1] else 1)
        if self.kind == "check":
            problem = TIE if by_scores is None else (CONTRADICTS if by_scores == 1 else "")
            return raw, a, b, problem
        if self.kind == "scores":
            better = by_scores
        if better is None:
            return raw, a, b, TIE
        chosen, rejected = (a, b) if better == 0 else (b, a)
        contradicts = by_scores is not None and by_scores != better
        return raw, chosen, rejected, CONTRADICTS if contradicts else ""

    def _label_choice(self, value, where: str) -> int | None:
        """0 (the first response is better), 1 (the second), or None (a tie)."""
        a, b = self.responses
        if self.rule == "sign":
            x = _number(value, where)
            return None if x == 0 else (0 if x < 0 else 1)
        if self.rule == "first_is_1":
            x = _number(value, where)
            if x not in (0, 1):
                raise UserError(f"{where}: expected 1 ({a} is better) or 0 ({b} is better), got {value!r:.60}")
            return 0 if x == 1 else 1
        text = value
        if isinstance(value, float) and value.is_integer():
            text = int(value)
        text = str(text).strip() if not isinstance(text, bool) and text is not None else None
        names = {_suffix(a).lower(): 0, _suffix(b).lower(): 1, a.lower(): 0, b.lower(): 1}
        if text is not None and text.lower() == "tie":
            return None
        if text is None or text.lower() not in names:
            raise UserError(
                f"{where}: expected {_suffix(a)} ({a} is better), {_suffix(b)} ({b} is better) or tie, got {value!r:.60}"
            )
        return names[text.lower()]

    def _pick_completion(self, raw: dict, where) -> tuple[dict, str, str, str]:
        column, key = self.completions, self.scores[0]
        completions = raw[column]
        if not isinstance(completions, list):
            raise UserError(f"{where(column)}: expected a list of completions, got {type(completions).__name__}")
        values, scores = {}, []
        for i, completion in enumerate(completions):
            field = f"{column}[{i}]"
            if not isinstance(completion, dict) or COMPLETION_RESPONSE not in completion or key not in completion:
                raise UserError(
                    f"{where(field)}: expected {{'{COMPLETION_RESPONSE}': ..., '{key}': ...}}, got {completion!r:.80}"
                )
            values[f"{field}.{COMPLETION_RESPONSE}"] = completion[COMPLETION_RESPONSE]
            scores.append(_number(completion[key], where(f"{field}.{key}")))
        if len(scores) < 2:  # the fields must still exist: the row is converted, then dropped
            only = f"{column}[0].{COMPLETION_RESPONSE}"
            return {**raw, only: values.get(only, "")}, only, only, TOO_FEW
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        chosen, rejected = f"{column}[{best}].{COMPLETION_RESPONSE}", f"{column}[{worst}].{COMPLETION_RESPONSE}"
        return {**raw, **values}, chosen, rejected, TIE if scores[best] == scores[worst] else ""


def _suffix(column: str) -> str:
    """What tells a pair's two columns apart: response_0 -> 0, human_ref_A -> A."""
    return column.rsplit("_", 1)[-1]


def _number(value, where: str) -> float:
    """A score or label as a number; numbers written as text (CSV cells are text) are read too."""
    x = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            pass
    if x is None or math.isnan(x):
        got = "missing (no value)" if value is None else f"got {type(value).__name__} ({value!r:.60})"
        raise UserError(f"{where}: expected a number, {got}")
    return x


def _first_value(data, column: str):
    for value in data[:100][column]:  # an empty list says no kind (dpo/data/pairs.py _first_value)
        if value is not None and value != []:
            return value
    return None


def detect_preference(data, names: list[str], source: str, columns, chosen: str | None, rejected: str | None):
    """The label or score layout of `data` (a Preference), or None for plain chosen/rejected data.

    `columns`: the YAML's Columns (None when the caller has no column settings: its hints then point
    to recipes/dpo_any.py); `chosen` / `rejected`: the chosen/rejected columns found or named."""
    mappable = columns is not None
    label = getattr(columns, "label", None)
    scores = tuple(getattr(columns, "scores", None) or ())
    if label is not None and label not in names:
        raise UserError(f"{source}: label_column: '{label}' is not a column; the data has {names}")
    pairs = [p for p in RESPONSE_PAIRS if p[0] in names and p[1] in names]
    labels = [c for c in LABEL_RULES if c in names] + ([SHP_LABEL] if SHP_LABEL in names and SHP_PAIR in pairs else [])

    if chosen and rejected:  # the order is in the columns; scores, if any, are a check
        if label is not None:
            raise UserError(
                f"{source}: label_column '{label}' says which of two responses is better, and '{chosen}' / "
                f"'{rejected}' are already chosen / rejected; use one: drop label_column, or chosen_column / rejected_column"
            )
        if (chosen, rejected) in pairs and labels:  # e.g. PKU mapped as chosen=response_0, rejected=response_1
            how = f"set label_column: {labels[0]}" if mappable else "use recipes/dpo_any.py, which reads this layout"
            raise UserError(
                f"{source}: '{chosen}' / '{rejected}' are not chosen / rejected: {labels} say, row by row, which of "
                f"them is better. Do not map them as chosen/rejected; {how}"
            )
        named = _named_scores(scores, names, source, 2)
        found = named or next((p for p in CHOSEN_SCORES if p[0] in names and p[1] in names), ())
        return Preference("check", (chosen, rejected), scores=found) if found else None

    if COMPLETIONS in names and not pairs and _is_completions(_first_value(data, COMPLETIONS)):
        if label is not None:
            raise UserError(
                f"{source}: label_column: '{label}' needs two response columns; this data has a completions list"
            )
        if len(scores) > 1:
            raise UserError(
                f"{source}: score_columns: for a completions list name one key, the score inside each completion "
                f"(e.g. [{COMPLETION_SCORE}]); got {list(scores)}"
            )
        return Preference("completions", scores=scores or (COMPLETION_SCORE,), completions=COMPLETIONS)

    if not pairs:
        if label is not None or scores:
            setting = "label_column" if label is not None else "score_columns"
            raise UserError(
                f"{source}: {setting} needs two response columns, one of {[list(p) for p in RESPONSE_PAIRS]}, "
                f"or chosen / rejected; the data has {names}"
            )
        return None
    if len(pairs) > 1:
        raise UserError(f"{source}: the response columns could be read as {[list(p) for p in pairs]}; keep one pair")
    a, b = pairs[0]
    named = _named_scores(scores, names, source, 2)
    found = named or _pair_scores(a, b, names)
    if label is not None:
        rule = "first_is_1" if (label, (a, b)) == (SHP_LABEL, SHP_PAIR) else LABEL_RULES.get(label, "id")
        return Preference("label", (a, b), label, rule, found)
    if len(labels) > 1:
        how = f"set label_column: {labels[0]} (or another)" if mappable else "use recipes/dpo_any.py, which names it"
        raise UserError(f"{source}: {labels} each say which of {a} / {b} is better; choose the one to train on: {how}")
    if labels:
        rule = "first_is_1" if labels[0] == SHP_LABEL else LABEL_RULES[labels[0]]
        return Preference("label", (a, b), labels[0], rule, found)
    if found:
        return Preference("scores", (a, b), scores=found)
    how = (
        f"name it: label_column: <column> (its value: {_suffix(a)} or {_suffix(b)}), or score_columns: "
        f"[<score of {a}>, <score of {b}>]"
        if mappable
        else "use recipes/dpo_any.py, which names it"
    )
    raise UserError(f"{source}: two responses ({a}, {b}) and no column saying which is better; {how}")


def _named_scores(scores: tuple, names: list[str], source: str, count: int) -> tuple:
    if not scores:
        return ()
    if len(scores) != count:
        raise UserError(f"{source}: score_columns: name {count} columns, a score per response; got {list(scores)}")
    missing = [c for c in scores if c not in names]
    if missing:
        raise UserError(f"{source}: score_columns: {missing} not a column; the data has {names}")
    return tuple(scores)


def _pair_scores(a: str, b: str, names: list[str]) -> tuple:
    """Score columns named after a response pair: score_A / score_B (SHP), response_0_score / response_1_score."""
    for candidate in ((f"score_{_suffix(a)}", f"score_{_suffix(b)}"), (f"{a}_score", f"{b}_score")):
        if candidate[0] in names and candidate[1] in names:
            return candidate
    return ()


def _is_completions(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and COMPLETION_RESPONSE in value[0]
