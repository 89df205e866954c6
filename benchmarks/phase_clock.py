"""Each training step's time by phase, for benchmarks/gpu_profile.py: CUDA events on a GPU (no host sync during
the steps: the events are read once training ends), time.perf_counter on a CPU (the same code path, for `make
test`). Importable without a GPU.

The trainer's methods are wrapped on the instance, each entry and exit a mark; the time from one mark to the next
belongs to the phase that mark opened, so the phases of a step add up to the step:
  data           get_batch_samples (the step's micro-batches from the data loader) and _prepare_inputs (to device)
  forward_loss   compute_loss (policy forward, the reference when inline, the DPO loss)
  backward       accelerator.backward
  guard_clip     the gradient norm and clipping, and the callbacks before the optimizer (the non-finite guard)
  optimizer      optimizer.step, the learning-rate schedule and zero_grad
  callbacks      the other callbacks (step begin/end) and the step's logging (_maybe_log_save_evaluate)
  other          the rest of the trainer loop (Python between the above)
A step ends when its logging returns (transformers' Trainer: the last call of an optimizer step).
"""

from __future__ import annotations

import functools
import time

PHASES = ("data", "forward_loss", "backward", "guard_clip", "optimizer", "callbacks", "other")


class PhaseClock:
    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.marks: list = []  # (phase opened, host seconds, CUDA event or None)
        self.step_ends: list[int] = []  # index in marks of each step's end
        self.stack = ["other"]
        self.on_step_end = []  # called with the number of steps ended, after the step's end mark

    def mark(self, phase: str) -> None:
        event = None
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((phase, time.perf_counter(), event))

    def wrap(self, owner, name: str, phase: str, after: str | None = None, ends_step: bool = False) -> None:
        """Mark `phase` when owner.name is called and, when it returns, `after` (default: the phase it was
        called in); `ends_step`: its return ends a step."""
        method = getattr(owner, name)
        clock = self

        @functools.wraps(method)
        def timed(*args, **kwargs):
            clock.stack.append(phase)
            clock.mark(phase)
            try:
                return method(*args, **kwargs)
            finally:
                clock.stack.pop()
                if after is not None:
                    clock.stack[-1] = after
                clock.mark(clock.stack[-1])
                if ends_step:
                    clock.stack[-1] = "other"
                    clock.step_ends.append(len(clock.marks) - 1)
                    for hook in clock.on_step_end:
                        hook(len(clock.step_ends))

        setattr(owner, name, timed)

    def install(self, trainer) -> None:
        """Wrap the trainer's step (module docstring). Call after anything else that wraps these methods (the
        non-finite guard wraps clipping): the clock then times the guard's share too."""
        self.wrap(trainer, "get_batch_samples", "data")
        self.wrap(trainer, "_prepare_inputs", "data")
        self.wrap(trainer, "compute_loss", "forward_loss")
        self.wrap(trainer.accelerator, "backward", "backward")
        self.wrap(trainer, "_clip_grad_norm", "guard_clip")
        self.wrap(trainer, "_get_grad_norm", "guard_clip")
        handler = trainer.callback_handler
        self.wrap(handler, "on_pre_optimizer_step", "guard_clip", after="optimizer")
        self.wrap(handler, "on_optimizer_step", "callbacks", after="optimizer")
        for name in ("on_step_begin", "on_substep_end", "on_step_end"):
            self.wrap(handler, name, "callbacks", after="other")
        self.wrap(trainer, "_maybe_log_save_evaluate", "callbacks", ends_step=True)

    def steps(self) -> list[dict]:
        """Each ended step's seconds, start to end and by phase (after the first step end: the first step has no
        start mark of its own), on the device's clock where there are CUDA events (synchronizes once), else the
        host's; host_seconds: the host's clock (on a GPU, how far the host ran ahead shows against it)."""
        if self.cuda:
            self.torch.cuda.synchronize()
        out = []
        for begin, end in zip(self.step_ends, self.step_ends[1:]):
            phases = dict.fromkeys(PHASES, 0.0)
            for (phase, t0, e0), (_, t1, e1) in zip(self.marks[begin:end], self.marks[begin + 1 : end + 1]):
                phases[phase] += e0.elapsed_time(e1) / 1000 if e0 is not None else t1 - t0
            (_, t0, e0), (_, t1, e1) = self.marks[begin], self.marks[end]
            seconds = e0.elapsed_time(e1) / 1000 if e0 is not None else t1 - t0  # the step, start to end
            out.append({"seconds": seconds, "host_seconds": t1 - t0, "phases": phases})
        return out
