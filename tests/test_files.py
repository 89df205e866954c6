"""dpo/files.py: names read from a folder's own files stay inside it, and a folder replaced whole replaces a link,
never what the link points to."""

import pytest

from dpo.errors import UserError
from dpo.files import confined, remove_entry
from dpo.folders import write_marked_folder


def test_confined_allows_names_inside_and_refuses_every_way_out(tmp_path):
    folder, outside = tmp_path / "run", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "inner-link").symlink_to(folder / "sub")
    (folder / "out-link").symlink_to(outside)
    for entry in ("adapter_model.safetensors", "sub/x.json", "inner-link", "sub/../y"):
        assert confined(folder, entry, "marker.json") == folder / entry
    for entry in (str(outside), "../outside", "out-link", "out-link/x", ".", "sub/..", "", 3, None):
        with pytest.raises(UserError, match=r"marker\.json lists"):
            confined(folder, entry, "marker.json")


def test_removing_an_entry_that_is_a_link_removes_the_link_only(tmp_path):
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.txt").write_text("mine")
    (folder / "link").symlink_to(folder / "sub", target_is_directory=True)
    remove_entry(folder, "link", "marker.json")
    assert not (folder / "link").exists() and (folder / "sub" / "keep.txt").read_text() == "mine"


def test_a_marked_folder_replaces_a_link_not_its_target(tmp_path):
    """`python -m dpo.export --merged LINK` (a link to an empty folder) or an eval/ that is a link: the new folder
    takes the link's place (rmtree on the link was a traceback); the folder it pointed to is left alone."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    link = tmp_path / "eval"
    link.symlink_to(elsewhere, target_is_directory=True)
    write_marked_folder(link, lambda folder: (folder / "report.md").write_text("new"), "evaluation")
    assert not link.is_symlink() and (link / "report.md").read_text() == "new"
    assert (elsewhere / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "recorded, said",
    [
        ("", "no usable recorded sha256 (empty)"),  # an emptied record printed "has sha256 1a2b..., ... was recorded"
        ("0123abcd", "no usable recorded sha256 ('0123abcd', 8 characters, not 64 hex digits)"),  # cut short
        ("0" * 64, "has sha256 "),  # a sha256, of other bytes
    ],
)
def test_a_recorded_sha256_that_is_none_is_said_as_such(tmp_path, recorded, said):
    from dpo.files import file_sha256, sha256_mismatch

    path = tmp_path / "f.bin"
    path.write_bytes(b"weights")
    assert said in sha256_mismatch(path, recorded)
    assert sha256_mismatch(path, file_sha256(path)) is None


def test_a_folder_written_whole_gets_the_users_default_permissions(tmp_path):
    """Exported safetensors were 0600 in a 0700 folder (safetensors' private temporary file, mkdtemp's folder):
    a model server running as another user could not read them. Files and folders now get what `open` and
    `mkdir` give under the umask; the weights are written by safetensors itself, as an export writes them."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    def write(folder):
        (folder / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))

    old = os.umask(0o022)
    try:
        target = write_marked_folder(tmp_path / "merged", write, "merged model")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
    assert modes == {"merged": 0o755, "sub": 0o755, "model.safetensors": 0o644, ".dpo-folder.json": 0o644}


def test_a_file_replaced_atomically_is_old_or_new_never_cut(tmp_path):
    """dpo.files.replace_atomically: a write that fails half way (a kill, a full disk) leaves the old file whole
    and no temporary file; one that succeeds leaves the new one whole."""
    import errno
    import os

    from dpo.files import replace_atomically, write_text_atomic

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("old, whole\n")

    def cut_short(tmp):
        tmp.write_text("new, cut sh")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically(path, cut_short)
    assert path.read_text() == "old, whole\n" and os.listdir(tmp_path) == ["BENCHMARKS.md"]
    assert write_text_atomic(path, "new, whole\n") == path and path.read_text() == "new, whole\n"
    assert os.listdir(tmp_path) == ["BENCHMARKS.md"]
