"""What a run will cost, said early: one log line after the first micro-batch of training.

A CPU run of the shipped settings can take hours (a 64-pair step of SmolLM2 took 330-500 s on 2 cores),
and nothing said so until the first optimizer step ended, minutes in. The first micro-batch (one forward
and backward of `per_device_train_batch_size` pairs) ends long before that: its time, times the micro-batches
in an optimizer step, is the step's time, and times the steps left, the run's. The estimate includes one-time
costs of the first batch (allocations, lazy set-up), so it errs long, never short. On a CPU, where the estimate
passes LONG_ON_CPU, the line adds the settings that make a trial run quick (only those that would change).
Nothing is measured after the estimate: the callback costs nothing per step from then on.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from dpo.log import log

LONG_ON_CPU = 15 * 60  # seconds: past this a CPU user is better served by a trial run first
# A trial run that shows the loss and reward margin moving in minutes on 2 cores (SmolLM2-135M: about 1 s a pair
# at 256 tokens): a few steps of a few short pairs.
TRIAL = {"max_steps": 3, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "max_length": 256}


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def trial_flags(args) -> str:
    """The TRIAL settings this run does not already meet, as command-line flags (max_steps -1 and max_length
    None mean "all of it")."""
    changed = []
    for name, value in TRIAL.items():
        now = getattr(args, name, None)
        unbounded = now is None or (name == "max_steps" and now <= 0)
        if unbounded or now > value:
            changed.append(f"--{name} {value}")
    return " ".join(changed)


def estimate_line(first: float, accumulation: int, pairs_per_step: int, steps_left: int, args, on_cpu: bool) -> str:
    """The log line: the first micro-batch's `first` seconds scaled to a step and to the `steps_left`."""
    step = first * accumulation
    whole = step * steps_left
    line = (
        f"estimate: the first micro-batch took {duration_text(first)}, so an optimizer step of {pairs_per_step} pairs "
        f"takes about {duration_text(step)} and the run's {steps_left} step(s) about {duration_text(whole)} "
        "(from one batch, start-up included: it errs long)"
    )
    flags = trial_flags(args) if on_cpu and whole > LONG_ON_CPU else ""
    if flags:
        line += f". On a CPU that is long; a quick trial run first: {flags}"
    return line


class RunEstimate(TrainerCallback):
    """Logs `estimate_line` once, at the end of the first micro-batch this process trains (also after a resume:
    the steps counted are those this process will take)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.started: float | None = None
        self.first_step = 0
        self.done = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # a resumed run starts past 0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.done and self.started is None:
            self.started = self.clock()

    def _say(self, args, state) -> None:
        self.done = True
        pairs = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        steps = max(0, state.max_steps - self.first_step)
        on_cpu = args.device.type == "cpu"
        first = self.clock() - self.started
        log(estimate_line(first, args.gradient_accumulation_steps, pairs, steps, args, on_cpu))

    def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch inside an accumulated step
        if not self.done and self.started is not None:
            self._say(args, state)

    def on_step_end(self, args, state, control, **kwargs):  # accumulation 1: the first step is the first batch
        if not self.done and self.started is not None:
            self._say(args, state)
