"""Training that cannot finish "done" on a broken run.

NonFiniteGuard  a non-finite loss, gradient or weight stops training before the optimizer step
                that would spread it, so no checkpoint and no final adapter ever holds NaN.
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


def _norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])).item()


class NonFiniteGuard(TrainerCallback):
    """Checks the loss and the accumulated gradients after every backward pass (wrapping the
    trainer's public `training_step`), and the trainable weights after every optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            loss = original(model, inputs, num_items_in_batch)
            self.check(model, loss)
            return loss

        trainer.training_step = training_step

    def check(self, model, loss) -> None:
        step = self.trainer.state.global_step + 1  # the optimizer step being computed
        if not torch.isfinite(loss).all():
            raise NonFiniteTraining(step, "the loss", loss.float().mean().item())
        # With fp16 loss scaling, inf gradients are expected now and then: the scaler skips those steps
        # and halves the scale. A scale below MIN_LOSS_SCALE means the gradients overflow fp16 even
        # unscaled, step after step: every step is skipped and the run would "train" on, learning nothing.
        if self.trainer.args.fp16:
            scale = fp16_loss_scale(self.trainer)
            if scale is not None and scale < MIN_LOSS_SCALE:
                raise NonFiniteTraining(step, "the fp16 loss scale (gradients overflow at every step)", scale)
            return
        grads = [p.grad for p in _trainable(model) if p.grad is not None]
        if grads:
            norm = _norm(grads)
            if not math.isfinite(norm):
                raise NonFiniteTraining(step, "the gradient norm", norm)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = _trainable(model)
        if params and not math.isfinite(_norm(params)):
            raise NonFiniteTraining(state.global_step, "the norm of the trainable weights", _norm(params))


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
