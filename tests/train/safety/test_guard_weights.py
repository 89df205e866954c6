"""dpo/train/safety/guards.py NonFiniteGuard without a pass over the weights per step: an update that makes a
trainable weight non-finite is caught before a checkpoint keeps it, and otherwise by the next step's loss.
(The per-step cost is counted in tests/train/test_step_work.py; the loss and gradient cases are in
tests/train/safety/test_run_safety.py.)"""

import pytest
from helpers import cli, load_recipe
from transformers import TrainerCallback

from dpo.train.safety.checkpoints import checkpoint_problems
from dpo.train.safety.runs import RUN_MARKER


class BreakUpdate(TrainerCallback):
    """Right after optimizer step `step` updated the weights (before its step end): one LoRA weight becomes NaN,
    as an update that overflowed would leave it."""

    def __init__(self, step):
        self.step = step

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for n, p in model.named_parameters() if "lora_B" in n).data[0, 0] = float("nan")


def run(tiny_model_dir, truthy_file, out, capsys, *extra) -> str:
    argv = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=out, max_steps=5)
    argv += cli(gradient_accumulation_steps=1, test_size=0, logging_steps=1) + list(extra)
    with pytest.raises(SystemExit) as stopped:
        load_recipe("dpo_phi2").main(argv, callbacks=[BreakUpdate(2)])
    assert stopped.value.code == 3
    assert not (out / "adapter_model.safetensors").exists() and not (out / RUN_MARKER).exists()
    return next(x for x in capsys.readouterr().err.splitlines() if x.startswith("stopped: "))


def test_a_broken_update_is_caught_before_its_checkpoint(tiny_model_dir, truthy_file, tmp_path, capsys):
    out = tmp_path / "run"
    line = run(tiny_model_dir, truthy_file, out, capsys, *cli(save_steps=1, save_strategy="steps"))
    assert "step 2: the norm of the trainable weights is nan" in line
    assert "that step's update made the weights non-finite" in line
    assert str(out / "checkpoint-1") in line and not checkpoint_problems(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists()


def test_between_checkpoints_the_next_steps_loss_stops_the_run(tiny_model_dir, truthy_file, tmp_path, capsys):
    line = run(tiny_model_dir, truthy_file, tmp_path / "run", capsys, *cli(save_strategy="no"))
    assert "step 3: the loss is nan" in line and "stopped before that step changed any weight" in line
