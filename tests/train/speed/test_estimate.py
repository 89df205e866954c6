"""dpo/train/speed/estimate.py: a run says what it will cost after its first micro-batch, once, and on a CPU
where that is long, the settings of a quick trial run (issue: a 3-step run of the default YAML took 25 minutes
on 2 cores without a word)."""

from types import SimpleNamespace

import pytest
from helpers import load_recipe

from dpo.train.speed.estimate import LONG_ON_CPU, RunEstimate


class Clock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def settings(device="cpu", **overrides):
    values = dict(per_device_train_batch_size=8, gradient_accumulation_steps=8, max_steps=3, max_length=256)
    values.update(overrides)
    return SimpleNamespace(world_size=1, device=SimpleNamespace(type=device), **values)


def run_callback(args, clock, global_step=0, max_steps=3, substeps=3):
    state = SimpleNamespace(global_step=global_step, max_steps=max_steps)
    callback = RunEstimate(clock)
    callback.on_train_begin(args, state, None)
    callback.on_step_begin(args, state, None)
    for _ in range(substeps):  # the later micro-batches of the step, then later steps: nothing more is said
        callback.on_substep_end(args, state, None)
    callback.on_step_end(args, state, None)
    callback.on_step_begin(args, state, None)
    return callback


def test_the_first_micro_batch_scales_to_the_step_and_the_run_and_is_said_once(capsys):
    # 41.25 s for 8 pairs: a step of 8 micro-batches is 330 s (5.5 min, said "6 min"), 3 steps 990 s = 16.5 min,
    # past LONG_ON_CPU (15 min): the trial flags are those the run does not already meet (max_steps 3 and
    # max_length 256 already are the trial's)
    assert 3 * 8 * 41.25 > LONG_ON_CPU
    run_callback(settings(), Clock(100.0, 141.25))
    lines = [line for line in capsys.readouterr().out.splitlines() if "estimate:" in line]
    assert len(lines) == 1, lines
    assert "the first micro-batch took 41 s, so an optimizer step of 64 pairs takes about 6 min" in lines[0]
    assert "the run's 3 step(s) about 16 min" in lines[0]
    assert lines[0].endswith(
        "a quick trial run first: --gradient_accumulation_steps 2 --per_device_train_batch_size 2"
    )


@pytest.mark.parametrize(
    "device, first, said",
    [
        ("cuda", 41.25, False),  # long, but not a CPU: no trial advice
        ("cpu", 30.0, False),  # 3 x 8 x 30 s = 12 min: not long
    ],
)
def test_the_trial_advice_comes_only_for_a_long_cpu_run(capsys, device, first, said):
    run_callback(settings(device), Clock(0.0, first))
    assert ("quick trial run" in capsys.readouterr().out) is said


def test_a_resumed_run_counts_the_steps_it_will_take_and_accumulation_1_uses_the_first_step(capsys):
    args = settings(gradient_accumulation_steps=1, per_device_train_batch_size=2, max_steps=-1, max_length=None)
    run_callback(args, Clock(0.0, 7200.0), global_step=10, max_steps=40, substeps=0)  # resumed at step 10 of 40
    out = capsys.readouterr().out
    assert "an optimizer step of 2 pairs takes about 2.0 h and the run's 30 step(s) about 60.0 h" in out
    assert out.rstrip().endswith("--max_steps 3 --max_length 256")


@pytest.mark.slow
def test_a_real_run_says_its_estimate_once(tiny_model_dir, truthy_file, tmp_path, capsys):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    argv += ["--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--gradient_accumulation_steps", "2"]
    argv += ["--per_device_train_batch_size", "2", "--max_length", "64", "--test_size", "0.25"]
    argv += ["--save_strategy", "no", "--eval_strategy", "no", "--warmup_steps", "0"]
    load_recipe("dpo_phi2").main(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if "estimate:" in line]
    assert len(lines) == 1 and "an optimizer step of 4 pairs" in lines[0] and "the run's 2 step(s)" in lines[0]
