"""The Python packages the GPU machine lacks, carried there as wheels in the git-ignored folder .whl/.

    python benchmarks/gpu_wheels.py download   # here, where pip reaches a registry: fills .whl/, then checks it
    python benchmarks/gpu_wheels.py check      # .whl/ holds exactly these wheels; tree + wheels fit the 64 MiB
    python3 benchmarks/gpu_wheels.py install /tmp/dpo-gpu-site   # there: pip --no-index --no-deps --target

The CUDA machine without network that ran it had Python 3.12, torch 2.11 (CUDA 13), transformers 5.17,
peft, accelerate 1.15 and pytest, and no trl, datasets or bitsandbytes; nothing can be downloaded there.
Carried: our pins of trl, datasets, bitsandbytes, transformers (5.23, not 5.17) and peft (requirements.txt),
plus what their Requires-Dist needs that the image lacks or may have in a version outside the range.
`install` puts them in a folder that goes first on PYTHONPATH, and reports every requirement of a
carried wheel that the resulting environment still does not meet (a warning there, not a stop).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".whl"
PINNED = ("trl", "datasets", "bitsandbytes", "transformers", "peft")  # versions: requirements.txt
EXTRA = {  # the wheels' Requires-Dist against that machine's installed packages
    "dill": "0.4.1",  # datasets 5.2: dill>=0.3.0,<0.4.2; not in the image
    "multiprocess": "0.70.19",  # datasets 5.2: multiprocess<0.70.20; not in the image
    "regex": "2026.11.19",  # transformers 5.23: regex>=2025.10.22; the image's version is not known
    "fsspec": "2026.9.0",  # datasets 5.2: fsspec<=2026.9.0; the image's may be newer
    "liger-kernel": "0.8.5",  # bench_gpu.py's use_liger_kernel check (pure Python + Triton, which the image has)
}
LIMIT = 64 * 2**20  # what the copy to the CUDA machine takes: tracked + untracked-not-ignored files + .whl/
WHEELS_MIB = 58.3  # the wheels above as downloaded (2026-12; bitsandbytes is 41 MiB of it): for `check` without .whl/
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted() -> dict[str, str]:
    """name -> version of every wheel to carry."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match and canonical(match.group(1)) in PINNED:
            pins[canonical(match.group(1))] = match.group(2)
    return {**pins, **{canonical(k): v for k, v in EXTRA.items()}}


def carried(folder: Path = FOLDER) -> dict[str, list[tuple[str, Path]]]:
    """name -> [(version, wheel file)] of the wheels in `folder`."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        found.setdefault(canonical(name), []).append((version, wheel))
    return found


def download(folder: Path = FOLDER) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(folder)]
    subprocess.run(cmd + [f"{name}=={version}" for name, version in wanted().items()], check=True)


def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of what is copied to the CUDA machine besides .whl/: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def problems(folder: Path = FOLDER, root: Path = ROOT) -> list[str]:
    """What is wrong with `folder` for the CUDA machine: a wheel missing, of another version, two versions of
    one package (that stops the whole install), one not asked for; the tree and wheels over LIMIT."""
    found, want, out = carried(folder), wanted(), []
    for name, version in want.items():
        versions = [v for v, _ in found.get(name, [])]
        if versions != [version]:
            out.append(f"{name}: want {version}, {folder.name}/ has {versions or 'none'}")
    out += [f"{name}: not one of ours ({[w.name for _, w in found[name]]})" for name in found if name not in want]
    wheels = sum(w.stat().st_size for entries in found.values() for _, w in entries)
    total = travelling_bytes(root) + wheels
    if total >= LIMIT:
        out.append(
            f"tree + wheels = {total / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB copied to the CUDA machine"
        )
    return out


def requirement_gaps(folder: Path, site: Path) -> list[str]:
    """Requires-Dist lines (no extras) of the carried wheels that the environment with `site` first on the
    path does not meet, e.g. 'datasets 5.2.0 needs pyarrow>=24.0.0; found 23.0.1'."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    def installed(name: str) -> str | None:
        for dist in md.distributions(path=[str(site), *sys.path]):
            if canonical(dist.metadata["Name"]) == canonical(name):
                return dist.version
        return None

    gaps = []
    for name, entries in carried(folder).items():
        for version, wheel in entries:
            with zipfile.ZipFile(wheel) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = z.read(meta).decode().splitlines()
            for line in lines:
                if not line.startswith("Requires-Dist: "):
                    continue
                req = Requirement(line.split(": ", 1)[1])
                if req.marker and not req.marker.evaluate({"extra": ""}):
                    continue
                have = installed(req.name)
                if have is None or not req.specifier.contains(have, prereleases=True):
                    gaps.append(f"{name} {version} needs {req}; found {have or 'nothing'}")
    return gaps


def install(target: Path, folder: Path = FOLDER) -> list[str]:
    """pip-install every carried wheel into `target` (no index, no dependencies); returns requirement_gaps."""
    wheels = [str(w) for entries in carried(folder).values() for _, w in entries]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    subprocess.run([*cmd, "--upgrade", "--target", str(target), *wheels], check=True)
    return requirement_gaps(folder, target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["download", "check", "install"])
    parser.add_argument("target", nargs="?", help="install: the folder to install into")
    args = parser.parse_args(argv)
    if args.action == "install":
        for gap in install(Path(args.target)):
            print(f"warning: {gap}")
        return
    if args.action == "download":
        download()
    found = problems()
    for problem in found:
        print(problem)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
