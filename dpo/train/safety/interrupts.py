"""Ctrl-C and SIGTERM during training: finish the optimizer step, save a checkpoint, stop.

Python's default Ctrl-C raises KeyboardInterrupt wherever the program happens to be: inside
optimizer.step() (weights half updated), between the step and the step counter, or halfway
through writing a checkpoint. Instead, while training runs:

  1st SIGINT/SIGTERM  noted; the current optimizer step finishes, a checkpoint is saved, and
                      training stops (schedulers and Colab send SIGTERM before killing)
  2nd, not saving     KeyboardInterrupt: stop now without saving (earlier checkpoints untouched)
  any, while saving   ignored with a message: the checkpoint is finished first
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
from transformers import TrainerCallback

from dpo.log import log
from dpo.train.safety.checkpoints import kill_point

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.saving = False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.saving:
            log(f"{name}: a checkpoint is being written; it will be finished first")
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log(f"{name}: stopping after the current optimizer step, with a checkpoint (again: stop without saving)")

    @contextlib.contextmanager
    def installed(self):
        """Our handlers for SIGINT and SIGTERM inside the block (main thread only), the old ones after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def held(self):
        """Signals inside the block are reported, not acted on (a save in progress)."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def on_step_end(self, args, state, control, **kwargs):
        kill_point("step", state.global_step)
        stop = self.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process must agree to stop at the same step, or the save would deadlock
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control
