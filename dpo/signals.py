"""Stop signals during a save: the save is finished, then the run stops. A Ctrl-C is never dropped.

Python's default Ctrl-C raises KeyboardInterrupt wherever the program is, halfway through a file too; a
handler that only says "finished first" loses the stop (a rounds run went on through two more rounds and
exited 0). Every save a tool makes therefore runs inside `saving(what)`, the one place that holds signals:

  SIGINT/SIGTERM during a save    noted ("saving ...; it will be finished first"); the save
                                  goes on to its end, then the run stops: RunStopped, exit status
                                  128 + signal (130 Ctrl-C, 143 SIGTERM), the stop line saying what was
                                  written and what to run next
  again during the same save      noted too: the save is still finished first (kill -9 stops at once)
  training's checkpoint saves     the same, but training stops itself (`then`): the step ends, training
                                  stops there, and dpo/train/safety/interrupts.py says so

The saves: checkpoints (dpo/train/safety/checkpoints.py), the final files (dpo/train/trainer.py), the
rounds' samples, pairs, round.json and summary (dpo/rounds/), reference cache parts (dpo/train/speed/refstore.py),
the swap of folders built whole (dpo.folders.write_marked_folder: an export's merged model, evaluate's report) and of
`python -m dpo.models`' model folders. A folder or GGUF file still being built elsewhere in staging is not held:
a stop there is immediate, and the staging is removed (nothing half-written reaches its place).
Python runs signal handlers in the main thread only: a save made in another thread installs nothing, and the
main thread's handlers decide what a signal does meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from dpo.errors import RunStopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_ENV = "DPO_TEST_SIGNAL_AT"  # tests only, see kill_point

_saving: list[str] = []  # what is being written, outermost first
_noted: list[int] = []  # stop signals received meanwhile


def kill_point(point: str, step: int) -> None:
    """Test hook: `DPO_TEST_SIGNAL_AT=files:4` SIGKILLs this process at that point of the save of
    step 4 (`files:4:SIGINT` sends SIGINT instead; several, comma-separated), so tests can prove
    what a kill or a Ctrl-C at that exact moment leaves on disk. Points: step (end of an optimizer
    step), begin, files, marked (a checkpoint save), final-staged, final-cleared, final-moved, and
    `save-<kind>` at the start of each `saving` block that names its kind."""
    for spec in filter(None, os.environ.get(SIGNAL_ENV, "").split(",")):
        where, at, name = (spec.split(":") + ["SIGKILL"])[:3]
        if where == point and int(at) == step:
            os.kill(os.getpid(), getattr(signal, name))


def _note(signum, frame) -> None:
    from dpo.log import log  # accelerate; loaded by then in any run, and dpo.files (which uses this) stays light

    name = signal.Signals(signum).name
    still = "still " if _noted else ""
    _noted.append(signum)
    log(f"{name}: {still}saving {_saving[0]}; it will be finished first, then the run stops")


def _restore(previous: dict) -> int | None:
    """Put the handlers back; the first signal noted during the save (None if none), forgotten here."""
    for s, handler in previous.items():
        signal.signal(s, handler)
    first = _noted[0] if _noted else None
    _noted.clear()
    return first


@contextlib.contextmanager
def saving(what: str, kind: str = "", step: int = 0, then=None, advice: str = ""):
    """SIGINT/SIGTERM inside the block are noted, not acted on; once it ends, the run stops: `then(signum)` when
    given (training stops itself, at this step), else RunStopped naming `what`, followed by `advice` (what to
    run next). A block inside another save leaves the decision to the outer one. An exception leaving the block
    wins over a noted signal (it ends the run anyway). `kind`, `step`: the test hook `save-<kind>:<step>`."""
    if _saving:
        _saving.append(what)
        try:
            yield
        finally:
            _saving.pop()
        return
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _note) for s in STOP_SIGNALS}
    _saving.append(what)
    try:
        if kind:
            kill_point(f"save-{kind}", step)
        yield
    except BaseException:
        _saving.pop()
        _restore(previous)
        raise
    _saving.pop()
    signum = _restore(previous)
    if signum is None:
        return
    if then is not None:
        then(signum)
        return
    name = signal.Signals(signum).name
    raise RunStopped(f"{name} while saving {what}: the save was finished first. {advice}".rstrip(), 128 + signum)
