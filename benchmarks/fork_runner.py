"""Runs scripts as `python SCRIPT ARG...` would, each in a process of its own forked from this one, which imported
the heavy libraries once. Started as `python SCRIPT`, each paid 6-18 s of imports (torch, transformers, peft, trl,
datasets) on 2 cores before its first line of work; a forked child starts with them imported.

    python benchmarks/fork_runner.py OUT_DIR SCRIPT ARG... [--- SCRIPT ARG...]...   # one after another, then exit
    python benchmarks/fork_runner.py --serve    # runs each request read from stdin (ForkServer below)

Each child runs its script as `python SCRIPT` does: `__main__`, sys.argv, sys.path[0] its folder, its environment;
at its end non-daemon threads are joined and atexit handlers run, as at interpreter exit; its exit status, or the
signal that killed it, is the command's. Whatever a script changes in its process (progress bars off, torch
threads, sys.path, its modules) dies with its child: no script sees another's, and the test's process sees none.
Imported ahead are only installed third-party packages and the `dpo` package's own __init__ (which any
`import dpo.x` runs first); every module of this repo a script imports, it imports itself.
"""

import atexit
import contextlib
import json
import os
import runpy
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOADED = ("torch", "transformers", "datasets", "peft", "trl", "accelerate")
# The import path of a fresh `python SCRIPT` after its first entry (SCRIPT's folder): this process's, taken before
# preload() puts this checkout first
FRESH_PATH = sys.path[1:]


def preload() -> None:
    """The libraries, and this checkout's `dpo` package: a venv shared by several checkouts (git worktrees) has one
    editable install, and a script started fresh puts its own checkout first on sys.path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dpo  # noqa: F401  (first, as in every entry point: it silences bitsandbytes' import-time note)

    for name in PRELOADED:
        __import__(name)


def run_as_main(script: str, args: list[str]) -> int:
    """This process becomes `python script args...`: the exit status that command would have."""
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *FRESH_PATH]
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    threading._shutdown()  # what interpreter exit does: wait for non-daemon threads, then run atexit handlers
    atexit._run_exitfuncs()
    return status


def fork(script: str, args: list[str], stdout: str, stderr: str | None, env: dict | None = None) -> int:
    """Start a child that runs `script args` with its output in these files (stderr None: into stdout); its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # a FIFO: blocks until its reader opens it
        err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if stderr else out
        os.dup2(out, 1)
        os.dup2(err, 2)
        status = run_as_main(script, args)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def exit_code(pid: int) -> int:
    """The child's exit status, or minus the signal that killed it (as subprocess reports it)."""
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def message(fields: dict) -> str:
    """One line of the server's protocol on its pipes (pids, exit statuses, argv and environment): never a file."""
    return json.dumps(fields)


def serve() -> None:
    """One request a line on stdin, {"argv", "env", "stdout", "stderr"}: answers {"pid"} once the child is
    started, then {"status"} once it ended. One child at a time."""
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        script, *args = request["argv"]
        pid = fork(script, args, request["stdout"], request["stderr"], request["env"])
        print(message({"pid": pid}), flush=True)
        status = exit_code(pid)
        release_reader(request["stdout"])
        print(message({"status": status}), flush=True)


def release_reader(path: str) -> None:
    """A child that died before it opened its FIFO would leave the test blocked opening it for reading: opened
    and closed for writing here, the test's open returns and it reads an empty stream."""
    if os.path.exists(path) and stat.S_ISFIFO(os.stat(path).st_mode):  # a plain file not yet made: nothing waits
        with contextlib.suppress(OSError):  # ENXIO: no reader is waiting (it read the stream to its end)
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def kill_9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, signal.SIGKILL)


class ForkServer:
    """A test's handle on `--serve`: `start` runs a script as `python script` would, from the server's
    imported libraries; `wait` gives its exit status."""

    def __init__(self, cwd: str | Path):
        self.server = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd
        )
        assert self.server.stdout.readline() == "ready\n", "the fork server did not start"

    def start(self, argv: list[str], stdout: Path, stderr: Path | None = None, env: dict | None = None) -> int:
        request = {"argv": [str(a) for a in argv], "env": dict(env if env is not None else os.environ)}
        request.update(stdout=str(stdout), stderr=str(stderr) if stderr else None)
        self.server.stdin.write(message(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())["pid"]

    def wait(self) -> int:
        return json.loads(self.server.stdout.readline())["status"]

    def run(self, argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int, str, str]:
        """`python argv...` run to its end: (exit status, stdout, stderr). Still running after `timeout` seconds,
        it is killed (SIGKILL: the status is then -9), so a hung script fails its caller instead of hanging it."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            pid = self.start(argv, out, err, env)
            watchdog = threading.Timer(timeout, kill_9, [pid]) if timeout else None
            if watchdog:
                watchdog.start()
            try:
                status = self.wait()
            finally:
                if watchdog:
                    watchdog.cancel()
            read = [path.read_text() if path.exists() else "" for path in (out, err)]  # a child dead before it began
            return status, *read

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def run_all(out_dir: Path, argv: list[str]) -> None:
    """Each `---`-separated command of argv in turn; writes OUT_DIR/<i>.out, .err and .status for the i-th."""
    commands = [[]]
    for arg in argv:
        if arg == "---":
            commands.append([])
        else:
            commands[-1].append(arg)
    for i, (script, *args) in enumerate(commands):
        pid = fork(script, args, str(out_dir / f"{i}.out"), str(out_dir / f"{i}.err"))
        (out_dir / f"{i}.status").write_text(str(exit_code(pid)))


def main() -> None:
    preload()
    if sys.argv[1] == "--serve":
        serve()
    else:
        run_all(Path(sys.argv[1]), sys.argv[2:])
    sys.stdout.flush()
    os._exit(0)  # nothing left to write: tearing the imported libraries down took up to 15 s on 2 busy cores


if __name__ == "__main__":
    main()
