"""What the user sees when something is wrong: one-line errors instead of tracebacks.

A `UserError` is for mistakes the user can fix (a bad config key, a missing file, a row
without a `chosen` field). Recipes wrap their `main` in `exit_on_user_error`, which prints
`error: <message>` to stderr and exits with status 2. Bugs still raise normally.
"""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """An error in the user's input, with a message that says what to change."""


def hub_error(kind: str, name: str, err: Exception, remedy: str) -> UserError:
    """'could not load <kind> <name>: <first line of err>' plus how to use a local copy instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"could not load {kind} '{name}': {reason}\n  {remedy}")


def exit_on_user_error(main):
    """Decorator for a script's entry point: UserError -> one-line message, exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            # Under N processes every process meets the same input mistake: one message per
            # machine (its local rank 0), since each machine's launcher shows its own output.
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
