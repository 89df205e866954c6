"""What the user sees when something is wrong: one-line errors instead of tracebacks.

A `UserError` is for mistakes the user can fix (a bad config key, a missing file, a row
without a `chosen` field). Recipes wrap their `main` in `exit_on_user_error`, which prints
`error: <message>` to stderr and exits with status 2. Bugs still raise normally.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings


class UserError(Exception):
    """An error in the user's input, with a message that says what to change."""

    # False on a process of a multi-process launch that leaves the message to its machine's local rank 0
    # (set by dpo/gate/launch.py, which knows the launchers' variables)
    shown_here = True


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


class _HeldWarnings:
    """Warnings raised before an entry point loads weights are held, then shown when weights start to load
    (`release_held_warnings`, called where they do) or the entry point ends: a setting the gate refuses or a
    bad row gets its `error:` line alone, without the libraries' notices printed on the way there (TRL's
    deprecations print while the arguments are parsed). Held warnings are dropped only when a UserError
    ends the call before weights loaded; a bug's traceback comes after them. Filters still apply while
    held (an "error" filter raises at once); only the printing waits."""

    def __init__(self):
        self.pending: list[tuple] | None = None
        self.shown = None

    def hold(self) -> None:
        if self.pending is None:  # nested entry points (a recipe calling another's main) hold once
            self.pending, self.shown = [], warnings.showwarning
            warnings.showwarning = self._keep

    def _keep(self, *warning) -> None:
        if self.pending is None:  # released, then put back by code that saved it (logging.captureWarnings(False))
            self.shown(*warning)
            return
        self.pending.append(warning)

    def release(self, show: bool = True) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if warnings.showwarning == self._keep:
            warnings.showwarning = self.shown
        for warning in pending if show else ():
            warnings.showwarning(*warning)


_held = _HeldWarnings()


def release_held_warnings() -> None:
    """Weights are about to load (every check before them passed): show the warnings held since the entry
    point started, and stop holding."""
    _held.release()


def exit_on_user_error(main):
    """Decorator for a script's entry point: UserError -> one-line message, exit status 2;
    RunStopped -> its message and exit status; Ctrl-C -> 'interrupted', exit status 130.
    The call runs inside every scope in ENTRY_SCOPES (output-folder locks are released however it ends)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        outermost = _held.pending is None
        _held.hold()
        try:
            with contextlib.ExitStack() as scopes:
                for scope in ENTRY_SCOPES:
                    scopes.enter_context(scope())
                return main(*args, **kwargs)
        except UserError as err:
            if outermost:
                _held.release(show=False)  # the error line alone (once weights loaded, they were shown already)
            # Under N processes every process meets the same input mistake: one message per
            # machine (dpo/gate/launch.py error_shown_here), since each machine's launcher shows its own output.
            if err.shown_here:
                _say(f"error: {err}")
            raise SystemExit(2) from None
        except RunStopped as err:
            _say(f"stopped: {err}")
            raise SystemExit(err.exit_status) from None
        except KeyboardInterrupt:  # Ctrl-C outside training (which stops gracefully): no traceback
            _say("interrupted")
            raise SystemExit(130) from None
        finally:
            if outermost:
                _held.release()

    return wrapper
