"""The run's plan, checked before any weights load: how many optimizer steps the rows, batch,
accumulation, processes and epochs give, and whether the learning rate ever leaves its warm-up.

transformers' linear warm-up starts at a learning rate of 0: with warm-up W and T optimizer steps,
step t (1-based) trains at lr * (t - 1) / W while t <= W. A plan whose T <= W never reaches the
learning rate it was given, and with T = 1 the one step trains at lr 0: the adapter does not move,
every reward is exactly 0, and the run still says "done" (a recipe's 64-pair step on 36 pairs).
Such a plan is refused, naming the numbers and the ways out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo.errors import UserError


@dataclass(frozen=True)
class Plan:
    rows: int
    pairs_per_step: int  # per device x accumulation x processes
    batches_per_epoch: int  # per process
    steps: int  # optimizer steps in the whole run
    warmup: int  # of those, warm-up steps

    def describe(self) -> str:
        return f"{self.steps} optimizer step(s) of {self.pairs_per_step} pairs ({self.warmup} of them warm-up)"


def plan_of(rows: int, training_args, world_size: int = 1) -> Plan:
    """The optimizer steps transformers' Trainer will take (its own arithmetic: a last partial batch
    is kept, a last partial accumulation still steps), and the warm-up steps among them."""
    batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    batches = math.ceil(math.ceil(rows / world_size) / batch) if rows else 0
    per_epoch = math.ceil(batches / accumulation) if batches else 0
    if training_args.max_steps > 0:
        steps = training_args.max_steps
    else:
        steps = math.ceil(training_args.num_train_epochs * per_epoch)
    return Plan(rows, batch * accumulation * world_size, batches, steps, training_args.get_warmup_steps(steps))


def check_plan(rows: int, training_args, world_size: int = 1) -> tuple[Plan, str | None]:
    """Refuse a plan that trains nothing: no step, or, from epochs, no step past the warm-up. An explicit
    `max_steps` that ends inside the warm-up (a smoke run) is the user's choice: it is returned as a
    warning line to log instead. Returns (the plan, the warning or None)."""
    plan = plan_of(rows, training_args, world_size)
    if plan.steps >= 1 and plan.steps > plan.warmup:
        return plan, None
    if training_args.max_steps > 0:
        return plan, (
            f"max_steps {plan.steps} ends inside the {plan.warmup}-step warm-up: every step trains below the "
            f"learning rate {training_args.learning_rate:g} (the first at 0); set warmup_steps 0 to train at it"
        )
    batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    fits = max(1, rows // max(1, batch * world_size))  # micro-batches the rows fill per epoch and process
    fixes = ["add pairs or epochs", "lower warmup_steps"]
    if accumulation > 1:
        fixes.insert(
            0, f"lower gradient_accumulation_steps (at most {max(1, fits // 2)} gives 2 or more steps per epoch)"
        )
    effect = (
        "so the adapter would not move"
        if plan.steps <= 1
        else f"so the learning rate would never reach {training_args.learning_rate:g}"
    )
    raise UserError(
        f"this run would not train as set: {rows} training pairs at {plan.pairs_per_step} pairs per optimizer step "
        f"({batch} per device x {accumulation} accumulation x {world_size} process(es)) give {plan.describe()}, "
        f"and warm-up starts at learning rate 0, {effect}. Fix: {', or '.join(fixes)}"
    )
