"""The notebooks in notebooks/: paired with their source, clean, pinned, and they run top to bottom.

* Each notebook's source is notebooks/<name>.py in jupytext's percent format; the committed
  <name>.ipynb is what jupytext makes of it (`make notebooks` = `jupytext --sync notebooks/*.py`).
* Committed notebooks carry no outputs or execution counts.
* The install cell pins exactly requirements.txt, runs only on Colab, and there clones the repo
  (one REPO_URL) and installs it; checked by running the cell against a fake Colab.
* Each notebook executes with nbclient in smoke mode (DPO_SMOKE=1: tiny offline model and data,
  CPU, a few steps) in a fresh python3 kernel, offline, with a timeout per cell, and leaves the
  artifacts it promises (adapter, merged model, plots, agreement with TRL). What a notebook
  computed comes back as JSON: each one ends by writing its results to the file DPO_RESULTS names.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jupytext
import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

NB_DIR = ROOT / "notebooks"
CELL_TIMEOUT = 300  # seconds, per cell; the slowest smoke cell takes well under a minute
COLAB_GUARD = 'if "google.colab" in sys.modules:'
REPO_URL = "https://github.com/dpo-recipes/dpo-recipes"
NAMES = sorted(p.stem for p in NB_DIR.glob("dpo_*.py"))


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/{name}.ipynb"


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def install_cell(nb) -> str:
    cells = [src for src in code_cells(nb) if COLAB_GUARD in src]
    assert len(cells) == 1, "expected exactly one Colab install cell"
    return cells[0]


def kernel_env(**extra) -> dict:
    """The kernel's environment: offline, CPU only, smoke mode, and this checkout importable."""
    env = dict(os.environ)
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE")
    env.update(dict.fromkeys(offline, "1"), DPO_SMOKE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_notebook(name: str, cwd: Path) -> tuple[nbformat.NotebookNode, dict]:
    """Execute notebooks/<name>.ipynb in smoke mode in `cwd`; the executed notebook and the results it wrote."""
    results = cwd / "results.json"
    nb = execute(read(name), cwd, DPO_RESULTS=str(results))
    return nb, json.loads(results.read_text())


def execute(nb, cwd: Path, **env) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel (this interpreter's), in `cwd`; raises on a failing cell."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=kernel_env(**env))
    return nb


# A printed warning: "<file>:<line>: FutureWarning: <message>" (Python's default format, also in a kernel).
WARNING_LINE = re.compile(r"^(?P<file>.*?):\d+: (?:FutureWarning|DeprecationWarning): (?P<message>.*)$", re.MULTILINE)


def deprecations(nb) -> list[str]:
    """Deprecation warnings caused by what the notebook itself calls, as pyproject.toml's filterwarnings sees
    it: attributed to the notebook's code, or raised by transformers' TrainingArguments (DPOConfig), which
    warns from its own __post_init__ about argument names its caller passed. A library's internals calling
    another library's old API (peft's prepare_model_for_kbit_training, TRL's trainer) are not the notebook's."""
    found = []
    for text in outputs(nb, "text"):
        for warning in WARNING_LINE.finditer(text):
            where = warning["file"]
            if "site-packages" not in where or where.endswith("transformers/training_args.py"):
                found.append(warning.group(0))
    return found


def outputs(nb, kind: str) -> list:
    """All outputs of executed code cells: kind 'text' (streams and plain text) or a MIME type."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.output_type == "stream":
                found.append(out.text)
            elif kind != "text" and kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


# ── the committed files ──────────────────────────────────────────────────────────────────────


def test_every_notebook_has_its_source():
    assert NAMES and sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_and_its_source_agree(name):
    """The .ipynb is what jupytext makes of the .py: same cells, same metadata; a change to one
    without `make notebooks` fails here."""
    source = (NB_DIR / f"{name}.py").read_text()
    committed = read(name)
    stale = f"notebooks/{name}.ipynb and {name}.py disagree: run make notebooks (jupytext --sync notebooks/*.py)"
    assert jupytext.writes(committed, fmt="py:percent") == source, stale
    from_source = jupytext.reads(source, fmt="py:percent")
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in from_source.cells]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
        assert "execution" not in cell.metadata, cell.source[:80]
    assert "widgets" not in nb.metadata
    assert nb.metadata.kernelspec.name == "python3"


def test_the_install_cell_is_one_cell_written_once_for_all_notebooks():
    """The same few lines in every notebook (no pinned copy to drift: they install requirements.txt)."""
    cells = {name: install_cell(read(name)) for name in NAMES}
    assert len(set(cells.values())) == 1, "the notebooks' install cells differ"
    assert len(cells[NAMES[0]].splitlines()) <= 12


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_comes_first_and_the_repo_url_is_written_once(name):
    nb = read(name)
    first = code_cells(nb)[0]
    assert first == install_cell(nb)
    assert first.startswith(f'REPO_URL = "{REPO_URL}"')
    everything = "\n".join(code_cells(nb))
    assert everything.count("github.com/dpo-recipes/dpo-recipes") == 1


@pytest.mark.parametrize("on_colab", [True, False], ids=["colab", "elsewhere"])
def test_install_cell_on_colab_clones_the_repo_and_installs_its_requirements(on_colab, monkeypatch, tmp_path):
    """Run the install cell against a fake Colab: record the commands instead of running them."""
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append((cmd, kw.get("cwd"))))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    exec(compile(install_cell(read(NAMES[0])), "install-cell", "exec"), {})

    if not on_colab:
        assert commands == []
        return
    ((command, _),) = commands
    clone = f"test -d dpo-recipes || git clone --depth 1 {REPO_URL} dpo-recipes"
    assert command == f"{clone} && cd dpo-recipes && pip install -q -r requirements.txt"
    # requirements.txt installs the pins and, through its `-e .` line (relative to cwd), the repository
    assert "-e ." in (ROOT / "requirements.txt").read_text().splitlines()
    assert os.path.realpath(sys.path[0]) == os.path.realpath(tmp_path / "dpo-recipes")


def test_the_phi2_notebook_teaches_the_real_trl_calls():
    """The cells a learner edits are TRL's and transformers' own calls, not the repo's helpers."""
    code = "\n".join(code_cells(read("dpo_phi2_qlora")))
    for call in (
        "BitsAndBytesConfig(",
        "LoraConfig(",
        "DPOConfig(",
        "DPOTrainer(",
        "ref_model=None",
        "peft_config=peft_config",
    ):
        assert call in code, call
    assert "build_dpo_trainer(" not in code and "load_recipe_args(" not in code


def test_readme_has_a_colab_badge_and_a_line_per_notebook():
    readme = (NB_DIR / "README.md").read_text()
    for name in NAMES:
        url = f"https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/{name}.ipynb"
        assert url in readme, name
        assert colab_url(name) == url
        assert url in read(name).cells[0].source, f"{name}: the first cell should carry its own Colab badge"


# ── running them ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_kernel_is_this_interpreter_with_this_checkout(tmp_path):
    """nbclient's python3 kernel must run in the environment under test (e.g. make test's .venv)."""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import os, sys, dpo\nfor line in (sys.executable, sys.prefix, os.path.dirname(dpo.__file__), os.environ['DPO_SMOKE']):\n"
                "    print(line)"
            )
        ]
    )
    executable, prefix, package, smoke = "".join(outputs(execute(nb, tmp_path), "text")).splitlines()
    assert (executable, prefix) == (sys.executable, sys.prefix)  # sys.prefix: the venv, not the Python it links to
    assert Path(package).resolve() == ROOT / "dpo"
    assert smoke == "1"


@pytest.mark.slow
def test_phi2_qlora_notebook_runs_in_smoke_mode(tmp_path):
    nb, results = run_notebook("dpo_phi2_qlora", tmp_path)
    out = tmp_path / "outputs" / "dpo_phi2_qlora"
    for artifact in ("adapter_model.safetensors", "adapter_config.json", "final_metrics.json", "training_curves.png"):
        assert (out / artifact).is_file(), artifact
    assert (tmp_path / "outputs" / "dpo_phi2_qlora-merged" / "model.safetensors").is_file()
    assert results["smoke"] is True and "eval_rewards/accuracies" in results["metrics"]
    change = results["merge_max_logit_change"]
    assert change < 1e-4, "the merged model does not compute what base + adapter computed"
    assert outputs(nb, "image/png"), "no reward curves shown"
    assert any("after: phi-2 + DPO adapter" in html for html in outputs(nb, "text/html"))
    assert not deprecations(nb)  # it taught gradient_checkpointing, a deprecated alias of activation_checkpointing


@pytest.mark.slow
def test_from_scratch_notebook_runs_in_smoke_mode(tmp_path):
    nb, results = run_notebook("dpo_from_scratch", tmp_path)
    assert results["same_tokens"] is True
    assert results["max_gap"] < 1e-4  # largest difference in loss or rewards over the run
    assert outputs(nb, "image/png"), "no implicit-reward plot shown"
    assert not deprecations(nb)


@pytest.mark.slow
def test_your_dataset_notebook_runs_in_smoke_mode(tmp_path):
    nb, results = run_notebook("dpo_your_dataset", tmp_path)
    # the doctor detected the `question` column, dropped each kind of bad row it was given (rows
    # 21-23 of the file), and named the file, row and field of the schema error
    assert "prompt=question" in results["layout"]
    assert results["rows_in"] == 23
    drops = results["drops"]
    assert drops["empty chosen or rejected"] == [21]
    assert drops["chosen identical to rejected"] == [22]
    assert drops["duplicate of an earlier row"]
    assert "outputs/broken.jsonl, row 2, field 'chosen'" in results["schema_error"]
    out = tmp_path / "outputs" / "dpo_your_dataset"
    for artifact in ("adapter_model.safetensors", "final_metrics.json", "training_curves.png", "data_lengths.png"):
        assert (out / artifact).is_file(), artifact
    assert len(outputs(nb, "image/png")) >= 2, "length histogram and training curves"


@pytest.mark.parametrize("name", NAMES)
def test_no_markdown_list_item_ends_up_as_a_comment_in_a_code_cell(name):
    """dpo_from_scratch's last "Next" bullet sat at the end of the results cell as `# * ...`: jupytext reads a
    comment after code as code, so Colab showed it as a comment, not in the list."""
    for cell in jupytext.reads((NB_DIR / f"{name}.py").read_text(), fmt="py:percent").cells:
        if cell.cell_type == "code":
            lines = [line for line in cell.source.splitlines() if line.strip()]
            stray = [line for line in lines if re.match(r"#\s+[*-]\s", line)]
            assert not stray, f"{name}: a markdown list item inside a code cell: {stray[0]}"


def test_no_notebook_or_doc_says_nothing_has_run_on_a_gpu():
    """The notebooks said "nothing in this repository has run on a GPU yet" after the H200 run whose results are
    committed (benchmarks/results/gpu/, quoted by README.md)."""
    assert any((ROOT / "benchmarks" / "results" / "gpu").glob("*.json")), "the GPU run's results are committed"
    pages = [*NB_DIR.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").glob("*")]
    claim = re.compile(r"nothing (here|in this repository) has (yet )?run on a GPU|has run on a GPU yet", re.I)
    said = [p.name for p in pages if p.is_file() and claim.search(" ".join(p.read_text().split()))]
    assert said == []
