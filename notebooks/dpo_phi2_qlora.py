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
# misconceptions), on one 16 GB GPU. A free Colab T4 should be enough: at 1024 tokens the recipe's
# defaults peaked at 4.60 GiB allocated in fp16 (5.12 GiB in fp32 under a 15 GiB cap), measured at phi-2's
# exact size with random weights on an H200 (BENCHMARKS.md), not on a T4 itself.
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
# ## Parameters
#
# The model, the data, where the results go, and the few numbers smoke mode changes. `EPOCHS`: the
# recipe trains 3 epochs (about 45 optimizer steps of 64 pairs); one epoch, about 15 steps, shows
# the effect; our estimate (not measured on a T4 or an A100: the one GPU run so far was an H200) is
# about an hour on a T4 and a few minutes on an A100. Every other setting is in
# the cells below, as the arguments of the real calls, with `recipes/dpo_phi2.yaml`'s values.

# %%
from pathlib import Path

MODEL = "microsoft/phi-2"
DATASET = "jondurbin/truthy-dpo-v0.1"
OUTPUT_DIR = Path("outputs/dpo_phi2_qlora")  # adapter, metrics, curves
EPOCHS = 1
MAX_STEPS = -1  # -1: train EPOCHS epochs
BATCH, ACCUMULATION = 2, 32  # 2 pairs per forward x 32 = the DPO paper's 64 pairs per optimizer step
LEARNING_RATE = 5e-5  # LoRA takes about 10x the paper's full fine-tuning rate
EVAL_STEPS = 10
TEST_SIZE = 0.1  # a seeded tenth of the pairs held out

SMOKE = os.environ.get("DPO_SMOKE") == "1"
if SMOKE:  # a 2-layer Phi model and truthy-shaped rows, built locally: no download; a few CPU steps
    from dpo.offline.tiny import save_tiny_model, truthy_like_rows, write_jsonl

    MODEL = str(save_tiny_model("outputs/smoke/tiny-phi"))
    DATASET = str(write_jsonl(truthy_like_rows(64), "outputs/smoke/truthy.jsonl"))
    MAX_STEPS, BATCH, ACCUMULATION, LEARNING_RATE, EVAL_STEPS, TEST_SIZE = 6, 4, 1, 5e-3, 3, 0.2
print(f"model: {MODEL}\ndata:  {DATASET}\nsmoke mode: {SMOKE}")

# %% [markdown]
# ## Hardware
#
# Precision follows the GPU (`dpo/train/hardware.py`): **bf16** where the GPU has it (A100, L4,
# H100, RTX 30xx and newer). Where it does not (T4, V100) the recipe trains in fp16 mixed precision,
# measured finite on a GPU at phi-2's size (random weights; BENCHMARKS.md), with a stop on the first
# non-finite loss. This notebook calls plain TRL, which has no such stop, so there it keeps **fp32
# compute**: slower, but nothing can overflow fp16's range. The 4-bit weights are the same either way.

# %%
import torch

from dpo.train.hardware import describe, detect_precision

precision = detect_precision()
COMPUTE_DTYPE = torch.bfloat16 if precision.bf16 else torch.float32  # no fp16 here: plain TRL has no NaN stop
print(f"{precision.reason}\nthis notebook: {describe(precision.bf16, False, str(COMPUTE_DTYPE).split('.')[1])}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"GPU memory: {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); bf16: {precision.bf16}")
elif not SMOKE:
    raise RuntimeError("No GPU. In Colab: Runtime > Change runtime type > T4 GPU, then run again.")

# %% [markdown]
# ## phi-2 in 4-bit: `BitsAndBytesConfig`
#
# QLoRA keeps the frozen base model in **4-bit NF4** (a 4-bit code spaced for normally
# distributed weights): phi-2 needs about 2 GB instead of 5.5 GB in fp16. Each layer
# is dequantized on the fly and computes in bf16 or fp32. *Double quantization* also
# compresses the per-block scale constants.

# %%
from transformers import BitsAndBytesConfig

bnb_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=COMPUTE_DTYPE,
)

# %% [markdown]
# ## LoRA adapters: `LoraConfig`
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
from peft import LoraConfig

from dpo.train.model_checks import check_lora_targets, load_model_config

peft_config = LoraConfig(
    r=16,
    lora_alpha=32,  # scale alpha / r = 2
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    task_type="CAUSAL_LM",
)
targets = check_lora_targets(load_model_config(MODEL), list(peft_config.target_modules))
print(
    f"LoRA r={peft_config.r}, alpha={peft_config.lora_alpha} on {len(targets)} layers:", ", ".join(targets[:6]), "..."
)

# %% [markdown]
# ## The data
#
# Each row of truthy-dpo has a `system` text, a `prompt`, a `chosen` and a `rejected` answer.

# %%
from dpo.data.loading import load_preference_data

raw = load_preference_data(DATASET)
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
# how many pairs `max_length` would cut. A seeded tenth is held out: the trainer evaluates on it,
# and the answers compared below come from prompts the model never trained on.

# %%
from dpo.data.doctor import check_data
from dpo.data.formats import phi2_qa_format
from dpo.data.loading import split_heldout
from dpo.train.model_checks import load_tokenizer

MAX_LENGTH = 1024  # prompt + answer tokens; truthy pairs are far shorter
tokenizer = load_tokenizer(MODEL)
report = check_data(raw, DATASET, tokenizer, prompt_format="text", text_format=phi2_qa_format, max_length=MAX_LENGTH)
print(report.summary())
print("\n--- the first pair as the model sees it:")
print((report.example["prompt"] + report.example["chosen"])[:1200])
train_pairs, heldout_pairs = split_heldout(report.kept, TEST_SIZE, seed=42)
print(f"{len(train_pairs)} pairs to train on, {len(heldout_pairs)} held out")

# %% [markdown]
# ## Load phi-2 in 4-bit
#
# `from_pretrained` with the 4-bit settings. On a CPU with AVX512-BF16 (smoke mode on a recent
# laptop or server), bitsandbytes would switch a 4-bit layer to an inference-only kernel at its
# first evaluation and later training steps would fail; `use_portable_4bit_kernels` keeps one
# kernel everywhere (on a GPU it changes nothing).

# %%
from transformers import AutoModelForCausalLM

from dpo.train.speed.kernels import use_portable_4bit_kernels

model = AutoModelForCausalLM.from_pretrained(
    MODEL,
    quantization_config=bnb_config,
    dtype=COMPUTE_DTYPE,
    device_map={"": 0} if torch.cuda.is_available() else None,
    use_safetensors=True,
)
n_4bit = use_portable_4bit_kernels(model)
print(f"{n_4bit} linear layers in 4-bit; weights in memory: {model.get_memory_footprint() / 2**20:,.1f} MiB")

# %% [markdown]
# ## The DPO trainer: `DPOConfig` and `DPOTrainer`
#
# `ref_model=None` with a `peft_config`: DPO measures the policy against a frozen reference
# $\pi_{ref}$, and with LoRA that is the same base with the adapters switched off. One copy of
# phi-2 in memory serves both. The settings are the recipe's (`recipes/dpo_phi2.yaml`).

# %%
from trl import DPOConfig, DPOTrainer

from dpo.compat import keep_trainable_weights_fp32

training_args = DPOConfig(
    output_dir=str(OUTPUT_DIR),
    beta=0.1,  # the DPO paper's beta
    loss_type=["sigmoid"],  # the paper's loss
    learning_rate=LEARNING_RATE,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=0.1,
    num_train_epochs=EPOCHS,
    max_steps=MAX_STEPS,
    per_device_train_batch_size=BATCH,
    gradient_accumulation_steps=ACCUMULATION,
    per_device_eval_batch_size=4,
    max_length=MAX_LENGTH,
    activation_checkpointing=True,  # recompute activations in the backward pass: slower, far less memory
    activation_checkpointing_kwargs={"use_reentrant": False},
    bf16=precision.bf16,
    use_cpu=not torch.cuda.is_available(),
    eval_strategy="steps",
    eval_steps=EVAL_STEPS,
    save_strategy="no",
    logging_steps=1,
    report_to="none",
    seed=42,
)
trainer = DPOTrainer(
    model=model,
    ref_model=None,
    args=training_args,
    train_dataset=train_pairs,
    eval_dataset=heldout_pairs,
    processing_class=tokenizer,
    peft_config=peft_config,
)
model = trainer.model  # the PeftModel: phi-2 in 4-bit with the adapters
if not precision.bf16:  # TRL stores a 4-bit model's LoRA weights in bf16; with fp32 compute keep them fp32
    keep_trainable_weights_fp32(trainer, "float32", fp16=False)
model.print_trainable_parameters()

# %% [markdown]
# **What the recipe adds on top.** `accelerate launch recipes/dpo_phi2.py` builds this same
# `DPOTrainer` through `dpo.train.trainer.build_dpo_trainer(model_args, training_args, train, heldout,
# tokenizer)`, which adds: the data doctor's checks before any weights load, checkpoints that are
# complete or visibly not (`--resume_from_checkpoint last`), a stop on a non-finite loss, Ctrl-C and
# SIGTERM that save first, a lock so two runs cannot share an output folder, the reference
# log-probs computed once and cached on disk, and length-grouped batches (less padding).
# `train_and_save` then writes the adapter, metrics and curves whole.

# %% [markdown]
# ## Train
#
# For each pair, DPO compares how much more likely the policy makes each answer than the
# reference does. The *implicit reward* of an answer is
# $\beta \log \frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}$, and the loss pushes the chosen
# answer's reward above the rejected one's: $-\log \sigma(r_{chosen} - r_{rejected})$.
# TRL logs these every step (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
# `rewards/accuracies`).

# %%
import json

from dpo.plots import plot_training_curves

trainer.train()
metrics = {**trainer.state.log_history[-1], **trainer.evaluate()}
trainer.save_model(str(OUTPUT_DIR))
tokenizer.save_pretrained(OUTPUT_DIR)
(OUTPUT_DIR / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
plot_training_curves(trainer.state.log_history, OUTPUT_DIR / "training_curves.png")
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
# `OUTPUT_DIR` holds what the cells above saved: the LoRA adapter (a few tens of MB for phi-2),
# the tokenizer, the final metrics and the curves. (The recipe, `recipes/dpo_phi2.py`, also writes
# every setting of its run to `resolved_config.yaml`, a valid `--config` to repeat it; this notebook
# passes its settings in code, above.) Anyone with phi-2 can load the adapter on top of it with PEFT.

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
