"""The kinds of constraint the settings table (dpo/gate/table.py) is written in.

A rule is data: its bounds, and why they exist. It answers three questions, so one table serves the
check, the error message and the test that tries every bound:

    rule.ok(value)       is this value allowed?
    rule.describe()      the bound in words: "must be >= 1", "must lie in [0, 1)", "must be one of a, b"
    rule.outside()       values just outside the bound (tests/gate/test_table.py sets each one and
                         expects the gate to refuse it)

Every numeric rule also refuses NaN and infinities: `nan > 0` is False but `nan >= 0 or x` chains
are easy to get wrong, and an infinite learning rate, epsilon or clipping norm is never meant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Bound:
    """A number in [low, high] (each end open or closed, either end absent), finite, optionally whole.

    `unset`: values that mean "not set" and are allowed as they are (None, -1 for max_steps, "auto").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    unset: tuple = ()
    why: str = ""

    def ok(self, value) -> bool:
        if any(value is u or (type(value) is type(u) and value == u) for u in self.unset):
            return True
        if not _number(value) or not math.isfinite(value):
            return False
        if self.whole and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            bound = f"must lie in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bound = f"must be {'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            bound = f"must be {'<' if self.high_open else '<='} {_fmt(self.high)}"
        else:
            bound = "must be a finite number"
        shown = [_fmt(u) if u is not None else "null" for u in self.unset]
        return bound + (f", or {' / '.join(shown)} for unset (no limit)" if shown else "")

    def outside(self) -> list:
        """The nearest refused values: each end crossed by one (whole) or a hair (real), and NaN."""
        out = []
        for end, is_open, sign in ((self.low, self.low_open, -1), (self.high, self.high_open, +1)):
            if end is None:
                continue
            if self.whole:
                out.append(int(end) if is_open else int(end) + sign)
            else:
                out.append(end if is_open else end + sign * max(abs(end), 1.0) * 1e-6)
        if not self.whole:
            out.append(float("nan"))
        return [v for v in out if v not in self.unset]


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (for settings the parsers take as free text)."""

    values: tuple
    why: str = ""

    def ok(self, value) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "must be one of " + ", ".join(map(str, self.values))

    def outside(self) -> list:
        return ["not-a-choice"]


@dataclass(frozen=True)
class Named:
    """A name a library registers, read when checked (`names()`: so a name an upgrade adds passes), or
    text of a declared form (`form(value)`, described as `form_text`), or unset (None)."""

    names: Callable[[], tuple]
    form: Callable[[str], bool]
    form_text: str
    why: str = ""

    def ok(self, value) -> bool:
        return value is None or (isinstance(value, str) and (value in self.names() or self.form(value)))

    def describe(self) -> str:
        names = ", ".join(self.names())
        return f"must be {f'one of {names}, ' if names else ''}{self.form_text}, or null for the default"

    def outside(self) -> list:
        return ["not-a-choice"]


@dataclass(frozen=True)
class Each:
    """Every item of a list setting obeys `rule` (None: the setting is unset)."""

    rule: Bound

    @property
    def why(self) -> str:
        return self.rule.why

    def ok(self, value) -> bool:
        return value is None or (isinstance(value, (list, tuple)) and all(self.rule.ok(v) for v in value))

    def describe(self) -> str:
        return "each entry " + self.rule.describe()

    def outside(self) -> list:
        return [[v] for v in self.rule.outside()]


@dataclass(frozen=True)
class Keys:
    """A mapping handed to a library function as keyword arguments: each key one it takes, each value of the
    kind its parameter is annotated with; or unset (None). `keys()` reads them from the function when checked
    (dpo/gate/keywords.py), so a key an upgrade adds passes; `source` names the function for the message."""

    keys: Callable[[], dict]
    source: str
    why: str = ""
    file_ok: bool = False  # text that is not a JSON mapping names a JSON file (transformers reads it)

    def problem(self, name: str, value) -> str | None:
        from dpo.gate.keywords import kind_problem

        if value is None or (self.file_ok and isinstance(value, str)):
            return None
        if not isinstance(value, dict):
            return f"{name} takes a mapping of {self.source}'s keyword arguments; got {value!r:.60}"
        keys, wrong = self.keys(), []
        for key, item in value.items():
            if key not in keys:
                wrong.append(f"{name}.{key} is not a key it takes ({self.describe()})")
            elif found := kind_problem(item, keys[key]):
                wrong.append(f"{name}.{key} {found}")
        return "; ".join(wrong) or None

    def ok(self, value) -> bool:
        return self.problem("", value) is None

    def describe(self) -> str:
        return f"the keys {self.source} takes: {', '.join(sorted(self.keys())) or 'none'}"

    def outside(self) -> list:
        return [{"not_a_key": 1}]


def _fmt(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def at_least(n, why: str, whole: bool = True, unset: tuple = ()) -> Bound:
    return Bound(low=n, whole=whole, unset=unset, why=why)


def positive(why: str, unset: tuple = ()) -> Bound:
    return Bound(low=0, low_open=True, unset=unset, why=why)


def non_negative(why: str, whole: bool = False, unset: tuple = ()) -> Bound:
    return Bound(low=0, whole=whole, unset=unset, why=why)


def fraction(why: str, high_open: bool = True, unset: tuple = ()) -> Bound:
    """[0, 1) by default; [0, 1] with high_open=False."""
    return Bound(low=0, high=1, high_open=high_open, unset=unset, why=why)
