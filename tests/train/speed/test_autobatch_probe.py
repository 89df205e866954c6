"""per_device_train_batch_size: auto on a built trainer (dpo/train/speed/autobatch_probe.py), on a CPU: the configured
values kept without CUDA; the probe's measurement read through a simulated allocator (no GPU, nothing timed); the
decision applied to the trainer; resolved_config.yaml recording it."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import recipe_trainer

from dpo.errors import UserError
from dpo.train.config import write_resolved_config
from dpo.train.speed.autobatch import GIB, Budget, decide
from dpo.train.speed.autobatch_probe import auto_batch, measure, peaks, resolved_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXED, PER_TOKEN, RESIDENT = 1000, 7, 5000  # the simulated device's step cost: 1000 bytes + 7 per token


class SimulatedMemory:
    """A device allocator as the probe reads it: `RESIDENT` bytes held, and each step's peak FIXED + PER_TOKEN x the
    tokens of the batch it ran (the collator's input_ids, seen through `watch`). Counts what the probe asked."""

    def __init__(self, free=100 * GIB):
        self.tokens, self.resets, self.free_bytes, self.batches = 0, 0, free, []

    def watch(self, trainer):
        collate = trainer.data_collator

        def counting(rows):
            batch = collate(rows)
            self.tokens = batch["input_ids"].numel()
            self.batches.append(tuple(batch["input_ids"].shape))
            return batch

        trainer.data_collator = counting
        return self

    def empty(self):
        self.tokens = 0

    def allocated(self):
        return RESIDENT

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        return RESIDENT + FIXED + PER_TOKEN * self.tokens

    def free(self):
        return self.free_bytes


@pytest.fixture
def auto_trainer(tiny_model_dir, tmp_path):
    return recipe_trainer(
        tiny_model_dir,
        tmp_path / "out",
        per_device_train_batch_size=2,  # auto, as the parser makes it of the YAML's auto with auto_batch_base 2
        auto_batch_base=2,
        gradient_accumulation_steps=3,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )


def test_peaks_reads_each_size_above_what_was_resident():
    memory = SimulatedMemory()
    resident, found = peaks(lambda k: setattr(memory, "tokens", 10 * k), (1, 2), memory)
    assert resident == RESIDENT and found == [FIXED + 70, FIXED + 140] and memory.resets == 2


def test_without_cuda_the_configured_values_are_kept(auto_trainer):
    args = auto_trainer.args
    assert auto_trainer.auto_batch is None  # build_dpo_trainer ran auto_batch on this CPU trainer
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 3)
    assert args.activation_checkpointing and args.auto_batch_base == 2
    decision, line = auto_batch(auto_trainer)
    assert decision is None and "no CUDA device (cpu)" in line and "2 x 3" in line and "kept" in line


def test_the_probe_measures_the_per_token_cost_through_the_allocator(auto_trainer):
    memory = SimulatedMemory().watch(auto_trainer)
    row = auto_trainer.train_dataset[0]
    measured = measure(auto_trainer, row, 40, Budget(100 * GIB, False, 100 * GIB), memory)
    # 1 and 2 pairs of two 40-token sequences, with and then without checkpointing: (2, 40), (4, 40) twice
    assert memory.batches == [(2, 40), (4, 40), (2, 40), (4, 40)]
    # peaks above resident: 1000 + 7 x 80 and 1000 + 7 x 160: slope 560 per pair = 7 per token, intercept 1000
    assert (measured.resident, measured.step_fixed, measured.per_token_on, measured.per_token_off) == (
        RESIDENT,
        FIXED,
        PER_TOKEN,
        PER_TOKEN,
    )
    # nothing of the probe is left: no gradient, no logged metric, checkpointing as configured
    assert all(p.grad is None for p in auto_trainer.model.parameters())
    assert not any(auto_trainer._metrics["train"].values()) and auto_trainer._total_train_tokens == 0
    assert auto_trainer.model.get_base_model().is_gradient_checkpointing


def test_a_probe_that_runs_out_of_memory_is_handled(auto_trainer):
    """Without checkpointing: that mode is left out (not one pair known to fit), the rest goes on. With it: one
    line. Either way nothing is left behind: no gradient, checkpointing as configured."""
    memory = SimulatedMemory().watch(auto_trainer)
    collate, base = auto_trainer.data_collator, auto_trainer.model.get_base_model()

    def out_of_memory_without_checkpointing(rows):
        if not base.is_gradient_checkpointing or out_of_memory_without_checkpointing.always:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return collate(rows)

    out_of_memory_without_checkpointing.always = False
    auto_trainer.data_collator = out_of_memory_without_checkpointing
    row = auto_trainer.train_dataset[0]
    measured = measure(auto_trainer, row, 40, Budget(100 * GIB, False, 100 * GIB), memory)
    assert measured.per_token_on == PER_TOKEN and measured.per_token_off is None
    assert all(p.grad is None for p in auto_trainer.model.parameters()) and base.is_gradient_checkpointing
    out_of_memory_without_checkpointing.always = True
    with pytest.raises(UserError, match="the memory probe ran out of GPU memory with 1-2 pairs of 40 tokens"):
        measure(auto_trainer, row, 40, Budget(100 * GIB, False, 100 * GIB), memory)
    assert base.is_gradient_checkpointing


def test_the_decision_is_applied_to_the_trainer_and_recorded(auto_trainer, tmp_path):
    memory = SimulatedMemory().watch(auto_trainer)
    decision, line = auto_batch(auto_trainer, memory)  # the simulated allocator stands for a CUDA device
    # 100 GiB free: everything fits, so 2 x 3 = 6 pairs in one micro-batch, without checkpointing
    assert (decision.micro_batch, decision.accumulation, decision.checkpointing) == (6, 1, False)
    args = auto_trainer.args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (6, 1)
    assert auto_trainer._train_batch_size == 6 and not args.activation_checkpointing
    assert not auto_trainer.model.get_base_model().is_gradient_checkpointing
    auto_trainer.auto_batch = decision
    overrides, note = resolved_settings(auto_trainer)
    path = write_resolved_config(tmp_path / "resolved.yaml", auto_trainer.args, notes=note, overrides=overrides)
    written = yaml.safe_load(path.read_text())
    assert written["per_device_train_batch_size"] == 6 and written["gradient_accumulation_steps"] == 1
    assert written["activation_checkpointing"] is False and written["auto_batch_base"] is None
    assert "# per_device_train_batch_size was auto" in path.read_text() and line in path.read_text()
    # and it trains with it: each training micro-batch 6 pairs (12 sequences), no probe batch among them
    probed = len(memory.batches)
    auto_trainer.train()
    assert {shape[0] for shape in memory.batches[probed:]} == {12}, memory.batches[probed:]


def test_one_pair_that_does_not_fit_after_the_probe_is_refused(auto_trainer):
    memory = SimulatedMemory(free=GIB).watch(auto_trainer)  # 1 GiB: all of it is the margin
    with pytest.raises(UserError, match="not even one pair of"):
        auto_batch(auto_trainer, memory)
    assert auto_trainer.args.per_device_train_batch_size == 2  # nothing applied


def test_the_recipe_refuses_in_one_line_when_one_pair_does_not_fit(
    tiny_model_dir, truthy_file, tmp_path, capsys, monkeypatch
):
    """Through the recipe's entry: the probe needs the model, so the refusal comes after the weights load, before
    the first step, as one `error:` line, exit 2, no traceback."""
    from helpers import cli, load_recipe, one_line_error

    import dpo.train.trainer

    small = SimulatedMemory(free=GIB)  # all of it is the margin: nothing to plan for
    monkeypatch.setattr(dpo.train.trainer, "auto_batch", lambda trainer: auto_batch(trainer, small.watch(trainer)))
    argv = cli(
        model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=tmp_path / "out", max_length=64,
        gradient_accumulation_steps=1, test_size=0, reference_cache=False,
    )  # fmt: skip
    line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)  # the YAML's auto with auto_batch_base 2
    assert "per_device_train_batch_size auto: not even one pair of" in line and "lower max_length" in line, line
    assert not (tmp_path / "out" / "run_complete.json").exists()


def test_a_resumed_checkpoints_micro_batch_is_read_from_its_trainer_state(tmp_path):
    from dpo.train.speed.autobatch_probe import resumed_micro_batch

    (tmp_path / "trainer_state.json").write_text('{"train_batch_size": 8, "global_step": 3}')
    assert resumed_micro_batch(tmp_path) == 8
    assert resumed_micro_batch(None) is None
    (tmp_path / "trainer_state.json").write_text("{broken")
    with pytest.raises(UserError, match="trainer_state.json is not valid JSON"):
        resumed_micro_batch(tmp_path)


def test_decide_from_the_probe_matches_hand_numbers():
    # the probe's readings above on a 10 GiB device: plan 9 GiB; a 40-token pair costs 7 x 80 = 560 bytes
    from dpo.train.speed.autobatch import Measured

    d = decide(Measured(RESIDENT, FIXED, 7.0, 7.0), Budget(10 * GIB, False, 10 * GIB), 40, 100, 2, 3, True)
    assert (d.per_pair, d.micro_batch, d.accumulation, d.checkpointing) == (560, 6, 1, False)
    assert d.planned_peak == RESIDENT + 100 * 8 + FIXED + 6 * 560
