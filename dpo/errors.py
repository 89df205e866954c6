"""What the user sees when something is wrong: one-line errors instead of tracebacks.

A `UserError` is for mistakes the user can fix (a bad config key, a missing file, a row
without a `chosen` field). Recipes wrap their `main` in `exit_on_user_error`, which prints
`error: <message>` to stderr and exits with status 2. Bugs still raise normally.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys


class UserError(Exception):
    """An error in the user's input, with a message that says what to change."""


class RunStopped(Exception):
    """Training stopped on purpose (a signal, a non-finite loss); the message says what is safe on disk."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def hub_error(kind: str, name: str, err: Exception, remedy: str) -> UserError:
    """'could not load <kind> <name>: <first line of err>' plus how to use a local copy instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"could not load {kind} '{name}': {reason}\n  {remedy}")


# Context managers every entry point runs inside, registered by the modules that need one (this
# module sits below them all): dpo/train/safety/lock.py adds the scope that releases output-folder locks.
ENTRY_SCOPES: list = []


def _say(line: str) -> None:
    """`line` on stderr, on a line of its own even when a progress bar was drawing there (dpo/progress.py)."""
    from dpo.progress import end_open_progress_line

    end_open_progress_line(sys.stderr)
    print(line, file=sys.stderr, flush=True)


def exit_on_user_error(main):
    """Decorator for a script's entry point: UserError -> one-line message, exit status 2;
    RunStopped -> its message and exit status; Ctrl-C -> 'interrupted', exit status 130.
    The call runs inside every scope in ENTRY_SCOPES (output-folder locks are released however it ends)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with contextlib.ExitStack() as scopes:
                for scope in ENTRY_SCOPES:
                    scopes.enter_context(scope())
                return main(*args, **kwargs)
        except UserError as err:
            # Under N processes every process meets the same input mistake: one message per
            # machine (its local rank 0), since each machine's launcher shows its own output.
            if os.environ.get("LOCAL_RANK", "0") == "0":
                _say(f"error: {err}")
            raise SystemExit(2) from None
        except RunStopped as err:
            _say(f"stopped: {err}")
            raise SystemExit(err.exit_status) from None
        except KeyboardInterrupt:  # Ctrl-C outside training (which stops gracefully): no traceback
            _say("interrupted")
            raise SystemExit(130) from None

    return wrapper
