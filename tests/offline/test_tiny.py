"""python -m dpo.tiny (dpo/offline/tiny.py): writes new files only, and never through a symbolic link."""

import pytest
from helpers import one_line_error

from dpo.offline.tiny import main


@pytest.mark.parametrize("kind", ["dangling", "to_an_empty_folder"])
def test_tiny_refuses_a_symbolic_link_as_its_output_folder_or_rows_file(kind, tmp_path, capsys):
    """A dangling link as the output folder was a FileExistsError traceback; a link to an empty folder wrote the
    model wherever it pointed. Both are one line naming the link, for the folder and for --truthy_rows, and
    nothing is written."""
    target = tmp_path / "elsewhere"
    if kind == "to_an_empty_folder":
        target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    line = one_line_error(main, [link], capsys)
    assert f"output_dir {link} is a symbolic link (to {target}" in line, line
    assert (", which does not exist" in line) == (kind == "dangling"), line
    line = one_line_error(main, [tmp_path / "new", "--truthy_rows", link], capsys)
    assert f"--truthy_rows {link} is a symbolic link" in line, line
    assert not (tmp_path / "new").exists()
    assert not target.exists() if kind == "dangling" else not any(target.iterdir())


def test_recipes_readme_tiny_commands_run_in_order_in_one_folder(tmp_path, monkeypatch, capsys):
    """Following recipes/README.md in order, the second `python -m dpo.tiny outputs/tiny-phi --truthy_rows ...`
    failed because the first had written the folder. A folder or file already holding the same bytes is kept."""
    import shlex

    from helpers import ROOT

    from dpo.offline.tiny import main

    text = (ROOT / "recipes" / "README.md").read_text()
    commands = [shlex.split(line)[3:] for line in text.splitlines() if line.startswith("python -m dpo.tiny ")]
    assert len(commands) >= 2 and commands[0][0] == commands[1][0], commands  # the same folder, twice
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        main(argv)
    said = capsys.readouterr().out
    assert "already holds this tiny Phi model (seed 0, the same bytes): kept as it is" in said
    assert (tmp_path / commands[0][0] / "model.safetensors").is_file()


def test_a_folder_or_file_of_someone_elses_is_refused_without_reading_it(tmp_path, monkeypatch, capsys):
    """Was: before refusing an existing folder, every file under it was read into memory (`python -m dpo.tiny .` in
    the repository: all of .venv and .git), with the fresh copy built beside it (`/` : in /)."""
    import pathlib

    user = tmp_path / "user"
    (user / "deep").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "deep" / "data.bin").write_bytes(b"x" * 1000)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"mine": 1}\n')
    read = pathlib.Path.read_bytes

    def guarded(self):
        assert tmp_path not in self.parents, f"read {self}"
        return read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", guarded)
    line = one_line_error(main, [user], capsys)
    assert f"output_dir {user} is not empty" in line, line
    line = one_line_error(main, [tmp_path / "new", "--truthy_rows", rows], capsys)
    assert f"--truthy_rows {rows} already exists" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "user"]  # nothing built beside them


def test_nothing_is_written_inside_a_finished_runs_folder(tmp_path, capsys):
    """Was: `python -m dpo.tiny run/tiny` and `--truthy_rows run/rows.jsonl` wrote into a finished run's folder."""
    from dpo.errors import UserError
    from dpo.offline.pip_models import materialize

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_complete.json").write_text("{}")
    line = one_line_error(main, [run / "tiny"], capsys)
    assert f"output_dir {run / 'tiny'} lies inside {run}" in line, line
    line = one_line_error(main, [tmp_path / "tiny", "--truthy_rows", run / "rows.jsonl"], capsys)
    assert f"--truthy_rows {run / 'rows.jsonl'} lies inside {run}" in line, line
    with pytest.raises(UserError, match=f"the model folder {run / 'smol'} lies inside {run}"):
        materialize("smollm2-135m-instruct", run / "smol")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and sorted(p.name for p in run.iterdir()) == [
        "run_complete.json"
    ]
