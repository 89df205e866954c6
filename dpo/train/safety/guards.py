"""Training that cannot finish "done" on a broken run.

NonFiniteGuard  a non-finite loss or gradient stops training before the optimizer step that would
                spread it, a non-finite weight before the checkpoint that would keep it, so no
                checkpoint and no final adapter ever holds NaN; at O(1) cost per step.
                (transformers' `logging_nan_inf_filter` would log such a loss as the running
                mean, 0.0 on the first step, and train on.)
HealthCheck     warns about a run that cannot learn: no trainable parameters, a loss pinned
                at ln 2 with zero gradient, or likelihood displacement.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from dpo.compat import fp16_loss_scale
from dpo.log import log

# GradScaler starts at 2**16 and halves on each overflowed step (it grows only after 2000 clean ones):
# below 1 it has skipped 17 or more steps net, and no scale makes the gradients representable.
MIN_LOSS_SCALE = 1.0


class NonFiniteTraining(RuntimeError):
    """Raised inside trainer.train(): `quantity` at optimizer step `step` was `value`."""

    def __init__(self, step: int, quantity: str, value: float):
        super().__init__(f"step {step}: {quantity} is {value}")
        self.step, self.quantity, self.value = step, quantity, value


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def fused_norm(tensors):
    """The 2-norm of all `tensors` together (in float32), on their device, in one fused pass (`torch._foreach_norm`:
    a few kernels for any number of tensors on a GPU) and no host sync; None for no tensors."""
    if not tensors:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)))


def read_scalars(*values) -> list[float]:
    """Each value as a Python float (0.0 for None), the device ones in one host read (one sync on a GPU)."""
    on_device = [v for v in values if isinstance(v, torch.Tensor)]
    device = on_device[0].device if on_device else None
    read = iter(
        torch.stack([v.detach().reshape(()).float().to(device) for v in on_device]).tolist() if on_device else []
    )
    return [next(read) if isinstance(v, torch.Tensor) else float(v or 0.0) for v in values]


class NonFiniteGuard(TrainerCallback):
    """Checks, once per optimizer step and before it changes any weight, the step's losses and the gradient norm
    that clipping computed, in one host read; checks the trainable weights before each checkpoint, evaluation and
    the end of training.

    The cost is O(1) per step, whatever the number of LoRA tensors (tests/train/test_step_work.py counts it):
    - the loss: each micro-batch's loss is added on the device (a sum of finite losses is finite; one NaN or inf
      makes it non-finite) and read with the gradient norm. This replaces transformers' `logging_nan_inf_filter`,
      which reads every micro-batch's loss (two host syncs each) to log a non-finite one as the running mean: the
      guard stops the run at such a loss, so the filter is switched off on the trainer's own arguments;
    - the gradients: the total norm transformers' Trainer already asks `accelerator.clip_grad_norm_` for (also at
      max_grad_norm 0); non-finite <=> some gradient entry is. Computed here (one fused reduction) only where the
      trainer did not (DeepSpeed without a global norm, mixed device meshes);
    - the weights: a non-finite trainable weight makes the next step's loss non-finite, which stops that step, so
      they need no pass per step; they are checked (one fused reduction) where a non-finite weight could be kept
      or reported: before a checkpoint is written, before an evaluation, and when training ends.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.losses = None  # the sum of this optimizer step's micro-batch losses, on the device
        self.grad_norm = None  # the norm the trainer's clipping computed for this step
        trainer.args.logging_nan_inf_filter = False  # the trainer's own copy of the arguments (see above)
        training_step, clip = trainer.training_step, trainer.accelerator.clip_grad_norm_

        def add_loss(model, inputs, num_items_in_batch=None):
            loss = training_step(model, inputs, num_items_in_batch)
            self.losses = loss.detach() if self.losses is None else self.losses + loss.detach()
            return loss

        def keep_norm(*args, **kwargs):
            self.grad_norm = clip(*args, **kwargs)
            return self.grad_norm

        trainer.training_step, trainer.accelerator.clip_grad_norm_ = add_loss, keep_norm

    def check(self, model, step: int) -> None:
        """Raise NonFiniteTraining when optimizer step `step`'s loss or gradient norm is not finite."""
        losses, grad_norm = self.losses, self.grad_norm
        self.losses = self.grad_norm = None
        if self.trainer.args.fp16:
            grad_norm = None  # fp16 loss scaling: inf gradients are expected now and then (the scale is checked)
        elif grad_norm is None:
            grad_norm = fused_norm([p.grad for p in _trainable(model) if p.grad is not None])
        loss, norm = read_scalars(losses, grad_norm)
        if not math.isfinite(loss):
            raise NonFiniteTraining(step, "the loss", loss)
        # With fp16 loss scaling the scaler skips a step with inf gradients and halves the scale. A scale below
        # MIN_LOSS_SCALE means the gradients overflow fp16 even unscaled, step after step: every step is skipped
        # and the run would "train" on, learning nothing.
        if self.trainer.args.fp16:
            scale = fp16_loss_scale(self.trainer)
            if scale is not None and scale < MIN_LOSS_SCALE:
                raise NonFiniteTraining(step, "the fp16 loss scale (gradients overflow at every step)", scale)
        if not math.isfinite(norm):
            raise NonFiniteTraining(step, "the gradient norm", norm)

    def check_weights(self, model, step: int) -> None:
        """Raise NonFiniteTraining when a trainable weight is not finite after optimizer step `step`."""
        (norm,) = read_scalars(fused_norm(_trainable(model)))
        if not math.isfinite(norm):
            raise NonFiniteTraining(step, "the norm of the trainable weights", norm)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.check(model, state.global_step + 1)  # the optimizer step about to change the weights

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or control.should_evaluate or control.should_training_stop:
            self.check_weights(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or control.should_evaluate:
            self.check_weights(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.check_weights(model, state.global_step)  # the final adapter is written next


def nonfinite_advice(err: NonFiniteTraining, args, last_checkpoint) -> str:
    """The one message for a stopped run: what, when, what is safe, what to try."""
    kept = (
        f"the last finite checkpoint is intact: {last_checkpoint}; after changing settings, continue from it with "
        f"--resume_from_checkpoint {last_checkpoint} --resume_with_different_settings true"
        if last_checkpoint
        else "no checkpoint had been saved yet"
    )
    after_update = err.quantity.startswith("the norm of the trainable weights")  # checked after the optimizer step
    when = (
        "that step's update made the weights non-finite"
        if after_update
        else "training stopped before that step changed any weight"
    )
    # fp16 is the default on a GPU without bf16 (dpo/train/hardware.py), measured finite only with random weights:
    # its range is the first suspect, so fp32 compute comes first there.
    first = (
        "This run computed in fp16 (the default on a GPU without bf16, such as a T4): rerun in fp32 compute with "
        "--fp16 false --dtype float32, or try "
        if args.fp16
        else "Try fp32 compute (--bf16 false --fp16 false --dtype float32), "
    )
    return (
        f"step {err.step}: {err.quantity} is {err.value} (not finite); {when}, and no final adapter was written. "
        f"{kept}. {first}a lower learning_rate (now "
        f"{args.learning_rate:g}), a lower beta (now {args.beta:g}), or max_grad_norm 1.0 (now {args.max_grad_norm:g})"
    )


LN2 = math.log(2)  # the sigmoid DPO loss when policy == reference: -log sigmoid(0)


class HealthCheck(TrainerCallback):
    """Looks at the first `window` logged training steps (and later ones for displacement) and
    warns, once per problem, in the log."""

    def __init__(self, window: int = 3):
        self.window = window
        self.history: list[dict] = []
        self.warned: set[str] = set()

    def warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log(f"warning: {message}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not _trainable(model):
            self.warn("frozen", "the model has no trainable parameters: this run cannot learn (check use_peft / LoRA)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or "grad_norm" not in logs:
            return
        self.history.append(logs)
        if len(self.history) < self.window:
            return
        first, last = self.history[: self.window], self.history[-self.window :]
        if all(abs(h["loss"] - LN2) < 1e-4 and h["grad_norm"] == 0 for h in first):
            self.warn(
                "pinned",
                f"the loss has stayed at ln 2 = {LN2:.4f} with zero gradient norm for {self.window} logged steps: "
                "this run cannot learn. Usual causes: the adapter is not trainable, or the reference is identical "
                "to the policy and receives the gradient instead",
            )
        if not all("rewards/chosen" in h and "rewards/margins" in h for h in first + last):
            return
        mean = lambda hs, key: sum(h[key] for h in hs) / len(hs)  # noqa: E731
        chosen, margins = mean(last, "rewards/chosen"), mean(last, "rewards/margins")
        if (
            chosen < 0
            and chosen < -margins
            and margins > mean(first, "rewards/margins")
            and chosen < mean(first, "rewards/chosen")
        ):
            self.warn(
                "displacement",
                f"rewards/chosen is {chosen:.3g} and falling while rewards/margins rises to {margins:.3g}: the chosen "
                "answers are becoming less likely too (likelihood displacement). Consider adding the SFT term: "
                "loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0]",
            )
