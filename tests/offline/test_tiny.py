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
