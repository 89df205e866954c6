"""dpo/scratch/loop.py reproduces a real TRL DPOTrainer run step by step.

Same tiny model and initial weights, same batches in the same order (TRL's own collated batches,
sequential sampling), same AdamW (torch, lr, betas, eps, weight decay on matrices only), same
linear warm-up/decay schedule and gradient clipping at 1.0. The per-step loss must match TRL's
logged loss within 1e-4 (absolute; TRL's own regression tolerance) for 20 steps, and so must the
reward metrics (absolute), the pre-clipping gradient norm (relative) and the learning rate. Two setups: full fine-tuning against a frozen
copy of the initial model, and LoRA against the same model with adapters disabled.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    METRICS,
    make_trainer,
    preference_dataset,
    tiny_policy_and_reference,
)

from dpo.scratch.loop import collate, dpo_batch_loss, forward_logps, make_reference, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread

STEPS = 20
ATOL = 1e-4  # per-step loss and metrics
HYPER = dict(learning_rate=2e-3, weight_decay=0.05, warmup_steps=3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)


def run_both(policy, trl_reference, tokenizer, loss_kwargs):
    """Train TRL (given `trl_reference`) and our loop (default reference) from identical copies of
    `policy`; return (TRL's per-step logs, ours)."""
    ours_model = copy.deepcopy(policy)  # before TRL patches its copy
    trainer = make_trainer(
        policy,
        trl_reference,
        tokenizer,
        preference_dataset(),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        logging_steps=1,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        **HYPER,
        **loss_kwargs,
    )
    batches = list(trainer.get_train_dataloader())  # one epoch, in the order the trainer will see it
    assert len(batches) == 4  # 8 pairs, 2 per batch: 20 steps = 5 epochs
    trainer.train()
    trl_logs = [log for log in trainer.state.log_history if "loss" in log and "train_runtime" not in log]

    ours = train(
        ours_model,
        batches,
        num_steps=STEPS,
        lr=HYPER["learning_rate"],
        weight_decay=HYPER["weight_decay"],
        betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]),
        eps=HYPER["adam_epsilon"],
        warmup_steps=HYPER["warmup_steps"],
        max_grad_norm=1.0,
        progress=False,
        **loss_kwargs,
    )
    return trl_logs, ours


def assert_same_run(trl_logs, ours):
    assert len(trl_logs) == len(ours) == STEPS
    for step, (theirs, mine) in enumerate(zip(trl_logs, ours)):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=ATOL), step
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=ATOL), step
        assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-6), step
        for key in METRICS:
            assert mine[key] == pytest.approx(theirs[key], abs=ATOL), (step, key)
    # the run must actually train, or agreement would be trivial
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05
    assert ours[-1]["rewards/margins"] > 0.1


@pytest.mark.slow
def test_full_finetuning_matches_trl():
    """No adapter: the reference is a frozen copy of the initial policy (`make_reference`)."""
    tokenizer, policy, _ = tiny_policy_and_reference()
    trl_logs, ours = run_both(policy, copy.deepcopy(policy), tokenizer, dict(beta=0.1, loss_type=["sigmoid"]))
    assert ours[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy = reference
    assert_same_run(trl_logs, ours)


@pytest.mark.slow
def test_lora_matches_trl():
    """LoRA: the reference is the same PeftModel with its adapters disabled. TRL, given a PeftModel
    that already has an adapter, uses a frozen copy of it; LoRA's B = 0 at init makes both the base."""
    from peft import LoraConfig, get_peft_model

    tokenizer, base, _ = tiny_policy_and_reference()
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    )
    policy = get_peft_model(copy.deepcopy(base), lora)
    assert make_reference(policy) is None  # no copy of the weights: disable_adapter() instead
    trl_logs, ours = run_both(
        policy, None, tokenizer, dict(beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    )
    assert_same_run(trl_logs, ours)


def test_collate_matches_trl_collator():
    tokenizer, policy, reference = tiny_policy_and_reference()
    trainer = make_trainer(policy, reference, tokenizer, preference_dataset())
    examples = [trainer.train_dataset[i] for i in range(4)]
    theirs = trainer.data_collator(examples)
    mine = collate(examples, pad_token_id=tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type=["discopop", "nca_pair"], use_weighting=True, ld_alpha=0.5),
        dict(loss_type=["ipo", "sigmoid_norm"], loss_weights=[0.5, 1.0], ld_alpha=0.2, beta=0.5),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], f_divergence_type="forward_kl"),
        dict(loss_type=["robust"], label_smoothing=0.2, f_divergence_type="js_divergence", use_weighting=True),
    ],
    ids=["wpo-ld-discopop-nca", "ld-ipo-sigmoid_norm", "fkl-rpo", "wpo-js-robust"],
)
def test_batch_loss_matches_trl(cfg):
    """The loop's per-batch glue (LD-DPO, WPO, lengths, sft) gives TRL's loss on TRL's batch."""
    tokenizer, policy, reference = tiny_policy_and_reference()
    trainer = make_trainer(policy, reference, tokenizer, preference_dataset(), **cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model.train(), batch).item()
    mine, metrics = dpo_batch_loss(trainer.model, trainer.ref_model, batch, **cfg)
    assert mine.item() == pytest.approx(theirs, rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(trainer._metrics["train"]["rewards/margins"][-1], rel=1e-5)


def test_reference_free_needs_no_reference():
    """reference_free: no reference forward at all; the loss is -log sigma(beta (log pi(y_w) - log pi(y_l)))."""
    tokenizer, policy, _ = tiny_policy_and_reference()
    trainer = make_trainer(policy, policy, tokenizer, preference_dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    model = copy.deepcopy(policy)
    loss, _ = dpo_batch_loss(model, None, batch, beta=0.1, reference_free=True)
    logps = forward_logps(model, batch).logps
    B = logps.shape[0] // 2
    expected = -torch.nn.functional.logsigmoid(0.1 * (logps[:B] - logps[B:])).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    history = train(model, [batch], num_steps=2, lr=1e-3, reference_free=True, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
