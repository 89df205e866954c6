"""Progress bars that never stand in front of an error line.

- `datasets_progress_off`: the datasets library draws a bar ("Generating train split") on the first,
  uncached read of a data file, before our checks have looked at a row; when a row is wrong, the
  user's first line would be that bar and not the `error:` line. Reading and checking data is
  seconds, so its bars are switched off meanwhile (and restored after, for training's own bars).
- `end_open_progress_line`: a bar that is drawing when an error stops a run (tqdm redraws its line
  with '\r' and no newline) would have the error appended to it; `dpo.errors` calls this first, and
  it starts a new line when a bar is open on that stream.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def datasets_progress_off():
    """Inside: the datasets library draws no progress bar; restored after. Left alone when the user chose
    with HF_DATASETS_DISABLE_PROGRESS_BARS (which the datasets library gives priority). Usable as a decorator."""
    import datasets

    switch = "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ and datasets.is_progress_bar_enabled()
    if switch:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            datasets.enable_progress_bars()


def open_bars_on(stream) -> list:
    """The tqdm bars that have drawn on `stream` and are not closed (their line has no newline yet).
    Empty when tqdm was never imported."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return []
    bars = []
    for bar in list(std.tqdm._instances):
        if getattr(bar, "disable", True) or not hasattr(bar, "last_print_t"):
            continue
        target = getattr(bar, "fp", None)
        target = getattr(target, "_wrapped", target)  # tqdm wraps the file it writes to
        if target is stream and bar.last_print_t >= bar.start_t + bar.delay:  # drawn at least once
            bars.append(bar)
    return bars


def end_open_progress_line(stream=None) -> bool:
    """Write a newline to `stream` (default: sys.stderr) when a progress bar is open on it, so the next
    message starts on its own line. Returns whether it did."""
    stream = sys.stderr if stream is None else stream
    if not open_bars_on(stream):
        return False
    stream.write("\n")
    return True
