"""Runs several scripts with their own arguments, each in a process of its own forked from this one, which imported
the heavy libraries once: tests/benchmarks/test_benchmarks.py runs every benchmark's --help through it.

    python tests/_fork_scripts.py OUT_DIR SCRIPT ARG... [--- SCRIPT ARG...]...

Started as `python SCRIPT ARG...`, each script paid 6-14 s of imports (torch, transformers, peft, trl, datasets) on
2 cores before its parser ran. Here a child is forked per script after those imports, and runs it as `python
SCRIPT` would: `__main__`, sys.argv, sys.path[0] its folder, its exit status. Whatever a script changes in its
process (progress bars off, torch threads, sys.path, its modules) dies with its child: no script sees another's,
and the test's process sees none. Only installed third-party packages and the `dpo` package's own __init__ (which
any `import dpo.x` runs first) are imported ahead; every module of this repo a script imports, it imports itself.

Writes OUT_DIR/<i>.out, <i>.err and <i>.status for the i-th script (0-based).
"""

import os
import runpy
import sys
import traceback

import dpo  # noqa: F401  (first, as in every entry point: it silences bitsandbytes' import-time note)

PRELOADED = ("torch", "transformers", "datasets", "peft", "trl", "accelerate")
for name in PRELOADED:
    __import__(name)


def run_as_main(script: str, args: list[str]) -> int:
    """This process becomes `python script args...`: the exit status that command would have."""
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    out_dir, commands, current = sys.argv[1], [], None
    for arg in sys.argv[2:]:
        if arg == "---" or current is None:
            current = []
            commands.append(current)
            if arg == "---":
                continue
        current.append(arg)
    for i, (script, *args) in enumerate(commands):
        base = os.path.join(out_dir, str(i))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its stdout and stderr go to its own files
            status = 1
            try:
                with open(f"{base}.out", "w") as out, open(f"{base}.err", "w") as err:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    status = run_as_main(script, args)
                    sys.stdout.flush()
                    sys.stderr.flush()
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        with open(f"{base}.status", "w") as f:
            f.write(str(os.waitstatus_to_exitcode(wait_status)))


if __name__ == "__main__":
    main()
