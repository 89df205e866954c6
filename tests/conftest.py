"""Shared fixtures: everything offline, on CPU, built locally (no downloads)."""

import os

# Set before transformers/datasets are imported anywhere: no network, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite is CPU-only, also on a GPU machine; `make gpu` sets DPO_GPU_TESTS=1 to run `pytest -m gpu`
# (tests/test_gpu.py, skipped wherever no CUDA GPU is visible).
if os.environ.get("DPO_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One intra-op thread: the models here are tiny, and thread hand-offs cost more than the math.
# Measured on 2 cores: tests/recipes/test_recipe_phi2.py + test_recipe_generic.py took 23 s with one
# thread and 96 s with two. Subprocesses and notebook kernels inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The recipes keep reference log-probs on disk (reference_cache: true): one fresh folder per test
# session, never the user's ~/.cache. Subprocesses inherit it.
if "DPO_REFERENCE_CACHE" not in os.environ:
    import tempfile

    os.environ["DPO_REFERENCE_CACHE"] = tempfile.mkdtemp(prefix="dpo-test-refcache-")

import collections  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import dpo  # noqa: E402, F401  (first: it silences bitsandbytes' AVX512-BF16 import note, dpo/train/speed/kernels.py)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Phi-architecture model + local tokenizer saved as a model folder (safetensors)."""
    from dpo.offline.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a model folder, built from the pip-installed GGUF
    (requirements-models.txt) once into the user cache (dpo.offline.pip_models.default_cache_dir, outside the
    repo; $DPO_MODELS_CACHE moves it); later sessions find it there. Fails, not skips, when the
    package is missing: `make test` installs it."""
    from dpo.offline.pip_models import default_cache_dir, materialize

    return materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def truthy_file(tmp_path_factory) -> Path:
    """48 rows in jondurbin/truthy-dpo-v0.1's exact shape, as a .jsonl file."""
    from dpo.offline.tiny import truthy_like_rows, write_jsonl

    return write_jsonl(truthy_like_rows(48, seed=0), tmp_path_factory.mktemp("data") / "truthy.jsonl")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread. On a small shared CPU, two OpenMP
    threads that wait on each other make every op of these tiny models 10-50x slower; the
    comparisons run TRL and our code under the same setting, so results do not depend on it.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fail the test if any model weights load: for checks that must run before that."""
    import transformers

    import dpo.train.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error was reported")

    monkeypatch.setattr(dpo.train.trainer, "DPOTrainer", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))


def pytest_collection_modifyitems(items):
    """Files with the most `slow` tests run first, the rest keep their order: `make test` hands whole files
    to its 2 workers (pytest -n 2 --dist loadfile --no-loadscope-reorder), and the quick files left for the
    end fill whichever worker is free, instead of one long file running alone at the end."""

    def path(item):
        return item.nodeid.split("::")[0]

    slow = collections.Counter(path(item) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[path(item)])  # stable: files in their order, a file's own order kept
