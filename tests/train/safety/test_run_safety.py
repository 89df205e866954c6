"""Non-finite guard, health check, complete-checkpoint detection, refusing to mix runs, and
final files that are complete or visibly not (dpo/train/safety/guards.py, dpo/train/safety/checkpoints.py, dpo/train/safety/runs.py)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import cli, fake_checkpoint, load_recipe
from transformers import TrainerCallback

import dpo.train.safety.runs
from dpo.errors import UserError
from dpo.train.safety.checkpoints import checkpoint_problems, resolve_resume
from dpo.train.safety.guards import HealthCheck
from dpo.train.safety.runs import RUN_MARKER, write_final_outputs


def flags(tiny_model_dir, truthy_file, output_dir, *extra):
    data = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=output_dir)
    return [*data, *cli(gradient_accumulation_steps=1, test_size=0, logging_steps=1), *extra]


# ── non-finite loss / gradient ───────────────────────────────────────────────────────────────


class PoisonAt(TrainerCallback):
    """At the start of optimizer step `step`: a LoRA weight becomes NaN (-> the loss is NaN), or a
    gradient hook makes one gradient infinite (the loss stays finite)."""

    def __init__(self, step, what):
        self.step, self.what = step, what

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        param = next(p for n, p in model.named_parameters() if "lora_A" in n)
        if self.what == "loss":
            param.data[0, 0] = float("nan")
        else:
            param.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("what, quantity", [("loss", "the loss"), ("grad", "the gradient norm")])
def test_non_finite_stops_with_one_message_and_keeps_the_last_finite_checkpoint(
    what, quantity, tiny_model_dir, truthy_file, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = flags(tiny_model_dir, truthy_file, out, "--max_steps", "5", "--save_steps", "1", "--save_total_limit", "1")
    with pytest.raises(SystemExit) as stopped:
        load_recipe("dpo_phi2").main(argv, callbacks=[PoisonAt(3, what)])
    assert stopped.value.code == 3
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("stopped: "))
    assert f"step 3: {quantity} is" in line and "learning_rate" in line and "beta" in line and "fp32" in line
    assert str(out / "checkpoint-2") in line  # the last finite checkpoint, named ...
    assert not checkpoint_problems(out / "checkpoint-2")  # ... intact, not rotated away
    assert not (out / "checkpoint-1").exists()  # while this run's older one was (save_total_limit 1)
    assert not (out / "checkpoint-3").exists()
    assert not (out / "adapter_model.safetensors").exists() and not (out / RUN_MARKER).exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [h["loss"] for h in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]]
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)  # no NaN logged as 0.0 or anything else


# ── health check (fed the logs DPOTrainer writes) ───────────────────────────────────────────


def feed(check, logs):
    for entry in logs:
        check.on_log(None, None, None, logs=entry)


def test_health_check_warns_about_a_loss_pinned_at_ln2_with_zero_gradient(capsys):
    feed(HealthCheck(), [{"loss": math.log(2), "grad_norm": 0.0}] * 3)
    assert "cannot learn" in capsys.readouterr().out
    feed(HealthCheck(), [{"loss": math.log(2), "grad_norm": 0.4}] * 3)  # the usual first steps of LoRA
    assert "cannot learn" not in capsys.readouterr().out


def test_health_check_warns_about_likelihood_displacement(capsys):
    def logs(chosen, margins):
        return [
            {"loss": 0.5, "grad_norm": 1.0, "rewards/chosen": c, "rewards/margins": m} for c, m in zip(chosen, margins)
        ]

    feed(HealthCheck(), logs([0, -0.5, -1, -2, -3, -4], [0, 0.5, 1, 1.5, 2, 2.5]))
    out = capsys.readouterr().out
    assert "likelihood displacement" in out and "loss_type: [sigmoid, sft]" in out
    feed(HealthCheck(), logs([0, 0.1, 0.1, 0.2, 0.1, 0.2], [0, 0.5, 1, 1.5, 2, 2.5]))  # healthy: chosen holds
    assert "displacement" not in capsys.readouterr().out


def test_health_check_warns_when_nothing_is_trainable(capsys):
    HealthCheck().on_train_begin(None, None, None, model=torch.nn.Linear(2, 2).requires_grad_(False))
    assert "no trainable parameters" in capsys.readouterr().out


# ── complete checkpoints ────────────────────────────────────────────────────────────────────


def test_a_truncated_or_unmarked_checkpoint_is_incomplete_and_last_falls_back(tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-4")
    fake_checkpoint(tmp_path / "checkpoint-6", step_marker=False)  # killed before the marker
    assert not checkpoint_problems(tmp_path / "checkpoint-4")
    with (tmp_path / "checkpoint-4" / "optimizer.pt").open("ab") as f:
        f.truncate(3)  # a file cut short after the marker was written (disk trouble, a copy)
    assert "optimizer.pt has 3 bytes, 16 were written" in checkpoint_problems(tmp_path / "checkpoint-4")
    assert resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    out = capsys.readouterr().out
    assert "skipping" in out and "checkpoint-6: incomplete" in out and "checkpoint-4: incomplete" in out
    with pytest.raises(UserError, match="checkpoint-6 is incomplete.*newest complete one is .*checkpoint-2"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))


def test_resuming_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="is not a checkpoint"):
        resolve_resume(str(tmp_path / "data"), str(tmp_path))
    fake_checkpoint(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(UserError, match="is an output_dir, not a checkpoint.*last"):
        resolve_resume(str(tmp_path / "out"), str(tmp_path))
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume("last", str(tmp_path / "data"))


# ── runs that must not mix ──────────────────────────────────────────────────────────────────


def no_weights(monkeypatch):
    import dpo.train.trainer

    monkeypatch.setattr(dpo.train.trainer, "DPOTrainer", lambda *a, **k: pytest.fail("weights were loaded"))


def fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("dpo_phi2").main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    return err[err.index("error: ") :]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, truthy_file, tmp_path_factory):
    """A finished 2-step run with checkpoint-2."""
    out = tmp_path_factory.mktemp("finished")
    load_recipe("dpo_phi2").main(flags(tiny_model_dir, truthy_file, out, "--max_steps", "2", "--save_steps", "2"))
    return out


def test_resume_with_different_settings_is_refused_listing_them(
    finished, tiny_model_dir, truthy_file, monkeypatch, capsys
):
    no_weights(monkeypatch)
    other_data = finished.parent / "other.jsonl"
    other_data.write_text("".join(truthy_file.read_text().splitlines(True)[:-1]))  # one row fewer
    argv = flags(
        tiny_model_dir, other_data, finished, "--max_steps", "2", "--save_steps", "2", "--learning_rate", "3e-4"
    )
    err = fail([*argv, "--resume_from_checkpoint", "last"], capsys)
    assert "different settings" in err and "learning_rate: " in err and "-> 0.0003" in err
    assert "training_data_sha256" in err and "--resume_with_different_settings true" in err
    assert "max_steps" not in err  # only what differs is listed


def test_a_finished_output_dir_of_another_run_is_not_reused(
    finished, tiny_model_dir, truthy_file, monkeypatch, capsys
):
    no_weights(monkeypatch)
    argv = flags(tiny_model_dir, truthy_file, finished, "--max_steps", "2", "--save_steps", "2", "--beta", "0.3")
    err = fail(argv, capsys)
    assert "holds a finished run with different settings" in err and "beta: 0.1 -> 0.3" in err
    assert "--overwrite_output_dir true" in err
    assert (finished / RUN_MARKER).is_file()  # nothing touched


def test_overwrite_output_dir_deletes_the_other_run(finished, tiny_model_dir, truthy_file, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    argv = flags(tiny_model_dir, truthy_file, out, "--max_steps", "1", "--save_steps", "5", "--beta", "0.3")
    load_recipe("dpo_phi2").main([*argv, "--overwrite_output_dir", "true"])
    assert not (out / "checkpoint-2").exists()  # the other run's checkpoint is gone
    assert json.loads((out / RUN_MARKER).read_text())["run"]["beta"] == 0.3


# ── final files: complete or visibly not ────────────────────────────────────────────────────


def test_a_kill_while_final_files_are_replaced_never_leaves_new_beside_old(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_model.safetensors", "final_metrics.json", "resolved_config.yaml"):
        (out / name).write_text("old")
    (out / RUN_MARKER).write_text(
        json.dumps({"run": {}, "files": ["adapter_model.safetensors", "final_metrics.json", "resolved_config.yaml"]})
    )
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None),
        args=SimpleNamespace(output_dir=str(out)),
        state=SimpleNamespace(global_step=7),
    )

    def write_into(folder):
        (folder / "adapter_model.safetensors").write_text("new")
        (folder / "final_metrics.json").write_text("new")

    class Killed(Exception):
        pass

    def kill_at(point):
        def hook(where, step):
            if where == point:
                raise Killed

        return hook

    monkeypatch.setattr(dpo.train.safety.runs, "kill_point", kill_at("final-staged"))
    with pytest.raises(Killed):
        write_final_outputs(trainer, {"seed": 2}, write_into)
    assert (out / RUN_MARKER).is_file() and (out / "final_metrics.json").read_text() == "old"  # old run still whole
    monkeypatch.setattr(dpo.train.safety.runs, "kill_point", kill_at("final-cleared"))
    with pytest.raises(Killed):
        write_final_outputs(trainer, {"seed": 2}, write_into)
    assert not (out / RUN_MARKER).exists()  # visibly unfinished ...
    assert not any((out / n).exists() for n in ("final_metrics.json", "resolved_config.yaml"))  # ... and no old files
    monkeypatch.setattr(dpo.train.safety.runs, "kill_point", lambda *a: None)
    write_final_outputs(trainer, {"seed": 2}, write_into)
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["files"] == ["adapter_model.safetensors", "final_metrics.json"] and marker["run"] == {"seed": 2}
    assert (out / "final_metrics.json").read_text() == "new" and not (out / ".final-staging").exists()


# ── one run per output_dir: the lock (dpo/train/safety/lock.py) ──────────────────────────────────────────


def run_in_background(argv, env_extra=None, stdin=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, *argv], env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, timeout=240.0):
    import time

    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.2)


def stopped(proc) -> bool:
    from pathlib import Path

    status = Path(f"/proc/{proc.pid}/status").read_text()
    return "T (stopped)" in status


def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(
    tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """Run A is paused (SIGSTOP) after its first optimizer step, alive and holding output_dir; run B into
    the same folder stops in one line naming A's pid, host and start time, before any weights load.
    A then finishes normally and releases the folder."""
    import signal
    import socket

    from helpers import ROOT, one_line_error

    out = tmp_path / "out"
    argv = flags(tiny_model_dir, truthy_file, out, "--max_steps", "2", "--save_strategy", "no")
    first = run_in_background([str(ROOT / "recipes" / "dpo_phi2.py"), *argv], {"DPO_TEST_SIGNAL_AT": "step:1:SIGSTOP"})
    try:
        wait_for(lambda: first.poll() is not None or stopped(first))
        assert first.poll() is None, first.communicate()
        line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)
        assert "is in use by another run" in line and f"pid {first.pid} on host {socket.gethostname()}" in line, line
        assert "started 20" in line
    finally:
        first.send_signal(signal.SIGCONT)
        log, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "done:" in log and (out / RUN_MARKER).is_file()
    assert not (out / ".run.lock").exists()  # released at the end


def test_a_lock_left_by_a_killed_run_is_taken_over_and_one_from_another_host_is_refused(tmp_path, capsys):
    """kill -9 leaves the lock file behind: its pid no longer runs on this host, so it is stale. A lock
    written on another host cannot be checked by pid: refused, saying so."""
    import subprocess

    from dpo.train.safety import lock

    out = tmp_path / "out"
    code = f"import sys; from dpo.train.safety import lock; lock.take({str(out)!r}); print('held', flush=True); sys.stdin.read()"
    holder = run_in_background(["-c", code], stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on host"):
        lock.take(out)  # alive: refused
    holder.kill()
    holder.wait()
    left = json.loads((out / ".run.lock").read_text())
    assert left["pid"] == holder.pid
    assert lock.take(out)  # dead: taken over
    assert "was left by a run that no longer runs" in capsys.readouterr().out
    assert json.loads((out / ".run.lock").read_text())["pid"] != holder.pid
    lock.release(out)
    assert not (out / ".run.lock").exists()

    (out / ".run.lock").write_text(json.dumps({**left, "host": "some-other-machine"}))
    with pytest.raises(UserError, match="run on another host .*some-other-machine.*cannot be checked from"):
        lock.take(out)
    assert json.loads((out / ".run.lock").read_text())["host"] == "some-other-machine"  # left alone


def test_the_lock_is_released_when_a_run_fails_or_is_terminated(tiny_model_dir, truthy_file, tmp_path, capsys):
    """A run that stops on an error releases the folder (and removes the folder it created for nothing);
    SIGTERM before training exits 143 through the same path, lock removed."""
    import signal

    from helpers import one_line_error

    out = tmp_path / "new-out"
    argv = flags(tiny_model_dir, tmp_path / "missing.jsonl", out, "--max_steps", "1")
    one_line_error(load_recipe("dpo_phi2").main, argv, capsys)  # a data error, after the lock was taken
    assert not out.exists()

    code = (
        "import os, signal, sys, time; from dpo.errors import exit_on_user_error; from dpo.train.safety import lock\n"
        "@exit_on_user_error\n"
        f"def main():\n    lock.take({str(out)!r}); print('held', flush=True); time.sleep(60)\n"
        "main()"
    )
    proc = run_in_background(["-c", code])
    assert proc.stdout.readline().strip() == "held"
    assert (out / ".run.lock").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped: SIGTERM" in err and "Traceback" not in err, err
    assert not out.exists()  # lock removed, and the empty folder it had made
