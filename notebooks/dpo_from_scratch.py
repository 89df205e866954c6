# ---
# jupyter:
#   colab:
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
# # DPO from scratch
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dpo-recipes/dpo-recipes/blob/main/notebooks/dpo_from_scratch.ipynb)
#
# From the Bradley-Terry model of preferences to the DPO loss in five short steps. Then the
# loss and a plain PyTorch training loop from this repository (`dpo/scratch/loss.py`,
# `dpo/scratch/loop.py`) train a tiny language model, and the same batches go through TRL's
# `DPOTrainer`: the numbers agree. It all runs on a CPU in a minute or two.
#
# **Smoke mode.** With `DPO_SMOKE=1` in the environment the training runs are shorter; the
# test suite runs every notebook that way.

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
# ## 1. Preferences from rewards: Bradley-Terry
#
# People compare two answers $y_w$ (preferred, *chosen*) and $y_l$ (*rejected*) to a prompt
# $x$. The Bradley-Terry model says a hidden reward $r(x, y)$ decides how often $y_w$ wins:
#
# $$p(y_w \succ y_l \mid x) = \sigma\big(r(x, y_w) - r(x, y_l)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}}.$$
#
# RLHF fits a reward model $r_\phi$ to the comparisons by maximum likelihood, that is by
# minimising $-\log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)$ over the data.

# %% [markdown]
# ## 2. RLHF's objective has an exact solution
#
# RLHF then tunes the policy $\pi$ for reward, with a penalty for drifting from the
# reference model $\pi_{ref}$ (the model before tuning), of strength $\beta$:
#
# $$\max_\pi \; \mathbb{E}_{x,\; y \sim \pi(\cdot \mid x)}\big[r(x, y)\big] \;-\; \beta\, \mathrm{KL}\big[\pi(\cdot \mid x) \,\|\, \pi_{ref}(\cdot \mid x)\big].$$
#
# Its optimum has a closed form:
#
# $$\pi^*(y \mid x) = \frac{1}{Z(x)}\, \pi_{ref}(y \mid x)\, \exp\!\big(r(x, y) / \beta\big), \qquad Z(x) = \sum_y \pi_{ref}(y \mid x)\, \exp\!\big(r(x, y)/\beta\big).$$
#
# $Z(x)$ sums over every possible text, so nobody can compute it; that is why RLHF
# samples and uses PPO instead.

# %% [markdown]
# ## 3. A reward is a policy in disguise
#
# Take the logarithm and solve for the reward:
#
# $$r(x, y) = \beta \log \frac{\pi^*(y \mid x)}{\pi_{ref}(y \mid x)} + \beta \log Z(x).$$
#
# Put that into Bradley-Terry. Both answers share the prompt, so $\beta \log Z(x)$ appears
# twice and cancels in the difference:
#
# $$p(y_w \succ y_l \mid x) = \sigma\!\left(\beta \log \frac{\pi^*(y_w \mid x)}{\pi_{ref}(y_w \mid x)} - \beta \log \frac{\pi^*(y_l \mid x)}{\pi_{ref}(y_l \mid x)}\right).$$
#
# The preferences are now a function of the policy alone.

# %% [markdown]
# ## 4. The DPO loss
#
# So fit the policy $\pi_\theta$ to the preferences directly, by maximum likelihood:
#
# $$\mathcal{L}_{DPO}(\pi_\theta; \pi_{ref}) = -\,\mathbb{E}_{(x, y_w, y_l)} \left[\log \sigma\!\left(\beta \log \frac{\pi_\theta(y_w \mid x)}{\pi_{ref}(y_w \mid x)} - \beta \log \frac{\pi_\theta(y_l \mid x)}{\pi_{ref}(y_l \mid x)}\right)\right].$$
#
# No reward model, no sampling: a classification loss on log-probabilities. The term
# $\hat r_\theta(x, y) = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_{ref}(y \mid x)}$ is
# the **implicit reward**. TRL logs its batch means as `rewards/chosen` and
# `rewards/rejected`, their difference as `rewards/margins`, and the share of pairs with
# $\hat r(y_w) > \hat r(y_l)$ as `rewards/accuracies`.

# %% [markdown]
# ## 5. What the gradient does
#
# $$\nabla_\theta \mathcal{L}_{DPO} = -\beta\, \mathbb{E}\Big[\underbrace{\sigma\big(\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w)\big)}_{\text{large when the pair is ranked wrong}} \big(\nabla_\theta \log \pi_\theta(y_w \mid x) - \nabla_\theta \log \pi_\theta(y_l \mid x)\big)\Big].$$
#
# Raise the chosen answer's likelihood, lower the rejected one's, and weigh each pair by how
# wrongly the implicit reward ranks it. Pairs already ranked right count little.

# %% [markdown]
# ## The loss on a few numbers
#
# `dpo_loss` (`dpo/scratch/loss.py`) takes the summed log-probabilities of each answer under the
# policy and under the reference. Two pairs: the first ranked right (chosen up, rejected
# down against the reference), the second ranked wrong.

# %%
import math

import torch
import torch.nn.functional as F

from dpo.scratch.loss import dpo_loss

beta = 0.1
policy_chosen, policy_rejected = torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -26.0])
reference_chosen, reference_rejected = torch.tensor([-13.0, -29.0]), torch.tensor([-14.0, -27.0])

out = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)
by_hand = -F.logsigmoid(beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)))
print("dpo_loss:", out.losses, "\nby hand: ", by_hand)
print("implicit rewards: chosen", out.chosen_rewards, "rejected", out.rejected_rewards)

# %% [markdown]
# When the policy *is* the reference, every log-ratio and every implicit reward is 0, and
# the loss is $\log 2 \approx 0.693$ for every pair: that is where training starts.

# %% [markdown]
# ## $\log \pi(y \mid x)$ from a language model
#
# A causal language model gives every next token a probability, so the log-probability of
# a whole answer is the sum over its tokens,
# $\log \pi(y \mid x) = \sum_t \log \pi(y_t \mid x, y_{<t})$. Prompt and padding tokens are not
# scored. The model here is a randomly initialised 2-layer Phi (phi-2's architecture, 0.1M
# parameters, `dpo/offline/tiny.py`); the pairs have truthy-dpo's shape, in phi-2's prompt format.

# %%
import copy

from dpo.data.formats import phi2_qa_format
from dpo.offline.tiny import build_tiny_model, build_tokenizer, truthy_like_rows

SMOKE = os.environ.get("DPO_SMOKE") == "1"
STEPS = 12 if SMOKE else 60  # optimizer steps in each training run below

tokenizer = build_tokenizer()
policy = build_tiny_model(tokenizer, seed=0)
pairs = [phi2_qa_format(row) for row in truthy_like_rows(32)]
print(f"{sum(p.numel() for p in policy.parameters()):,} parameters, {len(pairs)} pairs, e.g.\n")
print(pairs[0]["prompt"] + pairs[0]["chosen"])

# %% [markdown]
# Tokenize as TRL does: prompt + answer + end-of-text token, where the answer's tokens are
# those after the prompt's. `collate` stacks a batch of $B$ pairs into $2B$ padded rows,
# the chosen rows first, with a mask marking the answer tokens.

# %%
from dpo.scratch.loop import collate


def tokenize(pair):
    prompt_ids = tokenizer(pair["prompt"])["input_ids"]
    full = {k: tokenizer(pair["prompt"] + pair[k] + tokenizer.eos_token)["input_ids"] for k in ("chosen", "rejected")}
    assert all(ids[: len(prompt_ids)] == prompt_ids for ids in full.values())
    return {"prompt_ids": prompt_ids, **{f"{k}_ids": ids[len(prompt_ids) :] for k, ids in full.items()}}


BATCH = 4
examples = [tokenize(pair) for pair in pairs]
batches = [collate(examples[i : i + BATCH], tokenizer.eos_token_id) for i in range(0, len(examples), BATCH)]
print({k: tuple(v.shape) for k, v in batches[0].items()})

# %%
from dpo.scratch.logps import sequence_logps

batch = batches[0]
labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # -100: not scored
with torch.no_grad():
    seq = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)

answer = seq.mask[0]  # row 0: the first chosen answer
for token_id, logp in zip(batch["input_ids"][0, 1:][answer], seq.token_logps[0][answer]):
    print(f"{tokenizer.decode([token_id])!r:>16} {logp:7.3f}")
print(
    f"log π(y|x) = {seq.logps[0]:.2f}  (a random model: about log(1/{len(tokenizer)}) = {-math.log(len(tokenizer)):.2f} per token)"
)

# %% [markdown]
# ## Training with a plain PyTorch loop
#
# One step of `dpo.scratch.loop.train`: the policy scores the $2B$ rows (with gradients); the
# reference scores them too (without: a frozen copy of the starting model, or for a LoRA
# model the same model with its adapters disabled); `dpo_loss`; backward; clip the gradient
# norm at 1; AdamW with a linear warm-up and decay. These are DPOConfig's defaults, so the
# loop can be compared with TRL step by step. First, step 0:

# %%
from dpo.scratch.loop import dpo_batch_loss, make_reference, train

initial = copy.deepcopy(policy)  # the starting point, for TRL below
loss, metrics = dpo_batch_loss(policy, make_reference(policy), batches[0], beta=0.1)
print(f"step 0: loss {loss:.4f} (log 2 = {math.log(2):.4f}), reward margin {metrics['rewards/margins']}")

# %%
HYPER = dict(beta=0.1, lr=1e-3, warmup_steps=2)
ours = train(policy, batches, num_steps=STEPS, progress=False, **HYPER)

print(" step    loss  chosen  rejected  margin  accuracy")
for step, h in enumerate(ours, start=1):
    if step % max(1, STEPS // 6) == 0 or step == 1:
        print(
            f"{step:5d} {h['loss']:7.4f} {h['rewards/chosen']:7.3f} {h['rewards/rejected']:9.3f} "
            f"{h['rewards/margins']:7.3f} {h['rewards/accuracies']:9.2f}"
        )

# %% [markdown]
# ## The same batch through TRL's `DPOTrainer`
#
# Give TRL the trained policy, the starting model as its reference, and the same pairs as
# text. TRL tokenizes and collates them itself: its first batch is ours, token for token,
# and its loss on it is ours. (TRL computes log-probabilities with a fused, chunked kernel
# and we use the full logits, so they agree to float32 round-off, not bit for bit.)

# %%
from datasets import Dataset
from transformers import PrinterCallback

from dpo.compat import DPOConfig, DPOTrainer


def trl_trainer(model, max_steps=1):
    args = DPOConfig(
        output_dir="outputs/dpo_from_scratch",
        beta=HYPER["beta"],
        learning_rate=HYPER["lr"],
        warmup_steps=HYPER["warmup_steps"],
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        train_sampling_strategy="sequential",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(initial),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # we print our own comparison instead of every log line
    return trainer


# %%
trainer = trl_trainer(policy)
trl_batch = next(iter(trainer.get_train_dataloader()))
same_tokens = all(torch.equal(trl_batch[k], batches[0][k]) for k in ("input_ids", "attention_mask", "completion_mask"))
trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
our_loss = dpo_batch_loss(policy, initial, batches[0], beta=HYPER["beta"])[0].item()
print(f"same tokens: {same_tokens}\nTRL's loss:  {trl_loss:.7f}\nour loss:    {our_loss:.7f}")
assert same_tokens and abs(trl_loss - our_loss) <= 1e-5 * abs(trl_loss)

# %% [markdown]
# ## A whole run, twice
#
# Now TRL trains from the same starting weights, on the same batches in the same order,
# with the same optimizer and schedule. Its logged loss and rewards follow our loop step by
# step.

# %%
trainer = trl_trainer(initial, max_steps=STEPS)
trainer.train()
theirs = [log for log in trainer.state.log_history if "rewards/margins" in log]
keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")
gap = max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in keys)
print(f"{len(theirs)} steps each; largest difference in loss or rewards over the run: {gap:.1e}")
assert len(theirs) == STEPS and gap < 1e-4

# %% [markdown]
# ## Implicit rewards over training
#
# The chosen answers' implicit reward rises, the rejected answers' falls, and the margin
# between them grows while the loss falls from $\log 2$. Lines: our loop; dots: TRL. With
# real models both rewards often fall, the rejected faster: the margin is what DPO
# optimises, not either reward alone.

# %%
import matplotlib.pyplot as plt

steps = range(1, STEPS + 1)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
for key, color in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"), ("rewards/margins", "tab:blue")):
    left.plot(steps, [h[key] for h in ours], color=color, label=key.split("/")[1])
    left.plot(steps, [h[key] for h in theirs], "o", color=color, markersize=3)
left.set(title="implicit rewards, β log π/π_ref (lines: ours, dots: TRL)", xlabel="step")
left.legend()
right.plot(steps, [h["loss"] for h in ours], label="ours")
right.plot(steps, [h["loss"] for h in theirs], "o", markersize=3, label="TRL")
right.axhline(math.log(2), color="gray", linestyle=":", label="log 2")
right.set(title="DPO loss", xlabel="step")
right.legend()
plt.show()

# %% [markdown]
# ## Next
#
# * `dpo/scratch/loss.py` also has IPO, hinge (SLiC), robust and conservative DPO, f-divergences and
#   more, each checked against TRL in `tests/scratch/test_loss_agreement.py`.
# * `dpo_phi2_qlora.ipynb`: the same loss on phi-2, in 4-bit with LoRA, where the reference
#   is the model with its adapters disabled.

# %%
# For tests/notebooks/test_notebooks.py: with DPO_RESULTS naming a file, the numbers it checks go there as JSON.
import json
from pathlib import Path

if os.environ.get("DPO_RESULTS"):
    results = {
        "same_tokens": same_tokens,
        "trl_loss": trl_loss,
        "our_loss": our_loss,
        "steps": len(theirs),
        "max_gap": gap,
    }
    Path(os.environ["DPO_RESULTS"]).write_text(json.dumps(results, indent=2))
