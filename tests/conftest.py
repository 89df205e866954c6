"""Shared fixtures: everything offline, on CPU, built locally (no downloads)."""

import os
import re

# Set before transformers/datasets are imported anywhere: no network, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the suite is CPU-only, also on a GPU machine
# One intra-op thread: the models here are tiny, and thread hand-offs cost more than the math.
# Measured on 2 cores: tests/test_recipe_phi2.py + test_recipe_generic.py took 23 s with one
# thread and 96 s with two. Subprocesses and notebook kernels inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
# Real human preferences: Anthropic HH-RLHF harmless-base test split, the original file (data/hh-rlhf/README.md).
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Phi-architecture model + local tokenizer saved as a model folder (safetensors)."""
    from dpo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a model folder, built from the pip-installed GGUF
    (requirements-models.txt) once into the user cache (dpo.models.default_cache_dir, outside the
    repo; $DPO_MODELS_CACHE moves it); later sessions find it there. Fails, not skips, when the
    package is missing: `make test` installs it."""
    from dpo.models import default_cache_dir, materialize

    return materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def truthy_file(tmp_path_factory) -> Path:
    """48 rows in jondurbin/truthy-dpo-v0.1's exact shape, as a .jsonl file."""
    from dpo.tiny import truthy_like_rows, write_jsonl

    return write_jsonl(truthy_like_rows(48, seed=0), tmp_path_factory.mktemp("data") / "truthy.jsonl")


from dpo.config import load_recipe, load_script  # noqa: E402,F401  (tests import them from here)


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr a user reads, without progress bars ("Generating train split: ... examples/s]")."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not re.search(r"(examples|it)/s\]$", p.strip())]


def one_line_error(main, argv, capsys) -> str:
    """Run an entry point's main(argv) (a recipe, dpo.doctor); assert exit status 2 and exactly one
    `error:` line on stderr (no usage, no traceback); return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fail the test if any model weights load: for checks that must run before that."""
    import transformers

    import dpo.training

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error was reported")

    monkeypatch.setattr(dpo.training, "DPOTrainer", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))
