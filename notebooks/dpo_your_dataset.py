# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#     toc_visible: true
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DPO on your own preference data
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/dpo_your_dataset.ipynb)
#
# Bring pairs of answers, one preferred (*chosen*) and one not (*rejected*), for each prompt.
# This notebook loads them, runs the **data doctor** (every row checked before any GPU time
# is spent), shows the rows as the model will see them, and launches the generic recipe
# `recipes/dpo_any.py`: QLoRA DPO of a causal language model, here microsoft/phi-2, on one GPU.
#
# In Colab: *Runtime > Change runtime type > T4 GPU* (or better), then *Run all*.
#
# **Smoke mode.** With `DPO_SMOKE=1` in the environment, the notebook swaps in a tiny offline
# model and synthetic rows and runs a few steps on CPU, in about a minute. The test suite runs
# every notebook that way. Without it, it runs for real; nothing needs editing.

# %% [markdown]
# ## Install
#
# On Colab this cell clones the repository and installs its `requirements.txt` (the exact versions
# it is tested with, and its small `dpo` library). Anywhere else it does nothing: run the notebook
# in the repository's environment. If Colab asks to restart the session after the install, do so
# and run all cells again.

# %%
REPO_URL = "https://github.com/dpo-recipes/dpo-recipes"  # the one place the repository's address is written

import os
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab: clone, then install the pinned versions from requirements.txt
    clone = f"test -d dpo-recipes || git clone --depth 1 {REPO_URL} dpo-recipes"
    subprocess.run(f"{clone} && cd dpo-recipes && pip install -q -r requirements.txt", shell=True, check=True)
    sys.path.insert(0, os.path.abspath("dpo-recipes"))  # importable now, without restarting the session

# %% [markdown]
# ## Your data
#
# `DATASET` is a Hub dataset id or a file: `.jsonl`, `.json`, `.parquet` or `.csv` (on Colab,
# upload it in the *Files* pane and give its name). These shapes are recognised from the
# column names, and extra columns are ignored:
#
# | layout | columns | for example |
# |---|---|---|
# | text pairs | `prompt` (or `question`, `instruction`), `chosen`, `rejected`, optional `system` | jondurbin/truthy-dpo-v0.1, Intel/orca_dpo_pairs |
# | conversations | `chosen`, `rejected` as message lists `[{"role": ..., "content": ...}]`, optional `prompt` | trl-lib/ultrafeedback_binarized |
# | transcripts | `chosen`, `rejected` as `"\n\nHuman: ... \n\nAssistant: ..."` | Anthropic/hh-rlhf |
#
# Other column names: set them in `COLUMNS`, e.g. `Columns(prompt="query", chosen="good", rejected="bad")`.

# %%
from pathlib import Path

from dpo.data.pairs import Columns

COLUMNS = Columns()  # None everywhere: detect the columns
DATASET = "Intel/orca_dpo_pairs"  # or your file: "my_pairs.jsonl"
MODEL = "microsoft/phi-2"
OUTPUT_DIR = Path("outputs/dpo_your_dataset")

SMOKE = os.environ.get("DPO_SMOKE") == "1"
print(f"model: {MODEL}\ndata:  {DATASET}\nsmoke mode: {SMOKE}")

# %% [markdown]
# In smoke mode a tiny offline model stands in for phi-2, and the data is a small file
# written here, shaped like many home-made ones: a `question` column instead of `prompt`,
# and a few bad rows that the doctor will catch.

# %%
if SMOKE:
    from dpo.offline.tiny import save_tiny_model, truthy_like_rows, write_jsonl

    MODEL = str(save_tiny_model("outputs/smoke/tiny-phi"))
    rows = [
        {"system": r["system"], "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in truthy_like_rows(20)
    ]
    rows += [
        {**rows[0], "chosen": ""},  # an empty answer
        {**rows[1], "rejected": rows[1]["chosen"]},  # both answers the same
        dict(rows[2]),  # a duplicate of an earlier row
    ]
    DATASET = str(write_jsonl(rows, "outputs/smoke/my_pairs.jsonl"))
    print(f"wrote {len(rows)} rows to {DATASET}")

# %% [markdown]
# ## Load it

# %%
from dpo.data.loading import load_preference_data

raw = load_preference_data(DATASET)
print(raw)
print({k: (v[:120] if isinstance(v, str) else v) for k, v in raw[0].items()})

# %% [markdown]
# ## The data doctor
#
# `check_data` (`dpo/data/doctor.py`, what every recipe runs first) detects the layout, converts
# every row to TRL's `prompt` / `chosen` / `rejected` format and checks it:
#
# * a **schema error** (a missing field, a number where text should be, a malformed JSON
#   line) stops with the file, the row and the field;
# * **degenerate rows** are dropped and counted: an empty answer, both answers the same,
#   a duplicate, a prompt that alone fills `max_length` (which TRL would drop silently);
# * **lengths** are counted in tokens exactly as TRL will tokenize, with the share of pairs
#   that `max_length` truncates.
#
# phi-2 has no chat template, so the doctor gives its tokenizer a plain
# `Human: ... Assistant: ...` one, with a warning; a chat model's own template is used as is.

# %%
from dpo.data.doctor import check_data
from dpo.train.model_checks import load_tokenizer

MAX_LENGTH = 1024  # prompt + answer tokens, as in recipes/dpo_any.yaml
tokenizer = load_tokenizer(MODEL)
report = check_data(raw, DATASET, tokenizer, columns=COLUMNS, max_length=MAX_LENGTH)
print(report.summary())

# %%
from IPython.display import Image, display

from dpo.plots import plot_lengths

display(Image(filename=str(plot_lengths(report, OUTPUT_DIR / "data_lengths.png"))))

# %% [markdown]
# A schema error, for comparison: one row whose answer is a number. The doctor stops and
# says where.

# %%
from dpo.errors import UserError
from dpo.offline.tiny import write_jsonl

broken = write_jsonl(
    [
        {"prompt": "2 + 2?", "chosen": "Four.", "rejected": "Five."},
        {"prompt": "3 + 3?", "chosen": 6, "rejected": "Seven."},
    ],
    "outputs/broken.jsonl",
)
try:
    check_data(load_preference_data(str(broken)), str(broken), tokenizer)
except UserError as err:
    schema_error = str(err)
    print("error:", err)

# %% [markdown]
# ## The converted rows
#
# What TRL will train on: the prompt as a list of messages, and each answer as the
# assistant's reply. The chat template turns them into the text below; the model learns
# from the answer tokens only, and the end-of-text token teaches it to stop.

# %%
for pair in report.kept.select(range(2)):
    print("prompt:  ", pair["prompt"])
    print("chosen:  ", pair["chosen"])
    print("rejected:", pair["rejected"], "\n")
print("--- the first pair as the model sees it:")
print(report.example["prompt"] + report.example["chosen"])

# %% [markdown]
# ## Launch the generic recipe
#
# `recipes/dpo_any.py` with its settings in `recipes/dpo_any.yaml` (4-bit base, LoRA on
# every linear layer, beta 0.1); the list below overrides fields, as command-line flags
# would. It is a short first run, 20 steps of 16 pairs, enough to see the reward margin
# move (roughly half an hour on a T4: our estimate, not measured there; the one GPU run so far was an
# H200, BENCHMARKS.md). Leave out `max_steps` and `gradient_accumulation_steps` for the recipe's full epoch of
# 64-pair steps. The cell prints the same run as a command line.

# %%
import runpy
from pathlib import Path

import dpo

RECIPE = Path(dpo.__file__).resolve().parents[1] / "recipes" / "dpo_any.py"  # in the repository checkout
recipe = runpy.run_path(str(RECIPE))  # its definitions; main() runs in-process below

settings = dict(
    model_name_or_path=MODEL,
    dataset_name=DATASET,
    output_dir=OUTPUT_DIR,
    max_length=MAX_LENGTH,
    max_steps=20,
    gradient_accumulation_steps=8,
    learning_rate=5e-5,
    test_size=0.01,
    eval_steps=10,
)
settings |= {f"{role}_column": column for role, column in vars(COLUMNS).items() if column}
if SMOKE:  # a few steps of 4 pairs on the tiny model
    settings |= dict(
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        test_size=0.25,
        eval_steps=3,
    )
flags = [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]
print("python recipes/dpo_any.py", " ".join(flags))

# %%
trainer = recipe["main"](flags)

# %% [markdown]
# ## Results
#
# The recipe wrote the adapter, every setting of the run (`resolved_config.yaml`), the
# metrics and these curves to `OUTPUT_DIR`. A growing reward margin and a reward accuracy
# above 0.5 on the held-out pairs mean the model learned your preferences.

# %%
import json

metrics = json.loads((OUTPUT_DIR / "final_metrics.json").read_text())
print({k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_rewards/")})
display(Image(filename=str(OUTPUT_DIR / "training_curves.png")))

# %% [markdown]
# ## Next
#
# * Check a dataset alone, without a GPU: `python -m dpo.doctor <your data> --model_name_or_path microsoft/phi-2`.
# * The full run from a terminal: `accelerate launch recipes/dpo_any.py --dataset_name <your data>`;
#   any YAML field as a flag.
# * Compare answers before and after training, and merge the adapter: `dpo_phi2_qlora.ipynb`.

# %%
# For tests/notebooks/test_notebooks.py: with DPO_RESULTS naming a file, what it checks goes there as JSON.
if os.environ.get("DPO_RESULTS"):
    drops = {reason: [row for row, why in report.drops if why == reason] for reason in report.dropped}
    results = {"layout": report.layout, "rows_in": report.rows_in, "drops": drops, "schema_error": schema_error}
    Path(os.environ["DPO_RESULTS"]).write_text(json.dumps(results, indent=2))
