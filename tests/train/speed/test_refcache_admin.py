"""dpo/train/speed/refcache_admin.py (`python -m dpo.cache`): the reference cache is listed and cleared,
deleting only key folders inside the cache folder, never through a link.

The caches are written by refcache.py's own Store (part files) and in cache_key's key.json shape, plus
files and keys another version may add (checksums beside parts, new key.json fields)."""

import json
import os
import time

import pytest
from helpers import one_line_error

from dpo.folders import MARKER
from dpo.train.speed.refcache import Store
from dpo.train.speed.refcache_admin import DAY, main
from dpo.train.speed.refstore import key_of, write_key

KEYS = ("0123456789abcdef01234567", "89abcdef0123456789abcdef")


def make_cache(root, key, rows, days_ago=0.0, layers=2):
    folder = root / key
    folder.mkdir(parents=True)
    parts = {
        "weights": "09a3362f" + "0" * 56,
        "config": {"architectures": ["PhiForCausalLM"], "num_hidden_layers": layers, "hidden_size": 64},
        "quantization_config": {"load_in_4bit": True},
        "dtype": "torch.float32",
        "max_length": 256,
        "a_field_a_later_version_adds": [1, 2],
    }
    write_key(folder, parts)  # key.json, then the cache's marker naming this key, as a run writes them
    rows_n = len(rows)  # the store writes each part with its .sha256 beside it
    Store(folder).write(rows, [-1.0] * rows_n, [-2.0] * rows_n, [0.1] * rows_n, {"device": "cpu"}, expected=rows_n)
    when = time.time() - days_ago * DAY
    os.utime(folder / "key.json", (when, when))  # key.json is rewritten by each run that uses the key
    return folder


def run(argv, capsys):
    entries = main([str(a) for a in argv])
    return entries, capsys.readouterr().out


def test_lists_size_model_pairs_data_fingerprint_and_last_use(tmp_path, capsys):
    make_cache(tmp_path, KEYS[0], ["r1", "r2", "r3"], days_ago=3)
    make_cache(tmp_path, KEYS[1], ["r3", "r2", "r1"], layers=4)  # the same pairs, another model
    (tmp_path / "notes.txt").write_text("not a cache")
    entries, out = run(["--cache_dir", tmp_path], capsys)
    by_key = {e.key: e for e in entries}
    assert sorted(by_key) == sorted(KEYS)
    assert by_key[KEYS[0]].pairs == 3 and by_key[KEYS[0]].fingerprint == by_key[KEYS[1]].fingerprint
    assert by_key[KEYS[0]].size == sum(p.stat().st_size for p in (tmp_path / KEYS[0]).iterdir())
    # the time make_cache set, exactly (was within 60 s of now minus 3 days: a bound on how long this test took)
    assert by_key[KEYS[0]].last_use == (tmp_path / KEYS[0] / "key.json").stat().st_mtime
    assert "PhiForCausalLM, 2 layers x 64, float32, 4-bit, max_length 256" in by_key[KEYS[0]].model
    assert f"2 reference cache(s) in {tmp_path}" in out and KEYS[0] in out and "notes.txt" not in out
    assert out.index(KEYS[1]) < out.index(KEYS[0])  # most recently used first


def test_removes_one_by_key_prefix_and_those_unused_for_n_days(tmp_path, capsys):
    make_cache(tmp_path, KEYS[0], ["a"], days_ago=40)
    make_cache(tmp_path, KEYS[1], ["b"], days_ago=1)
    entries, out = run(["--cache_dir", tmp_path, "remove", "--unused_days", 30], capsys)
    assert [e.key for e in entries] == [KEYS[1]] and not (tmp_path / KEYS[0]).exists()
    assert "removed 1 reference cache(s)" in out
    entries, _ = run(["--cache_dir", tmp_path, "remove", KEYS[1][:8]], capsys)
    assert entries == [] and sorted(tmp_path.iterdir()) == []


def test_remove_all_deletes_only_key_folders_and_never_through_links(tmp_path, capsys):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    make_cache(cache, KEYS[0], ["a"])
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (cache / KEYS[1]).symlink_to(outside, target_is_directory=True)  # a link named like a key
    (cache / KEYS[0] / "link-out").symlink_to(outside, target_is_directory=True)  # a link inside a key folder
    (cache / "mine").mkdir()  # not named like a key
    run(["--cache_dir", cache, "remove", "--all"], capsys)
    assert not (cache / KEYS[0]).exists()
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (cache / KEYS[1]).is_symlink() and (cache / "mine").is_dir()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["remove", "fff"], "'fff': no cache in"),
        (["remove", "0"], "'0': 2 caches in"),
        (["remove"], "remove needs exactly one of"),
        (["remove", "--all", "--unused_days", "3"], "remove needs exactly one of"),
        (["remove", "--unused_days=-1"], "unused_days must be >= 0"),
    ],
)
def test_a_wrong_remove_is_one_line_and_removes_nothing(tmp_path, capsys, argv, message):
    make_cache(tmp_path, KEYS[0], ["a"])
    make_cache(tmp_path, "0" + KEYS[1][1:], ["b"])  # two keys starting with 0: "0" is ambiguous
    line = one_line_error(main, ["--cache_dir", tmp_path, *argv], capsys)
    assert message in line, line
    assert len(list(tmp_path.iterdir())) == 2


def test_an_empty_or_missing_cache_folder_says_so(tmp_path, capsys):
    entries, out = run(["--cache_dir", tmp_path / "none"], capsys)
    assert entries == [] and out.startswith(f"no reference caches in {tmp_path / 'none'}")


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_cache_dir_that_is_a_file_or_under_one_is_said_so(tmp_path, capsys, below):
    """Was: "no reference caches in" the file."""
    taken = tmp_path / "pairs.jsonl"
    taken.write_text("keep")
    cache_dir = taken / below if below else taken
    with pytest.raises(SystemExit) as stop:
        main(["--cache_dir", str(cache_dir), "list"])
    err = capsys.readouterr().err
    assert (
        stop.value.code == 2
        and err == f"error: --cache_dir {cache_dir}: {taken} is a file, not a folder; name the cache folder\n"
    )


def test_a_folder_only_named_like_a_key_is_never_removed_nor_listed(tmp_path, capsys):
    """Was: `remove --all` deleted any folder named with 24 hex digits (a user's MongoDB-ObjectId-named folder),
    exit 0. A folder is a cache's only when it holds the cache's marker for its name, or a key.json whose hash is
    its name; one with a marker copied from another key, or a key.json of another key, is not."""
    make_cache(tmp_path, KEYS[0], ["a"])
    user = tmp_path / "5f8d0d55b54764421b7156c3"  # an ObjectId
    user.mkdir()
    (user / "data.bson").write_text("the user's")
    copied = tmp_path / KEYS[1]
    copied.mkdir()
    (copied / MARKER).write_bytes((tmp_path / KEYS[0] / MARKER).read_bytes())  # names KEYS[0], not this folder
    (copied / "key.json").write_text(json.dumps({"weights": "x"}))  # hashes to another key
    entries, out = run(["--cache_dir", tmp_path, "remove", "--all"], capsys)
    assert "removed 1 reference cache(s)" in out and entries == [] and not (tmp_path / KEYS[0]).exists()
    assert (user / "data.bson").read_text() == "the user's" and (copied / "key.json").is_file()
    line = one_line_error(main, ["--cache_dir", tmp_path, "remove", user.name[:10]], capsys)
    assert "no cache in" in line


def test_a_cache_from_before_markers_is_recognised_by_its_key_json(tmp_path, capsys):
    """A key folder whose key.json hashes to its name was written by the cache (the key is that hash)."""
    parts = {"weights": "ab" * 16, "config": {"num_hidden_layers": 2}, "max_length": 64, "trl": "1.16.0"}
    folder = tmp_path / key_of(parts)
    folder.mkdir()
    (folder / "key.json").write_text(json.dumps(parts, indent=2, sort_keys=True))
    entries, _ = run(["--cache_dir", tmp_path], capsys)
    assert [e.key for e in entries] == [folder.name]
    run(["--cache_dir", tmp_path, "remove", "--all"], capsys)
    assert not folder.exists()


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_cache_folder_setting_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, blank):
    """Was: DPO_REFERENCE_CACHE='' made the current folder the cache, and `remove --all` deleted folders there."""
    monkeypatch.chdir(tmp_path)
    make_cache(tmp_path, KEYS[0], ["a"])
    monkeypatch.setenv("DPO_REFERENCE_CACHE", blank)
    line = one_line_error(main, ["remove", "--all"], capsys)
    assert "DPO_REFERENCE_CACHE" in line and "empty path" in line, line
    monkeypatch.delenv("DPO_REFERENCE_CACHE")
    line = one_line_error(main, ["--cache_dir", blank, "remove", "--all"], capsys)
    assert "cache_dir" in line and "empty path" in line, line
    assert (tmp_path / KEYS[0] / "key.json").is_file()


def test_an_unknown_subcommand_is_refused_listing_the_valid_ones(tmp_path, capsys):
    """`python -m dpo.cache clear` said "invalid choice: 'clear'" and not what the choices are."""
    line = one_line_error(main, ["--cache_dir", tmp_path, "clear"], capsys)
    assert "invalid choice: 'clear'; accepted: one of list, remove" in line, line


def test_a_key_named_twice_is_removed_once(tmp_path, capsys):
    """Was: `remove 3f2a 3f2a9c` deleted the folder, then stopped on an AssertionError traceback for the second."""
    make_cache(tmp_path, KEYS[0], ["a"])
    make_cache(tmp_path, KEYS[1], ["b"])
    entries, out = run(["--cache_dir", tmp_path, "remove", KEYS[0][:4], KEYS[0][:10], KEYS[0]], capsys)
    assert [e.key for e in entries] == [KEYS[1]] and not (tmp_path / KEYS[0]).exists()
    assert "removed 1 reference cache(s)" in out
