"""Properties of the dpo/ library as a whole."""

import ast
import shutil
import sys
from pathlib import Path

import trl
from helpers import ENTRY_MODULES, ROOT


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_from_scratch_dpo_uses_plain_pytorch_only():
    """dpo/scratch/ never imports TRL or transformers; only loop.py may use peft (to disable adapters)."""
    for path in sorted((ROOT / "dpo" / "scratch").glob("*.py")):
        allowed = {"peft"} if path.name == "loop.py" else set()
        assert not imported_modules(path) & ({"trl", "transformers", "peft", "bitsandbytes"} - allowed), path.name


def test_trl_is_imported_only_in_compat():
    """Everything sensitive to the TRL version lives in dpo/compat.py."""
    users = sorted(str(p.relative_to(ROOT)) for p in library_files() if "trl" in imported_modules(p))
    assert users == ["dpo/compat.py"]


def test_loss_types_match_trl_and_our_module():
    from dpo.compat import LOSS_TYPES, TESTED_TRL
    from dpo.scratch import loss_settings

    assert trl.__version__ == TESTED_TRL
    assert set(loss_settings.LOSS_TYPES) - {"cdpo"} == set(LOSS_TYPES)
    # TRL's trainer names its accepted loss types in its unknown-loss error message
    source = (Path(trl.__file__).parent / "trainer" / "dpo_trainer.py").read_text()
    accepted = source[source.index("Unknown loss type") :][:600]
    for name in LOSS_TYPES:
        assert f"'{name}'" in accepted, name


def test_the_hub_hint_names_a_command_that_is_installed():
    """The 'could not load' message suggests `hf download`; the pinned huggingface_hub ships `hf`."""
    from dpo.train.model_checks import _fetch_error

    message = str(_fetch_error("model", "org/name", OSError("offline"), "--model_name_or_path"))
    command = message.split("`")[1].split()[0]
    assert command == "hf"
    assert shutil.which(command, path=str(Path(sys.executable).parent)) is not None


def test_no_script_in_recipes_shadows_the_library():
    """`python recipes/x.py` puts recipes/ first on sys.path: a recipes/dpo.py would be imported
    instead of the dpo package by every other recipe."""
    assert not (ROOT / "recipes" / "dpo.py").exists()


def test_the_library_never_loads_files_from_recipes():
    """dpo/ works installed without -e: recipes, notebooks, benchmarks and tests import dpo/, never the reverse."""
    offenders = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("recipes", "recipes/"):
                offenders.append(f"{path.name}:{node.lineno}: path into recipes/")
            if isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "run_path"):
                offenders.append(f"{path.name}:{node.lineno}: loads a script file")
    assert offenders == []


# ── the layout: every module in a subpackage that names its job, imports running downward ──────
# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    "dpo.errors dpo.signals dpo.log dpo.files dpo.folders dpo.plots dpo.progress dpo.helptext dpo.hub",  # shared by all:
    # one-line errors, stop signals, progress messages and bars, checked files, marked folders, plots, --help text
    "dpo.scratch",  # DPO in plain PyTorch: loss, loss settings, log-probs, loop
    "dpo.compat",  # the one TRL seam (its loss types: the from-scratch ones less those TRL dropped)
    "dpo.gate",  # the settings gate: the table of every setting's bound, the run's plan, integrations
    "dpo.train",  # config, checks, the trainer builder; train.safety (runs that never lie), train.speed
    "dpo.data",  # loading, layouts -> pairs, formats, the data doctor
    "dpo.evaluation",  # evaluate, judge, report, export, model card
    "dpo.offline",  # what works without the Hub: pip-packaged models, the tiny model, the sentiment demo
    "dpo.rounds",  # on-policy DPO in rounds: reward, pairing, the round loop, its summary (sampling: dpo.evaluation)
]
# `python -m dpo.<name>` keeps its short name: dpo/<name>.py only imports the real `main` and calls it.
# dpo/__init__.py may import any layer cheaply (it installs the bitsandbytes log filter).


def library_files() -> list[Path]:
    return sorted((ROOT / "dpo").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """Index in LAYERS; None for an entry module or dpo/__init__.py (above every layer)."""
    for i, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members.split()):
            return i
    return None


def dpo_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every dpo module `path` imports, `from dpo.data import doctor` as dpo.data.doctor."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dpo"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpo":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / (sub.replace(".", "/") + ".py")).exists() or (
                    ROOT / sub.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return found


def test_every_module_lives_in_a_subpackage_or_is_shared_or_an_entry():
    top = {p.stem for p in (ROOT / "dpo").glob("*.py")} - {"__init__"}
    shared = {m.split(".")[1] for layer in (LAYERS[0], LAYERS[2]) for m in layer.split()}
    assert top == shared | set(ENTRY_MODULES), "a new module goes into the subpackage that names its job"
    for path in library_files():
        assert path.name == "__init__.py" or layer_of(module_name(path)) is not None or path.stem in ENTRY_MODULES
    assert not (ROOT / "dpo" / "train" / "model.py").exists()  # model checks and pip models are named apart
    assert not (ROOT / "dpo" / "train" / "validate.py").exists()  # its settings checks are the gate's (dpo/gate/)


def test_imports_run_downward_only():
    """shared < scratch < compat < train < data < evaluation < offline; nothing imports an entry module."""
    entries = {f"dpo.{name}" for name in ENTRY_MODULES}
    upward = []
    for path in library_files():
        here = layer_of(module_name(path))
        for line, target in dpo_imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if target in entries:
                upward.append(where + " (an entry module)")
            elif here is not None and target != "dpo" and (layer_of(target) or 0) > here:
                upward.append(where)
    assert upward == []


def test_the_from_scratch_code_leaves_the_kernel_workaround_to_its_caller():
    for path in sorted((ROOT / "dpo" / "scratch").glob("*.py")):
        assert not [t for _, t in dpo_imports(path) if t.startswith("dpo.train")], path.name


def test_evaluation_reads_no_demo_and_no_private_helper():
    for path in sorted((ROOT / "dpo" / "evaluation").glob("*.py")):
        tree = ast.parse(path.read_text())
        assert not [t for _, t in dpo_imports(path) if t.startswith("dpo.offline")], path.name
        private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
        assert not [name for name in private if name.startswith("_")], path.name


def test_entry_modules_only_call_the_real_main():
    """Each entry module: a docstring, `from <real module> import main`, `if __name__ == "__main__": main()`."""
    for name, real in ENTRY_MODULES.items():
        body = ast.parse((ROOT / "dpo" / f"{name}.py").read_text()).body
        assert len(body) == 3, name
        docstring, imported, guard = body
        assert isinstance(docstring, ast.Expr) and f"python -m dpo.{name}" in docstring.value.value
        assert isinstance(imported, ast.ImportFrom) and imported.module == real
        assert [a.name for a in imported.names] == ["main"]
        assert isinstance(guard, ast.If) and ast.unparse(guard.body[0]) == "main()"


def test_the_package_ships_every_subpackage():
    """pyproject's setuptools package list covers every folder with an __init__.py (pip install -e . and a wheel)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["dpo", "dpo.*"]
    folders = {module_name(p) for p in (ROOT / "dpo").rglob("__init__.py")}
    assert {"dpo", "dpo.train", "dpo.train.safety", "dpo.train.speed", "dpo.data", "dpo.scratch"} <= folders
    assert all((ROOT / m.replace(".", "/") / "__init__.py").exists() for m in folders)
    for path in library_files():  # a folder of modules without __init__.py would be left out of a wheel
        assert (path.parent / "__init__.py").exists(), path


def test_readme_layout_tree_names_every_subpackage():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```")[1]
    assert len(layout.strip().splitlines()) <= 12
    for folder in sorted({p.parent for p in library_files()} - {ROOT / "dpo"}):
        assert folder.name + "/" in layout, f"README's layout tree misses dpo/{folder.relative_to(ROOT / 'dpo')}/"


def test_readme_and_requirements_say_the_same_of_the_torch_build():
    """README said PyPI's torch==2.13.0 is the CUDA build while requirements.txt said the pin resolves to the CPU
    wheel: a newcomer could not tell which several-GB download to expect."""
    claim = "torch==2.13.0 from pypi on linux is the cuda build"
    texts = {
        name: " ".join((ROOT / name).read_text().lower().replace("#", " ").replace("`", "").split())
        for name in ("README.md", "requirements.txt")
    }
    readme = texts["README.md"].replace("from pypi, torch==2.13.0 on linux", "torch==2.13.0 from pypi on linux")
    requirements = texts["requirements.txt"].replace("torch 2.13.0 from pypi", "torch==2.13.0 from pypi")
    assert claim in readme and claim in requirements
    assert "resolves to the cpu wheel" not in requirements


def test_the_benchmark_scripts_import_one_another_without_a_circle():
    """benchmarks/training_profile.py imported training_workers.py, whose main imported training_profile.py back
    (a function-level import, so nothing failed, but neither could be read or changed alone)."""
    scripts = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    imports = {
        name: {target for target in imported_modules(path) | benchmarks_package_imports(path) if target in scripts}
        for name, path in scripts.items()
    }

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in imports[start])

    circles = sorted(name for name in scripts if reaches(name, name, {name}))
    assert circles == []


def benchmarks_package_imports(path: Path) -> set[str]:
    """`from benchmarks.x import y` and `import benchmarks.x`, as the script name x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
    return names


def test_every_module_stays_under_400_lines():
    """The style rule (a module does one job, readable in one sitting): every Python file of the library, the
    recipes and the benchmarks under 400 lines, so a module that grows past it is split, not let grow."""
    long = {
        str(p.relative_to(ROOT)): n
        for folder in ("dpo", "recipes", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) >= 400
    }
    assert not long, long
