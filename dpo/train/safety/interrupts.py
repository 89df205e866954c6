"""Ctrl-C and SIGTERM during training: finish the optimizer step, save a checkpoint, stop.

Python's default Ctrl-C raises KeyboardInterrupt wherever the program happens to be: inside
optimizer.step() (weights half updated), between the step and the step counter, or halfway
through writing a checkpoint. Instead, while training runs:

  1st SIGINT/SIGTERM  noted; the current optimizer step finishes, a checkpoint is saved, and
                      training stops (schedulers and Colab send SIGTERM before killing)
  2nd, not saving     KeyboardInterrupt: stop now without saving (earlier checkpoints untouched)
  any, while saving   held by dpo.signals.saving: the checkpoint is finished first, then training
                      stops at that step (a first signal there was once dropped, and training went on)
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
from transformers import TrainerCallback

from dpo.log import log
from dpo.signals import STOP_SIGNALS, kill_point, saving


class StopOnSignal(TrainerCallback):
    def __init__(self):
        self.signum: int | None = None  # the first signal received

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
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
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def held(self, what: str = "a checkpoint"):
        """A checkpoint save: signals inside it are held (dpo.signals.saving); one that came stops training
        once the checkpoint is whole (`on_save`)."""
        return saving(what, then=self._stop_after_save)

    def _stop_after_save(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def _agreed_stop(self, args) -> bool:
        """Whether to stop; under several processes every process must agree to stop at the same step, or the
        save would deadlock (a process that got no signal stops as if by SIGTERM)."""
        stop = self.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        kill_point("step", state.global_step)
        if self._agreed_stop(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        """Every process calls this after each checkpoint save: a signal held during the save stops training
        here, with that checkpoint (the step it saved is complete)."""
        if self._agreed_stop(args):
            control.should_training_stop = True
        return control
