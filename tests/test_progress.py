"""dpo/progress.py: no progress bar stands in front of an `error:` line, and an error that stops a run
while a bar is drawing starts on a line of its own (dpo/errors.py's exit path)."""

import re
import sys

import datasets
import pytest
from tqdm.auto import tqdm

from dpo.data.doctor import main as doctor_main
from dpo.errors import RunStopped, UserError, exit_on_user_error
from dpo.progress import datasets_progress_off, open_bars_on


def test_a_first_uncached_read_of_a_bad_file_prints_only_the_error_line(tmp_path, capsys):
    """The datasets library used to draw "Generating train split: 2 examples [...]" first (a new file is
    never in its cache): the user's screen began with a bar, and the error came after it."""
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 5, "rejected": "c"}\n')
    with pytest.raises(SystemExit) as stop:
        doctor_main([str(bad)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}, row 2, field 'chosen': expected text, got int (5)\n"
    assert datasets.is_progress_bar_enabled()  # switched back on for training's own bars


def test_datasets_bars_are_off_only_inside(capsys):
    with datasets_progress_off():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()


@pytest.fixture(autouse=True)
def no_bars_left_open():
    """A bar left open by an earlier test (these tests leave theirs open on purpose: the error stops them while
    drawing) takes the next bar's screen position, and its lines would come after the error: close them all."""
    from tqdm.std import tqdm as std_tqdm

    for bar in list(std_tqdm._instances):
        bar.close()
    yield
    for bar in list(std_tqdm._instances):
        bar.close()


def stopping_while_drawing(error, close_first=False):
    @exit_on_user_error
    def run():
        bar = tqdm(total=10, desc="training", file=sys.stderr, mininterval=0, delay=0)
        for _ in range(3):
            bar.update(1)
        if close_first:
            bar.close()
        raise error

    return run


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (UserError("no space left on device while saving checkpoint-3"), 2, "error: no space left"),
        (RunStopped("the loss became NaN at step 3", 3), 3, "stopped: the loss became NaN"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_an_error_while_a_bar_is_drawing_starts_on_its_own_line(error, status, line, capsys):
    with pytest.raises(SystemExit) as stop:
        stopping_while_drawing(error)()
    assert stop.value.code == status
    err = capsys.readouterr().err
    assert "training" in err  # the bar did draw
    last = err.split("\n")[-2]
    assert last.startswith(line), repr(err)


def test_a_closed_bar_adds_no_blank_line(capsys):
    with pytest.raises(SystemExit):
        stopping_while_drawing(UserError("bad"), close_first=True)()
    err = capsys.readouterr().err
    # the bar's own newline, then the error: no empty line (tqdm pads a redraw shorter than the line before it with
    # spaces: "7616.77it/s] " after "10812.61it/s]", depending on the rates measured)
    assert re.search(r"\] *\nerror: bad\n$", err), repr(err)
    assert not open_bars_on(sys.stderr)
