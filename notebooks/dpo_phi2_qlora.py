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
# # DPO on phi-2 with QLoRA, end to end
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/dpo_phi2_qlora.ipynb)
#
# **Direct Preference Optimization** (DPO) fine-tunes a language model on pairs of answers
# to the same prompt, one *chosen* and one *rejected*, with a plain classification loss: no
# reward model, no reinforcement learning. Here
# [microsoft/phi-2](https://huggingface.co/microsoft/phi-2) (2.7B parameters) learns from
# [jondurbin/truthy-dpo-v0.1](https://huggingface.co/datasets/jondurbin/truthy-dpo-v0.1),
# about 1,000 pairs that prefer honest answers (about being an AI, about common
# misconceptions), on one 16 GB GPU: a free Colab T4 is enough.
#
# The steps: install, check the hardware, load phi-2 in 4-bit, add LoRA adapters, look at
# the data, train, plot the reward curves, compare answers before and after, save the
# adapter and merge it for deployment. It is the code of `recipes/dpo_phi2.py` with the
# settings of `recipes/dpo_phi2.yaml`, one step per cell.
#
# In Colab: *Runtime > Change runtime type > T4 GPU* (or better), then *Run all*.
#
# **Smoke mode.** With `DPO_SMOKE=1` in the environment, the notebook swaps in a tiny offline
# model and synthetic rows and runs a few steps on CPU, in about a minute. The test suite runs
# every notebook that way. Without it, it runs for real; nothing needs editing.

# %% [markdown]
# ## Install
#
# On Colab this cell installs the exact versions this repository is tested with
# (`requirements.txt`) and the repository itself, for its small `dpo` library. Anywhere else it
# does nothing: run the notebook in the repository's environment (`pip install -r requirements.txt`).

# %%
REPO_URL = "https://github.com/dpo-recipes/dpo-recipes"  # the one place the repository's address is written

import os
import subprocess
import sys

if "google.colab" in sys.modules:  # on Colab only; elsewhere use the repo's environment (requirements.txt)
    PINS = [  # exactly requirements.txt
        "torch==2.13.0",
        "transformers==5.23.0",
        "trl==1.16.0",
        "peft==0.21.2",
        "datasets==5.2.0",
        "bitsandbytes==0.50.2",
        "accelerate==1.15.0",
        "matplotlib==3.11.2",
        "gguf==0.19.0",
        "zstandard==0.25.0",
    ]
    if not os.path.isdir("dpo-recipes"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "dpo-recipes"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *PINS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", "dpo-recipes"], check=True)
    sys.path.insert(0, os.path.abspath("dpo-recipes"))  # importable now, without restarting the session
    for pin in PINS:  # a package the session had already imported keeps its old version until a restart
        name, version = pin.split("==")
        if name in sys.modules and getattr(sys.modules[name], "__version__", version).split("+")[0] != version:
            raise SystemExit(f"{name} was imported before this install: Runtime > Restart session, then Run all.")

# %% [markdown]
# ## What to train
#
# The model, the data and where the results go. `EPOCHS`: the recipe trains 3 epochs
# (about 45 optimizer steps of 64 pairs); one epoch, about 15 steps, shows the effect and
# takes roughly an hour on a T4, a few minutes on an A100.

# %%
from pathlib import Path

MODEL = "microsoft/phi-2"
DATASET = "jondurbin/truthy-dpo-v0.1"
OUTPUT_DIR = Path("outputs/dpo_phi2_qlora")  # adapter, metrics, curves
EPOCHS = 1

SMOKE = os.environ.get("DPO_SMOKE") == "1"
if SMOKE:  # a 2-layer Phi model and truthy-shaped rows, built locally: no download
    from dpo.offline.tiny import save_tiny_model, truthy_like_rows, write_jsonl

    MODEL = str(save_tiny_model("outputs/smoke/tiny-phi"))
    DATASET = str(write_jsonl(truthy_like_rows(64), "outputs/smoke/truthy.jsonl"))
print(f"model: {MODEL}\ndata:  {DATASET}\nsmoke mode: {SMOKE}")

# %% [markdown]
# ## Hardware
#
# Precision follows the GPU (`dpo/train/hardware.py`): **bf16** where the GPU has it (A100, L4,
# H100, RTX 30xx and newer); **fp32 compute** where it does not (T4, V100), because DPO's
# summed log-probabilities overflow in fp16 and give NaN losses. The 4-bit weights are the
# same either way.

# %%
import torch

from dpo.train.hardware import describe, detect_precision

precision = detect_precision()
print(f"{precision.reason} -> {describe(precision.bf16, precision.fp16, precision.dtype)}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"GPU memory: {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); bf16: {precision.bf16}")
elif not SMOKE:
    raise RuntimeError("No GPU. In Colab: Runtime > Change runtime type > T4 GPU, then run again.")

# %% [markdown]
# ## The recipe's settings
#
# Read `recipes/dpo_phi2.yaml` with the recipe's own parser (TRL's `TrlParser`), as
# `accelerate launch recipes/dpo_phi2.py` would. The list below overrides a few fields,
# exactly like command-line flags.

# %%
import runpy
import warnings
from pathlib import Path

import dpo
from dpo.train.config import load_recipe_args

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames options TRL uses; harmless
RECIPE = Path(dpo.__file__).resolve().parents[1] / "recipes" / "dpo_phi2.py"  # in the repository checkout
recipe = runpy.run_path(str(RECIPE))  # the recipe's definitions (ScriptArguments, main), not run

flags = [
    "--model_name_or_path",
    MODEL,
    "--dataset_name",
    DATASET,
    "--output_dir",
    str(OUTPUT_DIR),
    "--num_train_epochs",
    str(EPOCHS),
]
if SMOKE:  # a few steps of 4 pairs, and a learning rate a random tiny model notices
    flags += [
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "5e-3",
        "--eval_steps",
        "3",
        "--save_steps",
        "6",
        "--test_size",
        "0.2",
    ]
script_args, training_args, model_args = load_recipe_args(recipe["ScriptArguments"], RECIPE, flags)
batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
print(f"beta {training_args.beta}, learning rate {training_args.learning_rate}, {batch} pairs per step")

# %% [markdown]
# ## phi-2 in 4-bit
#
# QLoRA keeps the frozen base model in **4-bit NF4** (a 4-bit code spaced for normally
# distributed weights): phi-2 needs about 2 GB instead of 5.5 GB in fp16. Each layer
# is dequantized on the fly and computes in bf16 or fp32. *Double quantization* also
# compresses the per-block scale constants.

# %%
from dpo.compat import get_quantization_config

bnb_config = get_quantization_config(model_args)
print(
    f"4-bit: {bnb_config.load_in_4bit}, type: {bnb_config.bnb_4bit_quant_type}, "
    f"double quantization: {bnb_config.bnb_4bit_use_double_quant}, compute: {bnb_config.bnb_4bit_compute_dtype}"
)

# %% [markdown]
# ## LoRA adapters
#
# Only small matrices are trained: beside a frozen linear layer $W$, LoRA adds
# $\frac{\alpha}{r} B A$ with $A \in \mathbb{R}^{r \times d_{in}}$, $B \in \mathbb{R}^{d_{out} \times r}$,
# $B = 0$ at the start, so training starts from phi-2 exactly.
#
# phi-2's linear layers are `q_proj`, `k_proj`, `v_proj`, `dense`, `fc1`, `fc2`. Older
# tutorials target `Wqkv` and `out_proj`, names from phi-2's former remote code: they match
# nothing today, and PEFT would silently train nothing there. The check below refuses such
# names. It needs the model's config only, not its weights.

# %%
from dpo.compat import lora_config
from dpo.train.model_checks import check_lora_targets, load_model_config

targets = check_lora_targets(load_model_config(MODEL), model_args.lora_target_modules)
lora = lora_config(model_args)
print(f"LoRA r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout} on {len(targets)} layers:")
print(", ".join(targets[:6]), "...")

# %% [markdown]
# ## The data
#
# Each row of truthy-dpo has a `system` text, a `prompt`, a `chosen` and a `rejected` answer.

# %%
from dpo.data.loading import load_preference_data

raw = load_preference_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
print(f"{len(raw)} rows, fields {raw.column_names}\n")
for field in ("system", "prompt", "chosen", "rejected"):
    print(f"{field:>8}: {raw[0][field][:300]}")

# %% [markdown]
# phi-2 has no chat template. Its documented QA format is `Instruct: ...` then `Output:`;
# the system text opens the instruction (`phi2_qa_format`). TRL appends the end-of-text
# token to each answer, so the model also learns where to stop.
#
# The data doctor (`dpo/data/doctor.py`), which the recipe runs too, converts every row, checks
# it, and drops and counts degenerate ones (empty answers, chosen identical to rejected,
# duplicates) before any weights load. It counts lengths in tokens exactly as TRL will, and
# how many pairs `max_length` would cut.

# %%
from dpo.data.doctor import check_data
from dpo.data.formats import phi2_qa_format
from dpo.train.model_checks import load_tokenizer

tokenizer = load_tokenizer(MODEL)
report = check_data(
    raw,
    DATASET,
    tokenizer,
    prompt_format="text",
    text_format=phi2_qa_format,
    max_length=training_args.max_length,
    truncation_mode=training_args.truncation_mode,
)
print(report.summary())
print("\n--- the first pair as the model sees it:")
print(report.example["prompt"] + report.example["chosen"])

# %% [markdown]
# A seeded tenth of the pairs is held out: the trainer evaluates on it, and the answers
# compared below come from prompts the model never trained on.

# %%
from dpo.data.loading import split_heldout

train_pairs, heldout_pairs = split_heldout(report.kept, script_args.test_size, training_args.seed)
print(f"{len(train_pairs)} pairs to train on, {len(heldout_pairs)} held out")

# %% [markdown]
# ## Load phi-2 in 4-bit with LoRA, and the DPO trainer
#
# `build_dpo_trainer` (`dpo/train/trainer.py`, what the recipe calls) gives TRL's `DPOTrainer`
# the model id, the 4-bit settings and the LoRA settings; TRL loads the 4-bit base and
# wraps it with the adapters. No reference model is passed: DPO measures the policy
# against a frozen reference $\pi_{ref}$, and with LoRA that is the same base with the
# adapters switched off. One copy of phi-2 in memory serves both.

# %%
import bitsandbytes as bnb

from dpo.train.trainer import build_dpo_trainer

trainer = build_dpo_trainer(model_args, training_args, train_pairs, heldout_pairs, tokenizer)
model = trainer.model
n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
print(f"{n_4bit} linear layers in 4-bit; weights in memory: {model.get_memory_footprint() / 2**20:,.1f} MiB")

# %% [markdown]
# ## Train
#
# For each pair, DPO compares how much more likely the policy makes each answer than the
# reference does. The *implicit reward* of an answer is
# $\beta \log \frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}$, and the loss pushes the chosen
# answer's reward above the rejected one's: $-\log \sigma(r_{chosen} - r_{rejected})$.
# TRL logs these every step (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
# `rewards/accuracies`). `train_and_save` trains, evaluates on the held-out pairs and writes
# the adapter, the metrics and the curves to `OUTPUT_DIR`.

# %%
from dpo.train.trainer import train_and_save

metrics = train_and_save(trainer, (script_args, training_args, model_args))
for key in ("train_loss", "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
    print(f"{key:>24}: {metrics[key]:.4f}")

# %% [markdown]
# ## Reward curves
#
# What healthy training looks like: the **margin** (chosen minus rejected reward) grows; the
# **accuracy** (share of pairs whose chosen answer has the higher reward) rises towards 1;
# the rejected answers' **log-probability** falls faster than the chosen ones'. If the chosen
# log-probability falls steeply too, the model is learning to avoid both answers: lower the
# learning rate or raise `beta`. Dashed lines are the held-out pairs.

# %%
from IPython.display import Image, display

display(Image(filename=str(OUTPUT_DIR / "training_curves.png")))

# %% [markdown]
# ## Before and after, side by side
#
# Held-out prompts, greedy decoding. The *before* answer is the same model with its
# adapters disabled, which is exactly phi-2 in 4-bit: the reference DPO trained against.

# %%
import html

from IPython.display import HTML


def answer(model, prompt, max_new_tokens=10 if SMOKE else 160):
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.eos_token_id,
        )
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.split("\nInstruct:")[0].strip()  # phi-2 may go on with a new question


model.eval()
rows = []
for pair in heldout_pairs.select(range(2 if SMOKE else 4)):
    with model.disable_adapter():
        before = answer(model, pair["prompt"])
    rows.append((pair["prompt"], before, answer(model, pair["prompt"]), pair["chosen"].strip()))

# %%
cells = "".join(
    "<tr>"
    + "".join(
        f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{html.escape(c)}</td>" for c in row
    )
    + "</tr>"
    for row in rows
)
header = "".join(
    f"<th>{h}</th>" for h in ("prompt", "before: phi-2", "after: phi-2 + DPO adapter", "dataset's chosen answer")
)
display(HTML(f"<table><tr>{header}</tr>{cells}</table>"))

# %% [markdown]
# ## The saved adapter
#
# `OUTPUT_DIR` holds the LoRA adapter (a few tens of MB for phi-2), the tokenizer, every
# setting of the run (`resolved_config.yaml`, a valid `--config` to repeat it), the final
# metrics and the curves. Anyone with phi-2 can load the adapter on top of it with PEFT.

# %%
for path in sorted(OUTPUT_DIR.iterdir()):
    size = path.stat().st_size / 2**20 if path.is_file() else 0
    print(f"{path.name:32} {size:8.2f} MB" if path.is_file() else f"{path.name}/")

# %% [markdown]
# ## Merge the adapter for deployment
#
# Serving stacks are simplest with one plain model folder. `merge_and_unload` adds
# $\frac{\alpha}{r} B A$ into each base weight and drops the adapters. Merge into a
# **non-quantized** load of the base (bf16, fp16 or fp32), not the 4-bit one: adding the
# update into 4-bit codes would round most of it away. First free the training model.
#
# The adapter was trained against the 4-bit base, so the merged 16-bit model answers very
# slightly differently from the 4-bit model with the adapter; that is normal for QLoRA.

# %%
import gc

del trainer, model
gc.collect()
if torch.cuda.is_available():
    torch.cuda.empty_cache()

# %%
from peft import PeftModel
from transformers import AutoModelForCausalLM

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if precision.bf16 else torch.float16 if device == "cuda" else torch.float32
base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, device_map={"": device}, use_safetensors=True)
with_adapter = PeftModel.from_pretrained(base, str(OUTPUT_DIR))
probe = tokenizer(heldout_pairs[0]["prompt"], return_tensors="pt").to(device)
with torch.no_grad():
    before_merge = with_adapter(**probe).logits.float()
merged = with_adapter.merge_and_unload()
with torch.no_grad():
    after_merge = merged(**probe).logits.float()
merge_change = (after_merge - before_merge).abs().max().item()
print(f"{type(merged).__name__}; largest logit change from merging: {merge_change:.2e}")

# %% [markdown]
# Save it as an ordinary model folder. It loads with `AutoModelForCausalLM.from_pretrained`
# alone (no PEFT) and serves with vLLM, TGI or `transformers` as is.

# %%
MERGED_DIR = OUTPUT_DIR.with_name(OUTPUT_DIR.name + "-merged")
merged.save_pretrained(MERGED_DIR)
tokenizer.save_pretrained(MERGED_DIR)
print(sorted(p.name for p in MERGED_DIR.iterdir()))

# %% [markdown]
# ## Next
#
# * The same run from a terminal, all 3 epochs: `accelerate launch recipes/dpo_phi2.py`;
#   any setting as a flag, e.g. `--beta 0.2`.
# * How the loss works, from the Bradley-Terry model to a training loop that matches TRL:
#   `dpo_from_scratch.ipynb`.
# * Your own preference data: `dpo_your_dataset.ipynb`.

# %%
# For tests/notebooks/test_notebooks.py: with DPO_RESULTS naming a file, the numbers it checks go there as JSON.
import json

if os.environ.get("DPO_RESULTS"):
    results = {"smoke": SMOKE, "metrics": metrics, "merge_max_logit_change": merge_change}
    Path(os.environ["DPO_RESULTS"]).write_text(json.dumps(results, indent=2))
