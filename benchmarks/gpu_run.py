"""`make gpu`: everything a CUDA machine without network is for, in one command, into one results folder.

    python3 benchmarks/gpu_run.py --results DIR                  # on the CUDA machine (make gpu)
    python benchmarks/gpu_run.py --scale tiny --no-install --skip pytest --results DIR   # CPU rehearsal (tests)

  1/4 install  the carried wheels (.whl/, benchmarks/gpu_wheels.py) into --site, first on PYTHONPATH;
               every requirement they still miss is printed
  2/4 check    the GPU (torch, nvidia-smi) and the versions that will run; no CUDA at phi-2 scale: stop
  3/4 pytest   pytest -m gpu on GPU_TEST_FILES (conftest.py keeps CUDA visible under DPO_GPU_TESTS=1), less
               ESSENTIAL_SKIP: the evaluate/export test (50 s; it passed on the H200, benchmarks/results/gpu/)
  4/4 profile  benchmarks/gpu_profile.py (issue 38: the step profile; profile.json rewritten after every run),
               given what is left of --budget less MARGIN_S
  bench        benchmarks/bench_gpu.py, only with --bench (memory cells, fp16 curve: measured on the H200 already)

The results folder (a few flat files, easy to copy back from a machine without network): progress.log,
env.txt, pytest.log, profile.log, profile-runs.log, profile.json, profile_section.md (and with --bench: bench.log, results.json,
gpu_section.md). Every line of every phase is also printed as it comes, and each phase has its own time limit,
so a run cut short still says how far it got and keeps what it measured.
Measured on an H200 (benchmarks/README.md): install 5 s, check 8 s, pytest 94 s (44 s of it without the
evaluate/export test), bench 405 s. Expected now: install 5, check 8, pytest about 50, profile the rest of 570 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_wheels  # noqa: E402

LIMITS_S = {"check": 60, "pytest": 120, "profile": 540, "bench": 480}  # each phase's own limit, within --budget
# The files with tests marked gpu (each skipped without CUDA): the recipe on the GPU, and packing's CUDA kernels
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/train/speed/test_packed_attention.py")
ESSENTIAL_SKIP = "not test_evaluate_and_export_run_on_a_gpu_trained_run"  # pytest -k: the rest is a minute
MARGIN_S = 15  # of the budget left to the profile: its last section write and the copy back
BEGAN = time.perf_counter()


class Progress:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / "progress.log", "a")

    def say(self, message: str) -> None:
        line = f"[make gpu +{time.perf_counter() - BEGAN:6.1f}s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()


def stream(cmd: list[str], log: Path, env: dict, limit_s: float) -> int:
    """Run `cmd`, printing and logging each line as it comes; killed after `limit_s`. Returns its exit status
    (-9 when killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(limit_s, proc.kill)
        timer.start()
        for line in proc.stdout:
            print(line, end="", flush=True)
            out.write(line)
            out.flush()
        timer.cancel()
        return proc.wait()


CHECK = """
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
    print("bf16 native", torch.cuda.is_bf16_supported(including_emulation=False))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "outputs" / "gpu"), help="the results folder")
    parser.add_argument("--scale", choices=["phi2", "tiny"], default="phi2")
    parser.add_argument("--site", default="/tmp/dpo-gpu-site", help="where the carried wheels are installed")
    parser.add_argument("--workdir", default="/tmp/dpo-bench-gpu", help="bench_gpu.py's model, runs and cache")
    parser.add_argument("--no-install", action="store_true", help="use the packages already installed")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: pytest, profile")
    parser.add_argument("--bench", action="store_true", help="also run benchmarks/bench_gpu.py, after the profile")
    parser.add_argument("--phases", help="bench_gpu.py --phases (default: all)")
    parser.add_argument("--profile-cells", help="gpu_profile.py --cells (default: its DEFAULT_CELLS)")
    parser.add_argument("--profile-runs", type=int, help="gpu_profile.py --runs (default: the scale's)")
    parser.add_argument(
        "--budget", type=float, default=570, help="seconds for everything (the H200 run: 540, under a 600 s limit)"
    )
    args = parser.parse_args(argv)
    results, skip = Path(args.results), set(filter(None, args.skip.split(",")))

    def limit(phase: str) -> float:  # the phase's own limit, or what is left of the budget
        return max(1.0, min(LIMITS_S[phase], args.budget - (time.perf_counter() - BEGAN)))

    progress = Progress(results)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", DPO_REFERENCE_CACHE=str(Path(args.workdir) / "refcache-tests"))
    paths = [str(ROOT)]
    if not args.no_install:
        progress.say("1/4 install: carried wheels -> " + args.site)
        for gap in gpu_wheels.install(Path(args.site)):
            progress.say(f"1/4 install: warning: {gap}")
        paths.insert(0, args.site)
    else:
        progress.say("1/4 install: skipped (--no-install)")
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])

    progress.say("2/4 check: GPU and versions")
    rc = stream([sys.executable, "-c", CHECK], results / "env.txt", env, limit("check"))
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if _has("nvidia-smi") else None
    with open(results / "env.txt", "a") as out:
        out.write(smi.stdout if smi else "nvidia-smi: not found\n")
    cuda = "cuda available True" in (results / "env.txt").read_text()
    if rc or (args.scale == "phi2" and not cuda):
        progress.say(f"2/4 check: {'failed' if rc else 'no CUDA GPU'}: stopping (env.txt)")
        return 1

    if "pytest" in skip:
        progress.say("3/4 pytest: skipped")
    else:
        progress.say("3/4 pytest -m gpu: started")
        files = [f for f in GPU_TEST_FILES if (ROOT / f).is_file()]
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-p", "no:cacheprovider", "-q", "-rA"]
        cmd += ["-k", ESSENTIAL_SKIP]
        rc = stream(cmd, results / "pytest.log", {**env, "DPO_GPU_TESTS": "1"}, limit("pytest"))
        progress.say(f"3/4 pytest -m gpu: exit {rc}")

    rc = 0  # the exit status is the profile's (or bench_gpu.py's), as before the tests' own
    if "profile" in skip:
        progress.say("4/4 profile: skipped")
    else:
        left = args.budget - (time.perf_counter() - BEGAN)
        progress.say(f"4/4 gpu_profile.py: started, {left - MARGIN_S:.0f} s for its runs")
        cmd = [sys.executable, "benchmarks/gpu_profile.py", "--scale", args.scale, "--results", str(results)]
        cmd += ["--workdir", args.workdir, "--budget", str(max(1.0, left - MARGIN_S))]
        cmd += (["--cells", args.profile_cells] if args.profile_cells else []) + (
            ["--runs", str(args.profile_runs)] if args.profile_runs else []
        )
        rc = stream(cmd, results / "profile.log", env, limit("profile"))
        progress.say(f"4/4 gpu_profile.py: exit {rc}; profile.json, profile_section.md in {results}")
    if not args.bench:
        return rc
    progress.say("bench_gpu.py (--bench): started")
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--scale", args.scale, "--results", str(results)]
    cmd += ["--workdir", args.workdir] + (["--phases", args.phases] if args.phases else [])
    rc = stream(cmd, results / "bench.log", env, limit("bench"))
    progress.say(f"bench_gpu.py: exit {rc}; results in {results}")
    return rc


def _has(program: str) -> bool:
    return any((Path(p) / program).exists() for p in os.environ.get("PATH", "").split(os.pathsep))


if __name__ == "__main__":
    sys.exit(main())
