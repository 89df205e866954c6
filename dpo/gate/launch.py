"""The launcher's environment variables, checked before anything reads them, and which process prints an error.

torchrun and `accelerate launch` start N copies of an entry point and tell each who it is through environment
variables. accelerate reads them when its state is first built (the recipes' argument parsing): a stray or
inconsistent one there gives a message that does not name it ("MASTER_ADDR env was not set" for a lone
WORLD_SIZE=2), a hang waiting for processes that will never come, or a silent single process (WORLD_SIZE=x is
read as 1). Every entry point (dpo.errors.exit_on_user_error) runs `check_launch_environment` first, through the
scope registered below; dpo/__init__.py imports this module, so no entry point runs without it.

A UserError is printed once per job where a launcher started the processes: by each machine's local rank 0 (each
machine's launcher shows its own processes' output). Everywhere else (one process, a hand-set environment, a
launcher this table does not know) the process that meets it prints it: a single process with stray variables
must never exit 2 in silence.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from dpo.errors import ENTRY_SCOPES, UserError


@dataclass(frozen=True)
class LaunchVariable:
    low: int
    high: int | None
    means: str


# Each variable a launcher sets, where set: a whole number in [low, high].
VARIABLES = {
    "WORLD_SIZE": LaunchVariable(1, None, "processes in the whole job"),
    "RANK": LaunchVariable(0, None, "this process's number in the job"),
    "LOCAL_RANK": LaunchVariable(0, None, "this process's number on its machine"),
    "LOCAL_WORLD_SIZE": LaunchVariable(1, None, "processes on this machine"),
    "MASTER_PORT": LaunchVariable(1, 65535, "the rendezvous port of process 0"),
}
# (smaller, larger, strict): what one process's numbers must say about each other. An unset WORLD_SIZE is 1
# (accelerate's reading); an unset LOCAL_WORLD_SIZE says nothing.
RELATIONS = (
    ("RANK", "WORLD_SIZE", True),
    ("LOCAL_RANK", "WORLD_SIZE", True),
    ("LOCAL_RANK", "LOCAL_WORLD_SIZE", True),
    ("LOCAL_WORLD_SIZE", "WORLD_SIZE", False),
)
# What the processes of a job need to find each other (torch's env:// rendezvous). A launcher sets them all
# together; any one of these variables without the others was set by hand or left over from another job.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set by the launchers that start every process themselves: torchrun (and `accelerate launch`, which runs it),
# mpirun (Open MPI, MPICH). Under them the other processes exist and local rank 0 speaks for its machine.
LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
ONE_PROCESS = "unset it to run one process, or start the processes with torchrun or accelerate launch, which set them"


def _number(name: str, environ) -> int | None:
    """The variable as a whole number in its range (None when unset); UserError naming it otherwise."""
    if name not in environ:
        return None
    raw, spec = environ[name], VARIABLES[name]
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    high = f"..{spec.high}" if spec.high else " or more"
    if value is None or value < spec.low or (spec.high is not None and value > spec.high):
        raise UserError(
            f"environment variable {name}={raw!r} ({spec.means}) must be a whole number {spec.low}{high}; {ONE_PROCESS}"
        )
    return value


def check_launch_environment(environ=None) -> None:
    """UserError naming the launcher variable that is malformed, contradicts another, or lacks its rendezvous."""
    environ = os.environ if environ is None else environ
    numbers = {name: _number(name, environ) for name in VARIABLES}
    sizes = {**numbers, "WORLD_SIZE": 1 if numbers["WORLD_SIZE"] is None else numbers["WORLD_SIZE"]}
    for small, large, strict in RELATIONS:
        a, b = sizes[small], sizes[large]
        if a is not None and b is not None and (a >= b if strict else a > b):
            given = f"{large}={b}" if large in environ else f"{large} is not set (1 process)"
            raise UserError(
                f"environment variable {small}={a} ({VARIABLES[small].means}) must be "
                f"{'below' if strict else 'at most'} {large}, but {given}; {ONE_PROCESS}"
            )
    # accelerate sets up torch.distributed when LOCAL_RANK is set or WORLD_SIZE is above 1 (env:// rendezvous):
    # then every rendezvous variable must be there
    if "LOCAL_RANK" in environ or sizes["WORLD_SIZE"] > 1:
        asks = " and ".join(f"{n}={environ[n]}" for n in ("LOCAL_RANK", "WORLD_SIZE") if n in environ)
        missing = [n for n in RENDEZVOUS if not environ.get(n, "").strip()]
        if missing:
            raise UserError(
                f"environment variable {asks} asks for a job of several processes, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set (a launcher sets them together); {ONE_PROCESS}"
            )


def error_shown_here(environ=None) -> bool:
    """Whether this process prints a UserError: False only on a launcher-started process other than its
    machine's local rank 0, which prints the same error (every process meets the same input mistake)."""
    environ = os.environ if environ is None else environ
    launched = any(environ.get(mark) for mark in LAUNCHER_MARKS)
    return not launched or environ.get("LOCAL_RANK", "0").strip() == "0"


@contextlib.contextmanager
def launch_scope():
    """An entry point's run: the launcher variables checked first; a UserError marked with who prints it."""
    check_launch_environment()  # an inconsistent launch: each process says so (none can count on another)
    try:
        yield
    except UserError as err:
        err.shown_here = error_shown_here()
        raise


ENTRY_SCOPES.insert(0, launch_scope)  # before the lock scope: nothing is taken for a launch that cannot run
