"""Kill -9 and signals at chosen moments of training and saving (dpo/train/safety/checkpoints.py, dpo/train/safety/runs.py,
dpo/train/safety/interrupts.py), through the phi-2 recipe on the tiny 4-bit model.

The moments come from the test hook DPO_TEST_SIGNAL_AT=<point>:<step>[:<signal>] (see
dpo.signals.kill_point), which sends the signal from inside the process at that exact point,
so every kill lands where the test says, inside a save included.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli, load_recipe, load_script, one_line_error, with_overrides
from safetensors.torch import load_file

from dpo.train.safety.checkpoints import MARKER, checkpoint_problems, newest_complete_checkpoint
from dpo.train.safety.runs import RUN_MARKER, verify_finished_run
from dpo.train.speed.refstore import Store


def flags(tiny_model_dir, truthy_file, output_dir, *extra):
    base = [
        *cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=output_dir, max_steps=6),
        *cli(save_steps=2, save_total_limit=1),  # the harshest rotation: only one checkpoint is ever kept
        *cli(gradient_accumulation_steps=1, per_device_train_batch_size=4, logging_steps=1, test_size=0),
        *cli(learning_rate=1e-2),  # large: every step changes the adapter visibly
    ]
    return with_overrides(base, *extra)


RECIPE = ROOT / "recipes" / "dpo_phi2.py"
fork_runner = load_script(ROOT / "benchmarks" / "fork_runner.py", "fork_runner")
ForkServer, kill_9 = fork_runner.ForkServer, fork_runner.kill_9


@pytest.fixture(scope="module")
def forks():
    """Starts each recipe run below as `python recipes/dpo_phi2.py ...` would, in a process of its own, forked from
    one that imported torch, transformers, peft, trl and datasets once (benchmarks/fork_runner.py): the module's ~15
    runs, each started fresh, paid 6-18 s of those imports apiece on 2 cores. A kill -9 kills the run's process."""
    server = ForkServer(cwd=os.getcwd())
    yield server
    server.close()


def run_recipe(forks, argv, signal_at=""):
    """The recipe as a user runs it, in its own process, with the test hook set: its exit status and output;
    killed after 300 s, so a hung run fails the test instead of hanging it."""
    env = {**os.environ, "DPO_TEST_SIGNAL_AT": signal_at}
    status, stdout, stderr = forks.run([RECIPE, *argv], env, timeout=300)
    return subprocess.CompletedProcess(argv, status, stdout, stderr)


def train_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(h["step"], h["loss"], h["num_tokens"]) for h in state["log_history"] if "loss" in h]


@pytest.mark.slow
def test_a_run_still_going_at_its_timeout_is_killed(forks, tmp_path):
    """run_recipe's watchdog (ForkServer.run's timeout): a hung run ends as killed, not when it would have ended.
    Whether it printed its first line within the 2 s depends on the machine's load, so only its end is checked."""
    hung = tmp_path / "hung.py"
    hung.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\nprint('woke')\n")
    status, stdout, _ = forks.run([hung], timeout=2)
    assert status == -signal.SIGKILL and "woke" not in stdout, (status, stdout)


@pytest.mark.slow
def test_a_forked_script_has_the_import_path_a_fresh_one_has(forks, tmp_path):
    """benchmarks/fork_runner.py: the child's sys.path is `python SCRIPT`'s, its folder first, with neither the
    server's folder (benchmarks/) nor the checkout the server put first for its own imports."""
    script = tmp_path / "path.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.path))\n")
    status, forked, _ = forks.run([script])
    fresh = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert status == 0 and json.loads(forked) == json.loads(fresh), (forked, fresh)


@pytest.mark.slow
def test_kill_9_in_saves_and_steps_then_last_ends_bit_identical(
    forks, tiny_model_dir, truthy_file, tmp_path, uninterrupted
):
    reference, _ = uninterrupted
    out = tmp_path / "killed"
    argv = flags(tiny_model_dir, truthy_file, out)

    # 1. kill -9 inside the save of checkpoint-4: files written, marker not yet
    proc = run_recipe(forks, argv, "files:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint_problems(out / "checkpoint-4"), "a half-saved checkpoint passed as complete"
    assert not checkpoint_problems(out / "checkpoint-2"), "rotation deleted the last complete checkpoint"

    # 2. `last` falls back to checkpoint-2 with a warning; kill -9 after optimizer step 5
    proc = run_recipe(forks, [*argv, "--resume_from_checkpoint", "last"], "step:5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "skipping" in proc.stdout and "checkpoint-4: incomplete" in proc.stdout
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    assert not checkpoint_problems(out / "checkpoint-4")

    # 3. resume from checkpoint-4; kill -9 while the final files replace each other
    proc = run_recipe(forks, [*argv, "--resume_from_checkpoint", "last"], "final-cleared:6")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-4'}" in proc.stdout
    assert not (out / RUN_MARKER).exists(), "a half-written output_dir looks finished"

    # 4. resume from checkpoint-6 (the end): only the final files are written
    proc = run_recipe(forks, [*argv, "--resume_from_checkpoint", "last"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / RUN_MARKER).is_file()

    expected = load_file(reference / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert train_losses(out) == train_losses(reference)  # every step's loss and num_tokens, exactly
    ref_metrics = json.loads((reference / "final_metrics.json").read_text())
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["num_tokens"] == ref_metrics["num_tokens"] > 0
    # the same six per-step losses, summed in a different order (float64 rounding only)
    assert math.isclose(metrics["train_loss"], ref_metrics["train_loss"], rel_tol=1e-12)
    assert metrics["train_resumed_at_step"] == 6


TRAINING_BEGINS = "trainable parameters:"  # the recipe's log line once the model is built, just before training


def run_until(forks, argv, kill_after=None):
    """The recipe in its own process, streamed; `kill_after` seconds after TRAINING_BEGINS is printed,
    kill -9 from outside, wherever the run is then. Returns (exit status, seconds from that line to the end)."""
    with tempfile.TemporaryDirectory() as folder:
        stream = Path(folder) / "stdout"
        os.mkfifo(stream)
        pid = forks.start([RECIPE, *argv], stdout=stream)  # stderr with stdout
        timers = [threading.Timer(300, kill_9, [pid])]  # a hung run fails the test instead of hanging it
        timers[0].start()
        began, lines = None, []
        with open(stream) as output:
            for line in output:
                lines.append(line)
                if began is None and TRAINING_BEGINS in line:
                    began = time.monotonic()
                    if kill_after is not None:
                        timers.append(threading.Timer(kill_after, kill_9, [pid]))
                        timers[-1].start()
        for timer in timers:
            timer.cancel()
        status = forks.wait()
    assert status in (0, -signal.SIGKILL) and (began is not None or status), "".join(lines)[-3000:]
    return status, (time.monotonic() - began) if began else 0.0


@pytest.fixture(scope="module")
def uninterrupted(forks, tiny_model_dir, truthy_file, tmp_path_factory):
    """The run both kill -9 tests must end identical to, run once for the module as a user runs it (its own
    process, no signal): (its output_dir, seconds from TRAINING_BEGINS to its end, which the random kills span).
    The tests only read it."""
    reference = tmp_path_factory.mktemp("crash-resume") / "uninterrupted"
    status, training = run_until(forks, flags(tiny_model_dir, truthy_file, reference))
    assert status == 0
    return reference, training


@pytest.mark.slow
def test_kill_9_at_random_moments_then_last_ends_bit_identical(
    forks, tiny_model_dir, truthy_file, tmp_path, uninterrupted
):
    """kill -9 from outside at seeded random moments of training, saving and writing the final files
    (not at hook points: wherever the process happens to be, a torch.save half-done included),
    then `--resume_from_checkpoint last` (or a fresh start if no checkpoint is complete yet), until the
    run finishes: the adapter and every logged step equal an uninterrupted run's."""
    reference, training = uninterrupted
    rng, out, kills = random.Random(1), tmp_path / "killed", 0
    for _ in range(12):
        resume = ["--resume_from_checkpoint", "last"] if newest_complete_checkpoint(out, warn=False) else []
        kill_after = rng.uniform(0, 0.8 * training) if kills < 4 else None
        status, _ = run_until(forks, [*flags(tiny_model_dir, truthy_file, out), *resume], kill_after)
        if status == 0:
            break
        assert status == -signal.SIGKILL
        kills += 1
    assert status == 0 and kills >= 1  # the first kill always lands: it comes before a full run would end
    expected = load_file(reference / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert train_losses(out) == train_losses(reference)
    assert (out / RUN_MARKER).is_file()


def run_in_process(argv, signal_at, monkeypatch, capsys):
    """The recipe's entry point in this process, signals sent by the hook: (exit status, stdout, stderr)."""
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", signal_at)
    with pytest.raises(SystemExit) as stopped:
        load_recipe("dpo_phi2").main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_ctrl_c_exits_130_without_traceback_and_a_second_one_cannot_break_the_save(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch, capsys
):
    """SIGINT during step 3, and again while checkpoint-3 is being written."""
    out = tmp_path / "run"
    argv = flags(tiny_model_dir, truthy_file, out, "--save_steps", "100")
    status, stdout, stderr = run_in_process(argv, "step:3:SIGINT,files:3:SIGINT", monkeypatch, capsys)
    assert status == 130
    assert "Traceback" not in stderr
    assert "will be finished first" in stdout
    assert not checkpoint_problems(out / "checkpoint-3")
    assert not (out / "adapter_model.safetensors").exists() and not (out / RUN_MARKER).exists()
    assert "resume with --resume_from_checkpoint last" in stderr.lower()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_first_signal_during_a_checkpoint_save_stops_training_after_that_save(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch, capsys, name
):
    """Was: "a checkpoint is being written; it will be finished first", then training went on to its end, exit 0
    (a rounds run carried on through two more rounds)."""
    out = tmp_path / "run"
    status, stdout, stderr = run_in_process(
        flags(tiny_model_dir, truthy_file, out), f"files:2:{name}", monkeypatch, capsys
    )
    assert status == 128 + getattr(signal, name), stderr
    assert "will be finished first" in stdout and f"{name} at step 2: checkpoint saved" in stderr
    assert "Traceback" not in stderr and "done:" not in stdout
    assert not checkpoint_problems(out / "checkpoint-2") and not (out / "checkpoint-4").exists()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / RUN_MARKER).exists()


def test_a_signal_during_the_final_save_stops_once_the_run_is_complete(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch, capsys
):
    """Was: held and dropped; the run said "done" and exited 0 as if no Ctrl-C had come."""
    out = tmp_path / "run"
    status, stdout, stderr = run_in_process(
        flags(tiny_model_dir, truthy_file, out), "final-staged:6:SIGINT", monkeypatch, capsys
    )
    assert status == 130 and "Traceback" not in stderr and "done:" not in stdout, stderr
    assert f"SIGINT while saving the final files of {out}: the save was finished first" in stderr
    assert f"the run in {out} is complete" in stderr
    assert verify_finished_run(out, "the test")["global_step"] == 6  # every final file whole, as hashed


@pytest.mark.parametrize("steps, part_rows", [(12, 48), (6, 4)])
def test_a_signal_during_a_reference_cache_write_stops_once_the_part_is_whole(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch, capsys, steps, part_rows
):
    """12 steps of 4 reach all 48 pairs: the part filled before training. 6 reach 24: the first part is the
    4 pairs step 1 filled as it reached them, written at the step's end (dpo/train/speed/reflazy.py)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = flags(tiny_model_dir, truthy_file, out, "--reference_cache_dir", str(cache), "--max_steps", str(steps))
    status, _, stderr = run_in_process(argv, "save-cache-part:0:SIGINT", monkeypatch, capsys)
    assert status == 130 and "SIGINT while saving reference cache part" in stderr, stderr
    assert "reference values in that part are reused" in stderr
    (key,) = cache.iterdir()
    assert len(Store(key).load().rows) == part_rows  # the part and its checksum, whole (load verifies both)
    assert not list(key.glob(".*.tmp")) and not list(out.glob("checkpoint-*"))


def test_sigterm_saves_a_resumable_checkpoint(tiny_model_dir, truthy_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = flags(tiny_model_dir, truthy_file, out, "--save_steps", "100")
    status, _, stderr = run_in_process(argv, "step:3:SIGTERM", monkeypatch, capsys)
    assert status == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "SIGTERM at step 3" in stderr
    assert not checkpoint_problems(out / "checkpoint-3")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and MARKER in os.listdir(out / "checkpoint-3")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, said",
    [
        ("final-staged:6", "the run was stopped during its final save"),
        ("step:5", "the run was stopped after step 4 of 6 was saved"),
    ],
    ids=["during_the_final_save", "during_training"],
)
def test_rerun_beside_this_runs_complete_checkpoint_is_refused_naming_resume_last(
    forks, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load, kill_at, said
):
    """Rerunning the same command after a kill must not silently start again at step 0."""
    out = tmp_path / "run"
    argv = flags(tiny_model_dir, truthy_file, out, "--save_total_limit", "2")
    proc = run_recipe(forks, argv, kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / RUN_MARKER).exists()
    newest = newest_complete_checkpoint(out, warn=False)

    line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)
    assert f"--output_dir {out} holds a complete checkpoint of this run ({newest.name})" in line, line
    assert said in line and "--resume_from_checkpoint last" in line and "--overwrite_output_dir true" in line

    proc = run_recipe(forks, [*argv, "--resume_from_checkpoint", "last"])  # its own process: weights may load there
    assert proc.returncode == 0 and f"resuming from {newest}" in proc.stdout, proc.stderr[-2000:]
    assert (out / RUN_MARKER).is_file()
