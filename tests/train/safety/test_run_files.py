"""What a run folder's own files say is verified before it is acted on (dpo/files.py, dpo/train/safety/runs.py,
dpo/train/safety/checkpoints.py): run_complete.json can only name files inside its folder (a reuse with
--overwrite_output_dir deletes nothing else), its shape is checked, and a checkpoint's files must match the
sha256 its marker recorded before a resume loads them."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
from helpers import cli, fake_checkpoint, load_recipe, one_line_error

from dpo.errors import UserError
from dpo.train.safety.checkpoints import MARKER, checkpoint_problems, resolve_resume
from dpo.train.safety.runs import RUN_MARKER, write_final_outputs


def flags(tiny_model_dir, truthy_file, output_dir, *extra):
    data = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=output_dir)
    return [*data, *cli(gradient_accumulation_steps=1, test_size=0, logging_steps=1), *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, truthy_file, tmp_path_factory):
    """A finished 2-step run with checkpoint-2."""
    out = tmp_path_factory.mktemp("finished")
    load_recipe("dpo_phi2").main(flags(tiny_model_dir, truthy_file, out, "--max_steps", "2", "--save_steps", "2"))
    return out


def edit_marker(folder, change):
    marker = json.loads((folder / RUN_MARKER).read_text())
    change(marker)
    (folder / RUN_MARKER).write_text(json.dumps(marker))


def victims(tmp_path):
    """A file and a folder outside the run folder, which nothing may delete."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "keep.txt").write_text("mine")
    (outside / "file.txt").write_text("mine")
    return outside


def intact(outside) -> bool:
    return (outside / "file.txt").read_text() == "mine" and (outside / "folder" / "keep.txt").read_text() == "mine"


ESCAPES = ["absolute_file", "absolute_folder", "dot_dot", "symlink_out", "the_folder_itself", "checkpoint_symlink"]


def plant(run, outside, escape) -> str:
    """Make the run folder name something outside itself in one of the ways a handed-over folder can."""
    if escape == "checkpoint_symlink":  # a checkpoint-N that is a link to another folder
        (run / "checkpoint-9").symlink_to(outside / "folder", target_is_directory=True)
        return "checkpoint-9"
    entry = {
        "absolute_file": str(outside / "file.txt"),
        "absolute_folder": str(outside / "folder"),
        "dot_dot": "../outside/folder",
        "symlink_out": "linked",
        "the_folder_itself": ".",
    }[escape]
    if escape == "symlink_out":
        (run / "linked").symlink_to(outside / "folder", target_is_directory=True)
    edit_marker(run, lambda m: m["files"].append(entry))
    return entry


@pytest.mark.parametrize("escape", ESCAPES)
def test_overwrite_output_dir_never_deletes_outside_the_folder(
    escape, finished, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    outside = victims(tmp_path)
    entry = plant(run, outside, escape)
    argv = flags(
        tiny_model_dir, truthy_file, run, "--max_steps", "1", "--beta", "0.3", "--overwrite_output_dir", "true"
    )
    line = one_line_error(load_recipe("dpo_phi2").main, argv, capsys)
    assert f"lists {entry!r}, which resolves to" in line and "nothing was touched" in line, line
    assert intact(outside) and (run / RUN_MARKER).is_file() and (run / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("escape", ["absolute_folder", "dot_dot", "symlink_out"])
def test_replacing_the_final_files_never_deletes_outside_the_folder(escape, tmp_path):
    """The final save removes the old run's files: an old marker naming something outside is refused first."""
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text(json.dumps({"run": {}, "files": []}))
    outside = victims(tmp_path)
    entry = plant(run, outside, escape)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None),
        args=SimpleNamespace(output_dir=str(run)),
        state=SimpleNamespace(global_step=1),
    )
    with pytest.raises(UserError, match=f"lists {entry!r}, which resolves to"):
        write_final_outputs(trainer, {"seed": 1}, lambda folder: (folder / "final_metrics.json").write_text("{}"))
    assert intact(outside)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_run_key", "has no 'run' entry"),
        ("files_not_a_list", "entry 'files' is a string, not a list"),
        ("a_file_name_that_is_a_number", "entry 'files' [0] is an integer, not a string"),
        ("not_json", "is not valid JSON (line 1, column 2"),
    ],
)
def test_a_damaged_run_complete_json_is_one_line_naming_the_entry(
    damage, message, finished, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """A marker of the wrong shape: the training recipe (reusing the folder), evaluate and export."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    if damage == "not_json":
        (run / RUN_MARKER).write_text("{run: 1}")
    else:
        change = {
            "no_run_key": lambda m: m.pop("run"),
            "files_not_a_list": lambda m: m.update(files="adapter_model.safetensors"),
            "a_file_name_that_is_a_number": lambda m: m.update(files=[7]),
        }[damage]
        edit_marker(run, change)
    argv = flags(tiny_model_dir, truthy_file, run, "--max_steps", "2", "--save_steps", "2")
    for main, args in (
        (load_recipe("dpo_phi2").main, argv),
        (evaluate, [run]),
        (export, [run, "--merged", tmp_path / "merged"]),
    ):
        line = one_line_error(main, args, capsys)
        assert f"{run / RUN_MARKER} {message}" in line and f"delete {run / RUN_MARKER}" in line, line


def test_a_checkpoint_file_overwritten_at_the_same_size_is_not_resumed(
    finished, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """Sizes match the marker, bytes do not: the sha256 recorded at save time tells them apart before a resume."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(os.urandom(size))
    assert not checkpoint_problems(run / "checkpoint-2")  # the cheap size check cannot see it
    argv = flags(tiny_model_dir, truthy_file, run, "--max_steps", "2", "--save_steps", "2")
    line = one_line_error(
        load_recipe("dpo_phi2").main, [*argv, "--resume_from_checkpoint", run / "checkpoint-2"], capsys
    )
    assert f"checkpoint-2 is incomplete: {optimizer} has sha256" in line, line
    assert "was recorded when it was written (changed after the checkpoint was saved)" in line, line


def test_last_skips_a_checkpoint_whose_files_changed_and_a_marker_naming_outside(tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-4")
    fake_checkpoint(tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "scheduler.pt").write_bytes(b"y" * 16)  # same size, other bytes
    marker = json.loads((tmp_path / "checkpoint-4" / MARKER).read_text())
    marker["files"]["../../elsewhere.bin"] = 1
    (tmp_path / "checkpoint-4" / MARKER).write_text(json.dumps(marker))
    assert resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    out = capsys.readouterr().out
    assert "checkpoint-6: incomplete" in out and "scheduler.pt has sha256" in out, out
    assert "checkpoint-4: incomplete" in out and "names '../../elsewhere.bin', which is not inside" in out, out


def test_a_run_finished_before_hashes_were_recorded_is_used_with_a_warning(tmp_path, capsys):
    """Older run folders have no sha256 in run_complete.json: evaluate and export still take them (nothing a
    user trained is lost) and say that the adapter cannot be checked; a recorded hash that differs is refused."""
    from dpo.train.safety.runs import verify_finished_run

    run = tmp_path / "old-run"
    run.mkdir()
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    (run / RUN_MARKER).write_text(json.dumps({"run": {"seed": 1}, "files": ["adapter_model.safetensors"]}))
    assert verify_finished_run(run, "evaluate")["files"] == ["adapter_model.safetensors"]
    assert "records no sha256 of the run's files" in capsys.readouterr().out
    edit_marker(run, lambda m: m.update(sha256={"adapter_model.safetensors": "0" * 64}))
    with pytest.raises(UserError, match="the run folder changed after the run finished"):
        verify_finished_run(run, "evaluate")


def test_a_staging_folder_that_is_a_link_is_replaced_and_its_target_untouched(tmp_path):
    """A handed-over run folder whose .final-staging is a link to a folder elsewhere: the final save removes the
    link (it was a FileExistsError traceback) and writes into a real folder; what the link pointed to stays."""
    from dpo.train.safety.runs import STAGING

    run = tmp_path / "run"
    run.mkdir()
    outside = victims(tmp_path)
    (run / STAGING).symlink_to(outside / "folder", target_is_directory=True)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None),
        args=SimpleNamespace(output_dir=str(run)),
        state=SimpleNamespace(global_step=1),
    )
    write_final_outputs(trainer, {"seed": 1}, lambda folder: (folder / "final_metrics.json").write_text("{}"))
    assert intact(outside) and not (outside / "folder" / "final_metrics.json").exists()
    assert (run / "final_metrics.json").read_text() == "{}" and not (run / STAGING).exists()


def test_a_run_complete_json_that_is_a_folder_is_one_line_before_weights_load(
    finished, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """The probe's case: run_complete.json a folder. evaluate said "has no run_complete.json ... finish it with
    --resume_from_checkpoint last", and doing that was an IsADirectoryError after the weights loaded (moving the
    final files in). Now the training recipe (resuming or not), evaluate and export each say it is not a file."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / RUN_MARKER).unlink()
    (run / RUN_MARKER).mkdir()
    argv = flags(tiny_model_dir, truthy_file, run, "--max_steps", "2", "--save_steps", "2")
    for main, args in (
        (load_recipe("dpo_phi2").main, [*argv, "--resume_from_checkpoint", "last"]),
        (load_recipe("dpo_phi2").main, argv),
        (evaluate, [run]),
        (export, [run, "--merged", tmp_path / "merged"]),
    ):
        line = one_line_error(main, args, capsys)
        assert f"{run / RUN_MARKER} is a folder, not a file" in line and "Remove it" in line, line
    assert (run / RUN_MARKER).is_dir() and not (tmp_path / "merged").exists()


def test_rotation_deletes_only_this_runs_own_older_checkpoints(tmp_path):
    """save_total_limit's rotation (dpo/train/safety/checkpoints.py rotate): was every complete checkpoint in
    output_dir, whoever marked it (another run's, beside a resume from elsewhere), and every unmarked folder
    (a plain TRL run's checkpoints) older than the newest complete one."""
    from dpo.train.safety.checkpoints import rotate
    from dpo.train.safety.identity import BASE_KEY

    ours, other = {"seed": 1, BASE_KEY: "sha256:ab"}, {"seed": 2, BASE_KEY: "sha256:ab"}
    made = {
        "checkpoint-1": fake_checkpoint(tmp_path / "checkpoint-1", run=other),  # another run's, marked
        "checkpoint-2": fake_checkpoint(tmp_path / "checkpoint-2", step_marker=False),  # unmarked: TRL's, or killed
        **{f"checkpoint-{s}": fake_checkpoint(tmp_path / f"checkpoint-{s}", run=ours) for s in (3, 4, 5, 6)},
    }
    best = str(tmp_path / "checkpoint-3")
    assert rotate(tmp_path, 2, ours, keep=best) == [tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(made) - {"checkpoint-4"})
    assert rotate(tmp_path, None, ours) == [] and rotate(tmp_path, 1, other) == []  # its only one stays
