"""Work per optimizer step, counted, not timed: torch ops dispatched and host reads (the calls that make the host
wait for the device on a GPU), in total and by phase. Used by tests/train/test_step_work.py to hold the recipe's
steps to no more than TRL + precompute_ref_log_probs's on the CPU; importable without a GPU, for the GPU profile.

    with StepWork(trainer, skip=1, steps=3) as work:  # counts optimizer steps 2, 3 and 4 of trainer.train()
        trainer.train()                               # (train at least skip + steps + 1 steps: see below)
    work.per_step()  # {"ops": ..., "host_reads": ..., "phases": {...}, "reads_by_name": {...}}

Host reads, and why they are countable on a CPU:
- ops that hand a device value to Python or size their output by the data: `item()`, `bool(t)`, `float(t)`,
  `if t:` all dispatch `aten::_local_scalar_dense`; `nonzero`, boolean-mask indexing, `masked_select`, `unique`
  dispatch the ops in SYNC_OPS. The profiler records these on any device, so they are counted from its events;
- `Tensor.tolist()`, `.cpu()`, `.numpy()`: a blocking copy from a CUDA tensor, no op at all on a CPU tensor, so
  they are counted by wrapping the methods while the window is open (every call counts: on the CPU an over-count,
  the same for both sides of a comparison); `torch.cuda.synchronize()` likewise.
Ops are all `aten::` events (nested ones included: a composite op and the ops it runs are each a dispatch);
record_function labels are not ops. Phases: "forward_loss" (the trainer's compute_loss), "backward" (the
accelerator's backward) and "other" (data, clipping, the optimizer, callbacks, logging: what the trainer adds
around the model).

The window opens at the end of optimizer step `skip` and closes at the end of step `skip + steps`, both after the
callbacks registered before this one, so each counted step's data, micro-batches, clipping, optimizer step,
callbacks and the logging of the step before count once. Stop training later than that: the last step's
end-of-training work (final checks, saving) is not per-step work.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch

SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }
)
HOST_READ_METHODS = ("tolist", "cpu", "numpy")
PHASES = ("forward_loss", "backward")  # the rest is "other"
LABEL = "step_work::"


class StepWork:
    """A context manager around `trainer.train()` that counts ops and host reads over optimizer steps
    `skip`+1 .. `skip`+`steps`. It registers a callback and wraps compute_loss and backward on the instances,
    and undoes both on exit."""

    def __init__(self, trainer, skip: int = 1, steps: int = 3):
        from transformers import TrainerCallback

        self.trainer, self.skip, self.steps = trainer, skip, steps
        self.profiler = None
        self.counted = 0
        self.ops: collections.Counter = collections.Counter()  # (phase, op name) -> dispatches in the window
        self.reads: collections.Counter = collections.Counter()  # (phase, name) -> host reads in the window
        self._phase = "other"
        self._originals: dict = {}
        work = self

        class Window(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == work.skip:
                    work._open()
                elif work.skip < state.global_step <= work.skip + work.steps:
                    work.counted += 1
                    if state.global_step == work.skip + work.steps:
                        work._close()

        self.callback = Window()

    def __enter__(self):
        self.trainer.add_callback(self.callback)
        self.trainer.compute_loss = self._labelled("forward_loss", self.trainer.compute_loss)
        self.trainer.accelerator.backward = self._labelled("backward", self.trainer.accelerator.backward)
        return self

    def __exit__(self, *exc):
        self._close()
        self.trainer.remove_callback(self.callback)
        del self.trainer.compute_loss, self.trainer.accelerator.backward  # back to the classes' methods
        return False

    def _labelled(self, phase, method):
        @functools.wraps(method)
        def labelled(*args, **kwargs):
            outer, self._phase = self._phase, phase
            try:
                with torch.profiler.record_function(LABEL + phase) if self.profiler else contextlib.nullcontext():
                    return method(*args, **kwargs)
            finally:
                self._phase = outer

        return labelled

    def _open(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        for name in HOST_READ_METHODS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, self._originals[name]))
        self._originals["synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = self._counting("cuda.synchronize", torch.cuda.synchronize)
        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self.profiler.__enter__()

    def _counting(self, name, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.reads[self._phase, name] += 1
            return original(*args, **kwargs)

        return counted

    def _close(self) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        torch.cuda.synchronize = self._originals.pop("synchronize")
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}
        for event in self.profiler.events():
            if event.name.startswith("aten::"):
                phase = _phase_of(event)
                self.ops[phase, event.name] += 1
                if event.name in SYNC_OPS:
                    self.reads[phase, event.name] += 1
        self.profiler = None

    def per_step(self) -> dict:
        """Ops and host reads per counted optimizer step: in total, by phase, and the host reads by name."""
        if self.counted < self.steps:
            raise RuntimeError(f"{self.counted} of {self.steps} steps after step {self.skip} ran: train more steps")

        def by(counter, key):
            out = collections.Counter()
            for k, n in counter.items():
                out[key(k)] += n / self.counted
            return dict(sorted(out.items()))

        return {
            "steps": self.counted,
            "ops": sum(self.ops.values()) / self.counted,
            "host_reads": sum(self.reads.values()) / self.counted,
            "phases": {
                phase: {
                    "ops": by(self.ops, lambda k: k[0]).get(phase, 0.0),
                    "host_reads": by(self.reads, lambda k: k[0]).get(phase, 0.0),
                }
                for phase in (*PHASES, "other")
            },
            "reads_by_name": by(self.reads, lambda k: f"{k[0]}: {k[1]}"),
            "ops_by_name": by(self.ops, lambda k: f"{k[0]}: {k[1]}"),
        }


def _phase_of(event) -> str:
    """The phase label of the innermost labelled range around `event` ("other" outside every label)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(LABEL):
            return parent.name[len(LABEL) :]
        parent = parent.cpu_parent
    return "other"
