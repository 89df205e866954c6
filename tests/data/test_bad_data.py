"""Data files as users have them, broken in the ways they break: non-UTF-8 bytes, a bad file in a
folder, CSV cells that pandas would read as missing, chat roles in the wrong case, empty prompts.
Each goes through the real entry points (`python -m dpo.doctor`, the recipes) and stops with one
`error:` line naming the file, its own row and, for bytes, the offset, or drops and counts the row.
docs/reliability.md lists these cases."""

import gzip
import json
import shutil

import pytest
from helpers import load_recipe, one_line_error, pku_rows

from dpo.data import doctor

ROW = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def doctor_error(argv, capsys) -> str:
    """`python -m dpo.doctor ...` in-process: exit 2 and exactly one `error:` line on stderr."""
    return one_line_error(doctor.main, argv, capsys)


# ── bytes that are not UTF-8 ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json", "jsonl.gz"])
def test_non_utf8_bytes_name_file_row_and_byte_offset(suffix, tmp_path, capsys):
    good = json.dumps(ROW).encode()
    latin1 = json.dumps({**ROW, "prompt": "PLACEHOLDER"}).encode().replace(b"PLACEHOLDER", b"caf\xe9 au lait?")
    if suffix.startswith("jsonl"):  # a blank line: row 2 is on line 3
        content = good + b"\n\n" + latin1 + b"\n"
        expected = "row 2 (line 3)"
    elif suffix == "csv":
        content = b"prompt,chosen,rejected\nq1,a,b\ncaf\xe9 au lait?,a,b\n"
        expected = "row 2 (line 3)"
    else:
        content = b"[" + good + b",\n" + latin1 + b"]\n"
        expected = "line 2"
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    offset = content.index(b"\xe9")  # in the uncompressed bytes, as the message says
    line = doctor_error([path], capsys)
    assert str(path) in line and expected in line and f"byte offset {offset}" in line, line
    assert "0xe9" in line and "UTF-8" in line


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_lone_surrogate_names_its_1_based_row_and_field(suffix, tmp_path, capsys):
    """`"\\ud800"` is valid JSON text but no character: pyarrow refused it "in row 4" (0-based) with a second,
    logged line. Now: one line naming row 5 (of 6), its line, and the field."""
    lines = [json.dumps({**ROW, "prompt": f"q{i}"}) for i in range(6)]
    lines[4] = lines[4].replace('"q4"', '"q4 \\ud800"')
    path = tmp_path / f"surrogate.{suffix}"
    path.write_text("\n\n".join(lines) + "\n" if suffix == "jsonl" else "[" + ",\n".join(lines) + "]")
    line = doctor_error([path], capsys)
    where = "row 5 (line 9)" if suffix == "jsonl" else "row 5"
    assert f"{path}, {where}, field 'prompt': the escape \\ud800" in line and "row 4" not in line, line
    path.write_text(path.read_text().replace("\\ud800", "\\ud83d\\ude00"))  # a whole pair, as json.dumps writes 😀
    assert doctor.main([str(path)]).kept["prompt"][4][-1]["content"] == "q4 \U0001f600"


def test_a_read_error_never_shows_pyarrows_0_based_row(tmp_path, capsys, monkeypatch):
    """When the file's own check cannot say where (here forced), the reader's reason is shown without pyarrow's
    "in row N" (0-based, counted within a block of the file) and without the reader's logged copy of it."""
    from dpo.data import loading

    monkeypatch.setattr(loading, "json_problem", lambda path: None)
    lines = [json.dumps({**ROW, "prompt": f"q{i}"}) for i in range(6)]
    lines[4] = lines[4].replace('"q4"', '"q4 \\ud800"')
    path = tmp_path / "surrogate.jsonl"
    path.write_text("\n".join(lines) + "\n")
    line = doctor_error([path], capsys)
    assert str(path) in line and "surrogate" in line and " row " not in line, line


# ── folders of data files ──────────────────────────────────────────────────────────────────────


def test_malformed_file_inside_a_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [ROW, ROW])
    (folder / "part-1.jsonl").write_text(json.dumps(ROW) + "\n" + '{"prompt": "q", "chosen": "a"\n')
    line = doctor_error([folder], capsys)
    assert str(folder / "part-1.jsonl") in line and "line 2" in line and "malformed JSON" in line, line


def test_row_error_inside_a_folder_names_the_file_and_its_own_row(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [ROW, ROW, ROW])
    write_jsonl(folder / "part-1.jsonl", [ROW, {**ROW, "rejected": None}])  # row 5 of the folder, row 2 of its file
    line = doctor_error([folder], capsys)
    assert f"{folder / 'part-1.jsonl'}, row 2, field 'rejected'" in line, line


def test_a_folder_still_loads_by_split(tmp_path):
    """Files named train*/test* are splits, as datasets reads a folder; each keeps its rows."""
    from dpo.data.loading import load_preference_data

    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [ROW] * 3)
    write_jsonl(folder / "test.jsonl", [{**ROW, "prompt": "held out"}])
    assert len(load_preference_data(str(folder), split="train")) == 3
    test = load_preference_data(str(folder), split="test")
    assert test["prompt"] == ["held out"]
    assert load_preference_data(str(folder), split="validation", missing_ok=True) is None


# ── CSV cells that look like "missing" ─────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "lines, chosen, rejected",
    [
        (['Say none,None,"nothing"', "Country code of Namibia?,NA,null"], ["None", "NA"], ["nothing", "null"]),
        (["What is 2+2?,4,5", "ZIP code of Boston?,02134,2134"], ["4", "02134"], ["5", "2134"]),  # not int, not 2134.0
    ],
    ids=["none_na_null", "numbers"],
)
def test_csv_cells_are_read_as_the_text_they_are(lines, chosen, rejected, tmp_path, capsys):
    from dpo.data.loading import load_preference_data

    path = tmp_path / "cells.csv"
    path.write_text("prompt,chosen,rejected\n" + "\n".join(lines) + "\n")
    data = load_preference_data(str(path))
    assert data["chosen"] == chosen and data["rejected"] == rejected
    report = doctor.main([str(path)])
    assert report.rows_kept == 2 and report.rows_dropped == 0
    assert [c[0]["content"] for c in report.kept["chosen"]] == chosen


def test_a_csv_header_naming_a_column_twice_is_one_line(tmp_path, capsys):
    """Was: one of the two `chosen` columns silently dropped (the loader's features are a mapping by name)."""
    path = tmp_path / "dup.csv"
    path.write_text("prompt,chosen,rejected,chosen\nq,a,b,c\nq2,a2,b2,c2\n")
    line = one_line_error(doctor.main, [path], capsys)
    assert f"{path}, header: 'chosen' (columns 2, 4) named twice" in line, line


@pytest.mark.parametrize("suffix", ["csv", "csv.gz", "jsonl", "json"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(suffix, tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a byte-order mark (was: Field "\ufeffprompt" does not exist). With an emoji,
    which json.dumps writes as a surrogate pair escape (was: "Unexpected UTF-8 BOM" from the escape re-check)."""
    rows = [{**ROW, "prompt": f"q{i}", "chosen": f"a{i} \U0001f600"} for i in range(3)]
    if suffix.startswith("csv"):
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    else:
        text = json.dumps(rows) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    content = "\ufeff".encode() + text.encode()
    path = tmp_path / f"bom.{suffix}"
    path.write_bytes(gzip.compress(content) if suffix.endswith(".gz") else content)
    report = doctor.main([str(path)])
    assert report.rows_kept == 3
    assert [p[-1]["content"] for p in report.kept["prompt"]] == ["q0", "q1", "q2"]
    assert report.kept["chosen"][1][-1]["content"] == "a1 \U0001f600"


def test_csv_empty_cell_is_still_missing(tmp_path, capsys):
    path = tmp_path / "hole.csv"
    path.write_text("prompt,chosen,rejected\nq1,a,b\nq2,,b\n")
    line = doctor_error([path], capsys)
    assert f"{path}, row 2, field 'chosen': missing" in line, line


# ── conversational rows ────────────────────────────────────────────────────────────────────────


def chat(user, answer, user_role="user", assistant_role="assistant"):
    return [{"role": user_role, "content": user}, {"role": assistant_role, "content": answer}]


@pytest.mark.parametrize(
    "chosen, expected",
    [
        (chat("hi", "hello", user_role="User"), "role 'User'"),
        (chat("hi", "hello", assistant_role="Assistant"), "role 'Assistant'"),
        (chat("hi", "hello", user_role="human"), "role 'human'"),
    ],
    ids=["capitalised_user", "capitalised_assistant", "sharegpt_human"],
)
def test_unknown_or_capitalised_role_is_named(chosen, expected, tmp_path, capsys):
    rows = [{"chosen": chat("hi", "hello"), "rejected": chat("hi", "bye")}] * 2
    rows = [*rows, {"chosen": chosen, "rejected": chat("hi", "bye")}]
    path = write_jsonl(tmp_path / "roles.jsonl", rows)
    line = doctor_error([path], capsys)
    assert f"{path}, row 3, field 'chosen', message" in line and expected in line, line
    assert "user" in line and "assistant" in line  # the roles that are accepted
    assert "share no prompt" not in line


def _system(text):
    return {"role": "system", "content": text}


@pytest.mark.parametrize(
    "row, field, message",
    [
        (  # trl-lib style: whole conversations, the system turn between two exchanges
            {
                "chosen": chat("hi", "hello") + [_system("late system")] + chat("again?", "yes"),
                "rejected": chat("hi", "hello") + [_system("late system")] + chat("again?", "no"),
            },
            "chosen",
            3,
        ),
        (  # a prompt column, then an answer list that opens with a system turn
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [_system("late system"), {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            1,
        ),
        (  # the prompt column itself
            {
                "prompt": [{"role": "user", "content": "hi"}, _system("late system")],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            2,
        ),
    ],
    ids=["mid_conversation", "opening_an_answer", "in_the_prompt"],
)
def test_a_system_turn_that_is_not_first_is_refused_with_its_row(row, field, message, tmp_path, capsys):
    """Was: rendered "...again?late system" by the plain template (pasted into the user's turn) and trained."""
    first = {
        k: ([_system("first is fine")] + v if k == ("prompt" if "prompt" in row else "chosen") else v)
        for k, v in row.items()
    }
    if "prompt" not in row:  # the first system turn opens both conversations
        first["rejected"] = [_system("first is fine")] + row["rejected"]
    first = {k: [m for m in v if m["content"] != "late system"] for k, v in first.items()}
    path = write_jsonl(tmp_path / "system.jsonl", [first, first, row])
    line = doctor_error([path], capsys)
    assert f"{path}, row 3, field '{field}', message {message}: a system turn after the conversation started" in line


@pytest.mark.parametrize("blank", ["", "   \n\t"])
def test_empty_prompt_is_dropped_and_counted(blank, tmp_path, capsys):
    def answer(text):
        return [{"role": "assistant", "content": text}]

    implicit = [  # the prompt is the turns chosen and rejected share
        {"chosen": chat("hi", "hello"), "rejected": chat("hi", "bye")},
        {"chosen": chat(blank, "hello"), "rejected": chat(blank, "bye")},
    ]
    explicit = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": answer("a"), "rejected": answer("b")},
        {"prompt": [{"role": "user", "content": blank}], "chosen": answer("a"), "rejected": answer("b")},
    ]
    text = [ROW, {**ROW, "prompt": blank, "chosen": "other"}]
    for name, rows in (("implicit", implicit), ("explicit", explicit), ("text", text)):
        report = doctor.main([str(write_jsonl(tmp_path / f"{name}.jsonl", rows))])
        assert report.rows_kept == 1 and report.drops == [(2, "empty prompt")], name
        assert "1 empty prompt" in capsys.readouterr().err  # the drop warning counts it


# ── the phi-2 recipe suggests only its own options ──────────────────────────────────────────────

# Options that other entry points have (dpo_any.py's ScriptArguments, the doctor's flags) and dpo_phi2.py lacks.
NOT_PHI2_OPTIONS = (
    "prompt_column",
    "chosen_column",
    "rejected_column",
    "system_column",
    "label_column",
    "score_columns",
    "prompt_format",
    "degenerate_rows",
    "dataset_test_split",
    "fail_on_degenerate",
    "text_format",
)


@pytest.mark.parametrize(
    "rows",
    [
        [{"question": "q", "good": "a", "bad": "b"}] * 3,  # other column names
        [{"prompt": "q", "chosen": "a"}] * 3,  # no rejected
        [{"chosen": "a", "rejected": "b"}] * 3,  # no prompt, not a transcript
        [{"chosen": chat("q", "a"), "rejected": chat("q", "b")}] * 3,  # conversational
        [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3,  # every row dropped: the doctor's table
        pku_rows(3),  # two label columns: which one?
        [{"prompt": "q", "response_a": "a", "response_b": "b"}] * 3,  # two responses, nothing says which is better
    ],
    ids=["other_columns", "no_rejected", "no_prompt", "conversational", "all_degenerate", "two_labels", "no_label"],
)
def test_phi2_errors_never_suggest_options_it_lacks(rows, tiny_model_dir, tmp_path, capsys):
    recipe = load_recipe("dpo_phi2")
    fields = {f for cls in (recipe.ScriptArguments,) for f in cls.__dataclass_fields__}
    assert not fields & set(NOT_PHI2_OPTIONS)  # the premise: phi2 really lacks them
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(path), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    message = err[err.index("error: ") :]
    assert not [o for o in NOT_PHI2_OPTIONS if o in message], message


# ── the doctor's own command line ─────────────────────────────────────────────────────────────


def test_doctor_parse_error_is_one_line_naming_flag_and_accepted_values(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", [ROW])
    line = doctor_error([path, "--prompt_format", "html"], capsys)
    assert "--prompt_format" in line and "'html'" in line and "chat" in line and "text" in line, line
    line = doctor_error([path, "--max_length", "long"], capsys)
    assert "--max_length" in line and "a whole number" in line, line


# ── damaged compressed files ──────────────────────────────────────────────────────────────────


def _jsonl_bytes(n: int) -> bytes:
    return "".join(json.dumps({**ROW, "prompt": f"What is {i}+2?"}) + "\n" for i in range(n)).encode()


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path, capsys):
    whole = gzip.compress(_jsonl_bytes(200))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])  # a download stopped halfway
    line = doctor_error([path], capsys)
    assert str(path) in line and "cut short" in line, line


def test_plain_text_named_gz_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(_jsonl_bytes(3))  # never compressed, only renamed
    line = doctor_error([path], capsys)
    assert str(path) in line and "not a valid .gz file" in line and "rename it to plain.jsonl" in line, line


def test_truncated_zstd_is_refused_not_read_in_part(tmp_path, capsys):
    """zstandard's stream reader returns the part before the cut without an error: a silent loss of rows."""
    import zstandard

    whole = zstandard.ZstdCompressor().compress(_jsonl_bytes(5000))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    line = doctor_error([path], capsys)
    assert str(path) in line and "cut short" in line, line


# ── folders given as relative paths, and of mixed file types ──────────────────────────────────


@pytest.mark.parametrize("entry", ["doctor", "dpo_any", "dpo_phi2", "sft_phi2"])
def test_a_relative_folder_path_loads_in_the_doctor_and_every_recipe(
    entry, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The folder is read (its second file's bad row is found and named by the relative path), and
    Path.relative_to no longer fails on a relative folder against the absolute paths datasets lists."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "mydir"
    folder.mkdir(parents=True)
    write_jsonl(folder / "part-0.jsonl", [ROW, ROW])
    write_jsonl(folder / "part-1.jsonl", [ROW, {**ROW, "chosen": None}])
    if entry == "doctor":
        main, argv = doctor.main, ["data/mydir"]
    else:
        main = load_recipe(entry).main
        argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", "data/mydir", "--output_dir", "out"]
    line = one_line_error(main, argv, capsys)
    assert "data/mydir/part-1.jsonl, row 2, field 'chosen': missing" in line, line


def test_a_folder_of_jsonl_csv_and_parquet_with_the_same_columns_is_read_as_one(tmp_path, capsys):
    """Arrow has two text types: .jsonl is read as string, a .csv (pandas 3) and a parquet file written
    by polars or pyarrow's large types as large_string. The same text columns either way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [ROW, {**ROW, "prompt": "What is 3+3?", "chosen": "6"}])
    (folder / "part-1.csv").write_text("prompt,chosen,rejected\nWhat is 4+4?,8,9\n")
    wide = pa.table({k: pa.array([v], pa.large_string()) for k, v in {**ROW, "prompt": "What is 5+5?"}.items()})
    pq.write_table(wide, folder / "part-2.parquet")
    report = doctor.main([str(folder)])
    assert report.rows_in == 4 and report.rows_kept == 4
    assert report.kept["chosen"][2] == [{"role": "assistant", "content": "8"}]


def test_a_folder_of_files_whose_columns_really_differ_is_still_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [ROW])
    write_jsonl(folder / "part-1.jsonl", [{**ROW, "chosen": 4}])
    line = doctor_error([folder], capsys)
    assert "columns ['chosen'] differ" in line, line


@pytest.mark.parametrize("tokenizer", [False, True], ids=["characters", "tokens"])
def test_doctor_refuses_max_length_below_one_as_a_setting(tokenizer, tiny_model_dir, truthy_file, capsys):
    """As the recipes do: a bad setting, not "every row was dropped" (with a tokenizer) or a pass (without)."""
    argv = [truthy_file, "--max_length", "0", *(["--model_name_or_path", tiny_model_dir] if tokenizer else [])]
    line = one_line_error(doctor.main, argv, capsys)
    assert "max_length must be >= 1, or null for unset (no limit); got 0" in line, line


# ── the doctor's --histogram target ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("target", ["txt", "under_a_file", "a_folder", "not_writable"])
def test_doctor_refuses_a_histogram_target_it_cannot_write_before_any_work(target, tmp_path, capsys, monkeypatch):
    """Was: a matplotlib traceback (`Format 'txt' is not supported`, `FileExistsError`) after the whole check."""
    import os

    data = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    locked = tmp_path / "locked"
    locked.mkdir()
    name = {
        "txt": tmp_path / "x.txt",
        "under_a_file": data / "h.png",
        "a_folder": tmp_path / "folder.png",
        "not_writable": locked / "h.png",
    }[target]
    (tmp_path / "folder.png").mkdir()
    if target == "not_writable":
        locked.chmod(0o500)
        if os.access(locked, os.W_OK):  # root writes anywhere
            pytest.skip("running as root: every folder is writable")

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the --histogram target was checked")

    monkeypatch.setattr(doctor, "load_preference_data", no_work)
    line = doctor_error([data, "--histogram", name], capsys)
    assert f"--histogram {name}" in line, line


def test_doctor_reports_the_histogram_file_it_wrote(tmp_path, capsys):
    """`--histogram out` writes out.png and says so (it said `out`); a new folder is made."""
    data = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    doctor.main([str(data), "--histogram", str(tmp_path / "new" / "out")])
    written = tmp_path / "new" / "out.png"
    assert f"length histogram written to {written}\n" in capsys.readouterr().out
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ── a data folder holding a training run ───────────────────────────────────────────────────────


def test_a_run_folder_inside_a_data_folder_is_not_read_as_data(tmp_path, capsys):
    """A run's output_dir saved beside the data (was "no data files": `training_args.bin` matched the datasets
    library's `training*` split pattern, `eval/` its test split, and trainer_state.json, heldout_pairs.jsonl,
    eval/generations.jsonl would be read as data). The data files are read, the run's files are not; the data's
    own train / test files still split."""
    folder = tmp_path / "data"
    run = folder / "outputs" / "dpo_run"
    for sub in ("checkpoint-2", "eval"):
        (run / sub).mkdir(parents=True)
    write_jsonl(folder / "pairs.jsonl", [{**ROW, "prompt": f"q{i}"} for i in range(3)])
    for f in (run / "training_args.bin", run / "checkpoint-2" / "training_args.bin"):
        f.write_bytes(b"\x80\x04pickle")
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_jsonl(run / "heldout_pairs.jsonl", [{**ROW, "prompt": "held out"}])
    write_jsonl(run / "eval" / "generations.jsonl", [{"prompt": "p", "policy": "x"}])
    report = doctor.main([str(folder)])
    assert report.rows_in == 3 and [p[-1]["content"] for p in report.kept["prompt"]] == ["q0", "q1", "q2"]

    from dpo.data.loading import load_preference_data

    (folder / "pairs.jsonl").rename(folder / "train.jsonl")
    write_jsonl(folder / "test.jsonl", [{**ROW, "prompt": "test row"}])
    assert load_preference_data(str(folder))["prompt"] == ["q0", "q1", "q2"]
    assert load_preference_data(str(folder), split="test")["prompt"] == ["test row"]
    (folder / "train.jsonl").unlink()
    (folder / "test.jsonl").unlink()
    line = doctor_error([folder], capsys)  # only the run's files are left
    assert "no data files in this folder" in line and "run artifacts" in line, line


# ── a folder written by save_to_disk (dpo/data/loading.py `_load_saved`) ───────────────────────
def _saved(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{**ROW, "prompt": f"What is {i}+2?"} for i in range(200)]
    folder = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list(rows)).save_to_disk(folder)
    return folder, folder / "train"


@pytest.mark.parametrize("damage", ["shard_cut_short", "shard_missing", "state_not_json", "shard_outside"])
def test_a_damaged_save_to_disk_folder_is_one_line(damage, tmp_path, capsys):
    folder, split = _saved(tmp_path)
    (shard,) = split.glob("*.arrow")
    state = json.loads((split / "state.json").read_text())
    if damage == "shard_cut_short":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        expected = f"{folder}: a save_to_disk dataset folder that cannot be read ("
    elif damage == "shard_missing":
        shard.unlink()
        expected = f"{folder}: a save_to_disk dataset folder that cannot be read ("
    elif damage == "state_not_json":
        (split / "state.json").write_text("{bad")
        expected = f"{split / 'state.json'} is not valid JSON (line 1, column 2"
    else:  # state.json naming an arrow file elsewhere: never read
        elsewhere = tmp_path / "elsewhere.arrow"
        shutil.copy(shard, elsewhere)
        state["_data_files"][0]["filename"] = str(elsewhere)
        (split / "state.json").write_text(json.dumps(state))
        expected = f"{split / 'state.json'} lists {str(elsewhere)!r}, which resolves to"
    line = doctor_error([folder], capsys)
    assert expected in line, line
