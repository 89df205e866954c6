"""dpo.signals.saving, the one place that holds Ctrl-C and SIGTERM during a save: the save finishes, then the
run stops (never dropped, never halfway through a file). Real signals, sent to this process."""

import os
import signal

import pytest

from dpo.errors import RunStopped
from dpo.folders import write_marked_folder
from dpo.signals import saving


def written_after_signals(path, *signums):
    """A save that gets `signums` halfway, then writes the rest."""
    path.write_text("first half ")
    for signum in signums:
        os.kill(os.getpid(), signum)
    with path.open("a") as f:
        f.write("second half")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_signal_during_a_save_stops_the_run_once_the_save_is_whole(tmp_path, signum, capsys):
    with pytest.raises(RunStopped) as stopped:
        with saving("the file", advice="Run the same command again"):
            written_after_signals(tmp_path / "f", signum)
    assert (tmp_path / "f").read_text() == "first half second half"
    assert stopped.value.exit_status == 128 + signum
    assert str(stopped.value) == (
        f"{signal.Signals(signum).name} while saving the file: the save was finished first. Run the same command again"
    )
    assert "it will be finished first, then the run stops" in capsys.readouterr().out


def test_a_second_signal_still_lets_the_save_finish_and_the_handlers_come_back(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunStopped) as stopped:
        with saving("the file"):
            written_after_signals(tmp_path / "f", signal.SIGINT, signal.SIGINT)
    assert (tmp_path / "f").read_text() == "first half second half" and stopped.value.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_training_decides_itself_and_an_inner_save_leaves_it_to_the_outer_one(tmp_path):
    """`then`: training stops at the step it saved; a save inside another (the marker inside a checkpoint) waits
    for the outer one."""
    told = []
    with saving("checkpoint-2", then=told.append):
        with saving("its marker"):
            written_after_signals(tmp_path / "f", signal.SIGTERM)
        assert told == []  # nothing decided while the outer save runs
    assert told == [signal.SIGTERM]


def test_an_error_in_the_save_wins_over_the_signal(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        with saving("the file"):
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError("disk full")
    with saving("the next file"):  # the signal was not kept for a later save
        pass


def test_a_signal_while_a_folder_is_swapped_in_stops_after_the_swap(tmp_path, monkeypatch):
    """dpo.folders.write_marked_folder (an export's merged model, evaluate's report): a Ctrl-C between moving the
    old folder aside and renaming the new one in would leave neither."""
    target = tmp_path / "merged"
    write_marked_folder(target, lambda folder: (folder / "model.safetensors").write_text("old"), "merged model")
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", "save-folder:0:SIGINT")  # the hook at the start of the swap
    with pytest.raises((RunStopped, KeyboardInterrupt)) as stopped:  # KeyboardInterrupt: halfway, unheld
        write_marked_folder(target, lambda folder: (folder / "model.safetensors").write_text("new"), "merged model")
    assert stopped.type is RunStopped and stopped.value.exit_status == 130 and str(target) in str(stopped.value)
    assert (target / "model.safetensors").read_text() == "new" and os.listdir(tmp_path) == ["merged"]


@pytest.mark.parametrize("stale", [True, False], ids=["replacing_a_stale_build", "into_an_empty_folder"])
def test_a_signal_while_a_model_folder_is_put_in_place_stops_after_it(tmp_path, monkeypatch, stale):
    """`python -m dpo.models`: a stale build is moved aside, then the new one renamed in; between the two no
    folder would be left at its place."""
    from dpo.offline.pip_models import _put_in_place

    out, staging = tmp_path / "smollm2", tmp_path / ".staging"
    out.mkdir()
    if stale:
        (out / "config.json").write_text("old")
    staging.mkdir()
    (staging / "config.json").write_text("new")
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", "save-model-folder:0:SIGINT")
    with pytest.raises((RunStopped, KeyboardInterrupt)) as stopped:
        _put_in_place(staging, out, stale)
    assert stopped.type is RunStopped and stopped.value.exit_status == 130
    assert (out / "config.json").read_text() == "new" and os.listdir(tmp_path) == ["smollm2"]
