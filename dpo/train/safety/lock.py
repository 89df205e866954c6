"""One run per output_dir: a lock file held from the start of a run to its end.

Two runs writing one output_dir would each save checkpoints and final files over the other's and
both end "done". A run therefore takes `output_dir/.run.lock` before anything heavy happens:

  - an exclusive `flock` on the file, which the kernel drops when the holder exits in any way
    (kill -9 included), and the holder's pid, host, start time and command line in the file;
  - the file held by a live process: refused in one line naming that holder (UserError, exit 2);
  - a file left by a dead process: written on this host and its pid no longer runs (or runs a
    later process: its start time differs), so it is stale, taken over with a note;
  - a file written on another host: a pid there cannot be checked from here (and flock may not
    reach across a network file system), so it is refused, saying so and how to clear it.

Released (the file removed) when the entry point that took it returns or raises (`scope`, used
by dpo.errors.exit_on_user_error), by `train_and_save` for a trainer built outside an entry point,
and at process exit. Inside `scope`, SIGTERM and SIGHUP end the process through the same path
(exit 128 + signal), so they release it too; during training dpo/train/safety/interrupts.py handles them.
Under several processes only the main process takes it (the callers use dpo.train.distributed.on_main_process).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from dpo.errors import ENTRY_SCOPES, RunStopped, UserError
from dpo.files import json_text
from dpo.log import log

LOCK_NAME = ".run.lock"
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what schedulers and closed terminals send


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat, field 22): tells a
    reused pid from the process that wrote the lock. None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _running(pid: int, started: str | None) -> bool:
    """Whether process `pid` exists on this host and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"


class OutputLock:
    """The lock on one output_dir, held by this process."""

    def __init__(self, output_dir: Path, fd: int, created_dir: bool):
        self.output_dir, self.fd, self.created_dir, self.pid = output_dir, fd, created_dir, os.getpid()

    @property
    def path(self) -> Path:
        return self.output_dir / LOCK_NAME

    def release(self) -> None:
        if os.getpid() != self.pid or self.fd < 0:  # a forked child never removes its parent's lock
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # while still holding the flock: nobody can take the old file
        os.close(self.fd)
        self.fd = -1
        if self.created_dir:  # the run made the folder and wrote nothing else into it
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()


_held: dict[Path, OutputLock] = {}


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return {}


def _refusal(output_dir: Path, holder: dict | None, this_host: str) -> UserError:
    path = output_dir / LOCK_NAME
    if holder is None:
        return UserError(
            f"--output_dir {output_dir} is in use by another run that is starting; use another --output_dir"
        )
    if not holder:
        return UserError(
            f"--output_dir {output_dir}: {path} is unreadable; if no run uses the folder, delete that file"
        )
    if holder.get("host") != this_host:
        return UserError(
            f"--output_dir {output_dir} is locked by a run on another host ({describe(holder)}); a process on another "
            f"host cannot be checked from {this_host}. If that run has ended, delete {path}; else use another --output_dir"
        )
    return UserError(
        f"--output_dir {output_dir} is in use by another run ({describe(holder)}): two runs would overwrite each "
        "other's checkpoints and final files. Wait for it to finish, or use another --output_dir"
    )


def take(output_dir: str | Path) -> bool:
    """Lock `output_dir` for this process (creating the folder if needed). True if taken now, False if
    this process already holds it. UserError naming the holder if another run holds it."""
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir in _held:
        return False
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    while True:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _refusal(output_dir, holder, host) from None
        try:
            same_file = os.stat(output_dir / LOCK_NAME).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder removed the file between our open and our flock: open the new one
    previous = _read(fd)
    if previous:
        alive = previous.get("host") != host or _running(int(previous.get("pid", -1)), previous.get("pid_start"))
        if alive:  # another host's run cannot be checked; a live pid here did not take the flock: keep out
            os.close(fd)
            raise _refusal(output_dir, previous, host)
        log(
            f"note: {output_dir / LOCK_NAME} was left by a run that no longer runs ({describe(previous)}); taking it over"
        )
    me = {
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "host": host,
        "time": time.time(),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json_text(me, "the output folder's lock").encode())
    os.fsync(fd)
    _held[output_dir] = OutputLock(output_dir, fd, created)
    return True


def release(output_dir: str | Path) -> None:
    """Give up this process's lock on `output_dir` (nothing if it holds none)."""
    lock = _held.pop(Path(output_dir).expanduser().resolve(), None)
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(key)


def _exit_on_signal(signum, frame):
    raise RunStopped(f"{signal.Signals(signum).name}: stopped", 128 + signum)


@contextlib.contextmanager
def scope():
    """An entry point's run: every lock taken inside is released on leaving, whatever the exit;
    SIGTERM/SIGHUP (where they would kill the process outright) exit through here instead."""
    before = set(_held)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            s: signal.signal(s, _exit_on_signal) for s in EXIT_SIGNALS if signal.getsignal(s) == signal.SIG_DFL
        }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for key in [k for k in _held if k not in before]:
            release(key)


ENTRY_SCOPES.append(scope)  # every exit_on_user_error entry point releases the locks it took
