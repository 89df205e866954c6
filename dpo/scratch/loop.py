"""A from-scratch DPO training loop in plain PyTorch, on top of dpo/scratch/loss.py.

One step:
  1. one forward of the policy on the concatenated batch [prompt+chosen; prompt+rejected] (2B rows),
  2. the same forward, without gradient, through the reference: the model with its LoRA adapters
     disabled when it is a PeftModel, otherwise a frozen copy of the model taken before training,
  3. `dpo_loss` on the summed completion log-probs, 4. backward, gradient clipping, AdamW, a
     linear warm-up/decay schedule, and the reward metrics TRL logs.

The batch format is TRL's (`DataCollatorForPreference`): input_ids, attention_mask and
completion_mask of shape (2B, T), right-padded, the B chosen rows first. `collate` builds it.
tests/scratch/test_loop_agreement.py checks that, fed the same batches, this loop reproduces the per-step
loss of TRL's DPOTrainer.

Plain PyTorch only: a 4-bit (bitsandbytes) model is the caller's to prepare. On a CPU with
AVX512-BF16, call `dpo.train.speed.kernels.use_portable_4bit_kernels(model)` (and on a reference
passed in) before `train`, as tests/train/speed/test_kernels.py does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dpo.scratch.logps import SequenceLogps, ld_logps, sequence_logps, sft_nll, wpo_weights
from dpo.scratch.loss import dpo_loss
from dpo.scratch.loss_settings import LENGTH_LOSS_TYPES


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token-id pairs {"prompt_ids", "chosen_ids", "rejected_ids"} -> a right-padded (2B, T) batch,
    chosen rows first: input_ids, attention_mask, completion_mask (1 on completion tokens)."""
    rows = [ex["prompt_ids"] + ex[key] for key in ("chosen_ids", "rejected_ids") for ex in examples]
    n_prompt = [len(ex["prompt_ids"]) for ex in examples] * 2
    T = max(len(r) for r in rows)
    batch = {
        k: torch.zeros(len(rows), T, dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask")
    }
    batch["input_ids"].fill_(pad_token_id)
    for i, (row, p) in enumerate(zip(rows, n_prompt)):
        batch["input_ids"][i, : len(row)] = torch.tensor(row)
        batch["attention_mask"][i, : len(row)] = 1
        batch["completion_mask"][i, p : len(row)] = 1
    return batch


def forward_logps(model: nn.Module, batch: dict, with_log_sum_sq_probs: bool = False) -> SequenceLogps:
    """Per-token and summed log-probs of the completion tokens of every row of the batch."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # score completions only
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, labels, with_log_sum_sq_probs=with_log_sum_sq_probs)


def reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Batch means as TRL logs them: rewards/{chosen,rejected,margins}, rewards/accuracies (the
    fraction of pairs whose implicit reward ranks y_w strictly above y_l) and logps/{chosen,rejected}.
    All inputs (B,)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


def split_pairs(logps: SequenceLogps) -> tuple[SequenceLogps, SequenceLogps]:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B] -> (chosen, rejected)."""
    B = logps.logps.shape[0] // 2
    return tuple(
        SequenceLogps(*(None if t is None else t[rows] for t in logps)) for rows in (slice(B), slice(B, None))
    )


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def make_reference(model: nn.Module) -> nn.Module | None:
    """The frozen pi_ref: None for a PeftModel (its adapters are disabled instead, no second copy
    of the weights), else a frozen deep copy of the model as it is now."""
    if is_peft_model(model):
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logps(model: nn.Module, ref_model: nn.Module | None, batch: dict) -> SequenceLogps:
    if ref_model is not None:
        return forward_logps(ref_model, batch)
    with model.disable_adapter():  # PeftModel: the base weights are the reference
        return forward_logps(model, batch)


def dpo_batch_loss(
    model: nn.Module,
    ref_model: nn.Module | None,
    batch: dict,
    *,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    **loss_kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar DPO loss of one batch and its reward metrics. `loss_kwargs` go to `dpo_loss`
    (beta, loss_type, loss_weights, label_smoothing, f_divergence_type, ...); `ld_alpha` (LD-DPO) and
    `use_weighting` (WPO) change how sequence log-probs and pair weights are formed from the tokens."""
    policy_c, policy_r = split_pairs(forward_logps(model, batch, with_log_sum_sq_probs=use_weighting))
    reference_free = loss_kwargs.get("reference_free", False)
    if not reference_free:
        ref_c, ref_r = split_pairs(reference_logps(model, ref_model, batch))

    def pair_logps(c: SequenceLogps, r: SequenceLogps):
        if ld_alpha is None:
            return c.logps, r.logps
        # LD-DPO: down-weight the tokens beyond the shorter completion, for policy and reference alike
        return ld_logps(c.token_logps, c.mask, r.token_logps, r.mask, ld_alpha)

    chosen_logps, rejected_logps = pair_logps(policy_c, policy_r)
    ref_chosen_logps, ref_rejected_logps = (None, None) if reference_free else pair_logps(ref_c, ref_r)

    loss_types = loss_kwargs.get("loss_type", "sigmoid")
    loss_types = {loss_types} if isinstance(loss_types, str) else set(loss_types)
    extra = {}
    if loss_types & LENGTH_LOSS_TYPES:
        extra.update(chosen_lengths=policy_c.lengths, rejected_lengths=policy_r.lengths)
    if "sft" in loss_types:
        extra["chosen_nll"] = sft_nll(policy_c.token_logps, policy_c.mask)
    if use_weighting:  # WPO: weight each pair by w(y_w) w(y_l)
        w_c, w_r = (wpo_weights(s.token_logps, s.log_sum_sq_probs, s.mask) for s in (policy_c, policy_r))
        extra["pair_weights"] = w_c * w_r

    out = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **loss_kwargs, **extra)
    metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps)
    return out.losses.mean(), metrics


def disable_dropout(model: nn.Module) -> None:
    """DPO compares two forwards of the same text; dropout would make both noisy (TRL does this too)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def linear_schedule(warmup_steps: int, num_steps: int):
    """LR multiplier: 0 -> 1 linearly over warmup_steps, then 1 -> 0 linearly at num_steps
    (the same as transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (num_steps - step) / max(1, num_steps - warmup_steps))

    return factor


def _forever(batches: Iterable) -> Iterator:
    while True:  # one pass per epoch; re-iterating a DataLoader reshuffles it
        yield from batches


def train(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    num_steps: int,
    lr: float = 1e-6,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    ref_model: nn.Module | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    progress: bool = True,
    **loss_kwargs,
) -> list[dict[str, float]]:
    """Train `model` with DPO for num_steps batches (cycling through `batches`); return per-step logs
    (loss, grad_norm, learning_rate and the reward metrics). `ref_model` defaults to `make_reference`.
    The defaults (lr 1e-6, AdamW, linear schedule, clip at 1.0) are DPOConfig's."""
    if ref_model is None and not loss_kwargs.get("reference_free", False):
        ref_model = make_reference(model)
    disable_dropout(model)
    if ref_model is not None:
        disable_dropout(ref_model)

    params = [p for p in model.parameters() if p.requires_grad]
    # Decay the matrices only: biases and LayerNorm gains are 1-D (transformers excludes them by name)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, num_steps))

    model.train()
    history = []
    data = _forever(batches)
    bar = tqdm(range(num_steps), desc="dpo", disable=not progress)
    for _ in bar:
        lr_now = scheduler.get_last_lr()[0]
        loss, metrics = dpo_batch_loss(
            model, ref_model, next(data), ld_alpha=ld_alpha, use_weighting=use_weighting, **loss_kwargs
        )
        loss.backward()
        if max_grad_norm:  # grad_norm is the norm before clipping, as TRL logs it
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"loss": loss.item(), "grad_norm": grad_norm, "learning_rate": lr_now, **metrics})
        bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
    return history
