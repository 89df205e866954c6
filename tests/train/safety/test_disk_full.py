"""An output_dir on a disk that is, or becomes, full (dpo/files.py, dpo/train/safety/checkpoints.py, dpo/train/safety/runs.py).

The disk is real: a small tmpfs mounted for the test (as root; elsewhere the tests are skipped,
saying why). Before any weights load, a disk without room for one checkpoint and the final files
is refused in one line; a save that fills the disk later ends in one `error:` line naming the
folder and the space needed, and nothing complete is lost: the half-written checkpoint is skipped
by `--resume_from_checkpoint last`, which finishes the run once there is space again.
"""

import re
import subprocess

import pytest
import torch
from helpers import ROOT, cli, load_recipe, one_line_error
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from dpo.files import disk_full_while_writing
from dpo.train.safety.checkpoints import (
    ADAM_STATES,
    BYTES_PER_TRAINABLE,
    checkpoint_problems,
    list_files,
    save_sizes,
    tokenizer_bytes,
)
from dpo.train.safety.runs import RUN_MARKER


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dpo_phi2")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that size (`300k`, `20m`), unmounted after the test."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed test may hold a file open


def fill(folder):
    """Write zeros into folder/filler until the disk refuses: it is then full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass


class FillDiskAt(TrainerCallback):
    """Fill the disk after optimizer step `step` (None: when training ends, before the final files)."""

    def __init__(self, folder, step=None):
        self.folder, self.step = folder, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            fill(self.folder)

    def on_train_end(self, args, state, control, **kwargs):
        if self.step is None:
            fill(self.folder)


def flags(tiny_model_dir, truthy_file, output_dir):
    # save_total_limit 1: rotation must never delete the last complete checkpoint, even when a save fails
    settings = dict(max_steps=6, save_steps=2, save_total_limit=1, gradient_accumulation_steps=1)
    settings.update(per_device_train_batch_size=4, logging_steps=1, test_size=0)
    return cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=output_dir, **settings)


def error_line(main, argv, callbacks, capsys) -> str:
    """Run a recipe that stops during training: exit status 2, one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv], callbacks=callbacks)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    found = re.findall(r"error: .*(?:\n  .*)*", err)  # a progress bar may precede it on the same line
    assert len(found) == 1 and "\n" not in found[0], err[-3000:]
    assert "Traceback" not in err
    return found[0]


def test_an_output_dir_without_room_for_a_checkpoint_is_refused_before_weights_load(
    recipe, tiny_model_dir, truthy_file, small_disk, capsys, no_weights_load
):
    out = small_disk("300k") / "out"  # one checkpoint of the tiny model is about 430 kB
    line = one_line_error(recipe.main, flags(tiny_model_dir, truthy_file, out), capsys)
    assert line.startswith(f"error: disk full: {out} has ") and "needed for one checkpoint (adapter" in line, line
    assert "optimizer state" in line and "pick another --output_dir" in line


def test_full_disk_errors_from_torch_save_and_safetensors_are_recognised(small_disk, tmp_path):
    disk = small_disk("200k")
    fill(disk)
    tensors = {"w": torch.zeros(50_000)}
    for write in (lambda p: torch.save(tensors, p), lambda p: save_file(tensors, p)):
        with pytest.raises(Exception) as failure:
            write(disk / "x")
        assert disk_full_while_writing(failure.value, disk, lambda: 200_000) == 200_000, failure.value
    # the same kinds of error on a disk with room are not called a full disk
    assert disk_full_while_writing(RuntimeError("unexpected pos 704 vs 598"), tmp_path, lambda: 1000) is None
    assert disk_full_while_writing(PermissionError(13, "Permission denied"), tmp_path, lambda: 1000) is None
    assert disk_full_while_writing(KeyError("x"), disk, lambda: 1000) is None


def run_until_the_disk_fills(recipe, model_dir, data, small_disk, capsys, step=None):
    """The recipe on a 20 MB disk that fills at `step`'s checkpoint (None: at the final files). Returns
    (disk, output_dir, argv, the one error line), the line checked to name the full output_dir."""
    disk = small_disk("20m")
    out = disk / "out"
    argv = flags(model_dir, data, out)
    line = error_line(recipe.main, argv, [FillDiskAt(disk, step=step)], capsys)
    assert line.startswith(f"error: disk full: {out} has "), line
    return disk, out, argv, line


@pytest.mark.slow
def test_a_checkpoint_that_fills_the_disk_stops_in_one_line_and_last_resumes_past_it(
    recipe, tiny_model_dir, truthy_file, small_disk, capsys
):
    disk, out, argv, line = run_until_the_disk_fills(recipe, tiny_model_dir, truthy_file, small_disk, capsys, step=3)
    assert "needed for checkpoint-4: about" in line, line
    assert "the newest complete checkpoint is checkpoint-2" in line and "--resume_from_checkpoint last" in line
    assert checkpoint_problems(out / "checkpoint-4"), "a half-written checkpoint passed as complete"
    assert not checkpoint_problems(out / "checkpoint-2"), "the last complete checkpoint was lost"
    assert not (out / RUN_MARKER).exists()

    (disk / "filler").unlink()  # space again
    recipe.main([*argv, "--resume_from_checkpoint", "last"])
    log = capsys.readouterr().out
    assert "checkpoint-4: incomplete" in log and f"resuming from {out / 'checkpoint-2'}" in log
    assert (out / RUN_MARKER).is_file() and not checkpoint_problems(out / "checkpoint-6")


@pytest.mark.slow
def test_final_files_that_fill_the_disk_stop_in_one_line_and_last_writes_them(
    recipe, tiny_model_dir, truthy_file, small_disk, capsys
):
    disk, out, argv, line = run_until_the_disk_fills(recipe, tiny_model_dir, truthy_file, small_disk, capsys)
    assert "needed for the final files: about" in line, line
    assert "the newest complete checkpoint is checkpoint-6" in line and "--resume_from_checkpoint last" in line
    assert not (out / RUN_MARKER).exists() and not (out / ".final-staging").exists()
    assert not checkpoint_problems(out / "checkpoint-6")

    (disk / "filler").unlink()
    recipe.main([*argv, "--resume_from_checkpoint", "last"])
    assert "writing the final files only" in capsys.readouterr().out
    assert (out / RUN_MARKER).is_file()

    # the estimate made before weights load (dpo.train.model_checks.trainable_parameter_count) against what was written
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args
    from dpo.train.model_checks import check_lora_targets, load_model_config, load_tokenizer, trainable_parameter_count

    _, _, model_args, _ = parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), ROOT / "recipes" / "dpo_phi2.yaml", argv
    )
    config = load_model_config(str(tiny_model_dir))
    trainable = trainable_parameter_count(
        config, model_args, check_lora_targets(config, model_args.lora_target_modules)
    )
    assert trainable == sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    weights = BYTES_PER_TRAINABLE * trainable
    estimate = save_sizes(weights, ADAM_STATES * weights, tokenizer_bytes(load_tokenizer(str(tiny_model_dir))))
    written = sum(list_files(out / "checkpoint-6").values())
    assert written <= estimate["checkpoint"] <= written + 2**21  # an upper bound, not a wild one
