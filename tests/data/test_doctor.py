"""dpo/data/doctor.py and dpo/data/doctor_report.py: every degenerate row is dropped and counted under its reason, no row is lost
silently, token counts are TRL's own, and the command line exits cleanly on bad data."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from datasets import Dataset
from helpers import ROOT, h4_ultrafeedback_rows, hh_rows, one_line_error, orca_rows, trl_ultrafeedback_rows

from dpo.compat import DPOTrainer
from dpo.data.doctor import check_data, main
from dpo.data.doctor_report import DUPLICATE, EMPTY, IDENTICAL, PROMPT_TOO_LONG, SAME_AFTER_CUT, SWAPPED, examine
from dpo.data.formats import ensure_chat_template, phi2_qa_format
from dpo.data.loading import load_preference_data
from dpo.data.pairs import DIVERGE, NO_SHARED_PROMPT, to_pairs
from dpo.errors import UserError
from dpo.offline.tiny import write_jsonl
from dpo.train.model_checks import load_tokenizer


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def trl_tokenized(pairs, tokenizer, max_length):
    """What TRL's DPOTrainer itself makes of `pairs`: its own dataset preparation, run directly."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    data = pairs.select_columns(["prompt", "chosen", "rejected"])
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), data, tokenizer, args, "train")


def bad_hh_rows():
    """Six good HH rows, then one row per drop reason (rows 7..13), the long prompt last."""
    good = hh_rows(6)
    return good + [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # 7 no shared prompt
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: z\n\nAssistant: w",
        },  # 8 differ before the last reply
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},  # 9 empty chosen
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: yo",
            "rejected": "\n\nHuman: hi\n\nAssistant:   ",
        },  # 10 empty rejected
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: same",
            "rejected": "\n\nHuman: hi\n\nAssistant: same ",
        },  # 11 identical
        dict(good[2]),  # 12 duplicate of row 3
        {
            "chosen": "\n\nHuman: " + "word " * 300 + "\n\nAssistant: a",
            "rejected": "\n\nHuman: " + "word " * 300 + "\n\nAssistant: b",
        },  # 13
    ]


EXPECTED_DROPS = [
    (7, NO_SHARED_PROMPT),
    (8, DIVERGE),
    (9, EMPTY),
    (10, EMPTY),
    (11, IDENTICAL),
    (12, DUPLICATE),
    (13, PROMPT_TOO_LONG),
]


@pytest.mark.parametrize("prompt_format", ["chat", "text"])
def test_each_degenerate_class_is_dropped_and_counted_and_no_row_is_lost(tokenizer, prompt_format):
    rows = bad_hh_rows()
    report = check_data(Dataset.from_list(rows), "hh.jsonl", tokenizer, prompt_format=prompt_format, max_length=256)
    assert report.drops == EXPECTED_DROPS
    assert report.kept_rows == [1, 2, 3, 4, 5, 6]
    assert report.rows_in == len(rows) == report.rows_kept + report.rows_dropped
    assert report.dropped == {
        NO_SHARED_PROMPT: 1,
        DIVERGE: 1,
        EMPTY: 2,
        IDENTICAL: 1,
        DUPLICATE: 1,
        PROMPT_TOO_LONG: 1,
    }
    table = report.table()
    assert "rows in        13" in table and "rows kept       6" in table
    assert "2  empty chosen or rejected: row 9, 10" in table
    assert report.warning().startswith("warning: hh.jsonl: dropped 7 of 13 rows")


def test_sft_keeps_rows_whose_rejected_is_empty_or_equal_to_chosen(tokenizer):
    """SFT never reads rejected: rows 10 (empty rejected) and 11 (rejected = chosen) are kept, listed
    as SFT-only; every other drop stays, and rows in = kept + dropped."""
    rows = bad_hh_rows()
    report = check_data(Dataset.from_list(rows), "hh.jsonl", tokenizer, max_length=256, sft=True)
    assert report.drops == [d for d in EXPECTED_DROPS if d[0] not in (10, 11)]
    assert report.kept_rows == [1, 2, 3, 4, 5, 6, 10, 11] and report.sft_only == [10, 11]
    assert report.rows_in == report.rows_kept + report.rows_dropped
    assert "kept for SFT only (rejected empty or equal to chosen; DPO drops them): row 10, 11" in report.table()


def test_sft_recipe_trains_on_identical_pairs_and_holds_out_what_dpo_holds_out(
    tiny_model_dir, truthy_file, tmp_path, monkeypatch
):
    """recipes/sft_phi2.py up to its trainer (captured, nothing trained): the rows with chosen = rejected
    are SFT training rows, and the held-out rows are exactly recipes/dpo_phi2.py's with the same seed."""
    from helpers import load_recipe

    rows = [json.loads(line) for line in truthy_file.read_text().splitlines()]
    for i in (3, 17, 30):
        rows[i]["rejected"] = rows[i]["chosen"]
    data = write_jsonl(rows, tmp_path / "truthy.jsonl")
    seen = {}

    class Captured(Exception):
        pass

    def capture(name):
        def build(model_args, training_args, train, heldout, *rest):
            seen[name] = (train, heldout)
            raise Captured

        return build

    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--test_size", "0.25"]
    for name, builder in (("sft_phi2", "build_sft_trainer"), ("dpo_phi2", "build_dpo_trainer")):
        recipe = load_recipe(name)
        monkeypatch.setattr(recipe, builder, capture(name))
        with pytest.raises(Captured):
            recipe.main([*argv, "--output_dir", str(tmp_path / name)])
    (sft_train, sft_heldout), (dpo_train, dpo_heldout) = seen["sft_phi2"], seen["dpo_phi2"]
    identical = {" " + rows[i]["chosen"].strip() for i in (3, 17, 30)}  # phi2_qa_format's answers
    assert identical <= set(sft_train["completion"])
    assert len(sft_train) == len(dpo_train) + 3
    assert sft_heldout["prompt"] == dpo_heldout["prompt"]


def test_fail_instead_of_drop(tokenizer):
    with pytest.raises(UserError, match=r"hh.jsonl: dropped 7 of 13 rows .*Degenerate rows fail this run"):
        check_data(Dataset.from_list(bad_hh_rows()), "hh.jsonl", tokenizer, max_length=256, degenerate_rows="fail")


def test_no_usable_row_is_an_error_that_shows_the_table(tokenizer):
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3
    with pytest.raises(UserError, match=r"(?s)no usable pair.*chosen identical to rejected: row 1, 2, 3"):
        check_data(Dataset.from_list(rows), "d.jsonl", tokenizer)


@pytest.mark.parametrize("prompt_format", ["chat", "text"])
def test_token_counts_and_length_drops_are_exactly_trls(tokenizer, prompt_format):
    """The doctor's prompt / chosen / rejected token counts equal those TRL trains on, and after
    the doctor TRL's own 'prompt fills max_length' filter has nothing left to drop silently."""
    ensure_chat_template(tokenizer)
    rows = bad_hh_rows()
    pairs, _ = to_pairs(Dataset.from_list(rows), "hh", prompt_format=prompt_format)
    max_length = 256
    report = examine(pairs, tokenizer, max_length)
    trl_kept = trl_tokenized(report.kept, tokenizer, max_length)
    assert len(trl_kept) == report.rows_kept  # nothing more for TRL to drop
    trl_counts = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trl_kept]
    ours = list(
        zip(report.lengths["prompt"].tolist(), report.lengths["chosen"].tolist(), report.lengths["rejected"].tolist())
    )
    assert ours == trl_counts
    # without the doctor, TRL would drop the long-prompt row, and only that one, silently
    trl_all = trl_tokenized(pairs.select(range(len(rows) - 1, len(rows))), tokenizer, max_length)
    assert len(trl_all) == 0


def test_a_prompt_of_exactly_max_length_is_dropped_as_trl_would(tokenizer):
    pairs, _ = to_pairs(Dataset.from_list(orca_rows(6)), "orca", prompt_format="text")
    prompt_lengths = examine(pairs, tokenizer, max_length=None).lengths["prompt"].tolist()
    limit = max(prompt_lengths)  # the longest prompts alone fill max_length exactly
    report = examine(pairs, tokenizer, max_length=limit)
    assert (
        report.dropped[PROMPT_TOO_LONG]
        == prompt_lengths.count(limit)
        == 6 - len(trl_tokenized(pairs, tokenizer, limit))
    )
    assert 0 < report.rows_kept < 6


def test_truncated_share_counts_rows_longer_than_max_length(tokenizer):
    ensure_chat_template(tokenizer)
    pairs, _ = to_pairs(Dataset.from_list(h4_ultrafeedback_rows(9)), "uf")
    full = examine(pairs, tokenizer, max_length=None)
    totals = full.lengths["prompt"] + [max(c, r) for c, r in zip(full.lengths["chosen"], full.lengths["rejected"])]
    limit = int(sorted(totals)[4])  # rows longer than the median total are truncated
    report = examine(pairs, tokenizer, max_length=limit)
    assert report.truncated == sum(int(t) > limit for t in totals) > 0
    assert f"truncated by max_length={limit}: {report.truncated} of 9 rows" in report.table()
    assert "nothing is truncated" in full.table()


def test_lengths_without_a_tokenizer_are_characters_and_drop_nothing_for_length():
    rows = bad_hh_rows()
    report = check_data(Dataset.from_list(rows), "hh", None, max_length=8)
    assert report.unit == "characters" and PROMPT_TOO_LONG not in report.dropped
    assert report.kept_rows == [1, 2, 3, 4, 5, 6, 13]
    q_len = len(rows[0]["chosen"].rsplit("\n\nAssistant:", 1)[0]) + len("\n\nAssistant:")
    assert report.lengths["prompt"][0] == q_len  # prompt rendered by the plain template = HH text


def test_conversational_rows_with_a_chat_template_failure_name_the_row(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    rows = orca_rows(4)  # rows 2 and 4 have a system text
    with pytest.raises(UserError, match="orca, row 2: the chat template failed on this row: no system role"):
        check_data(Dataset.from_list(rows), "orca", tokenizer)


# ── command line ─────────────────────────────────────────────────────────────────────────


def test_cli_prints_the_table_and_writes_a_histogram(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(trl_ultrafeedback_rows(12) + trl_ultrafeedback_rows(2), tmp_path / "uf.jsonl")  # 2 duplicates
    png = tmp_path / "lengths.png"
    report = main(
        [str(data), "--model_name_or_path", str(tiny_model_dir), "--max_length", "512", "--histogram", str(png)]
    )
    out, err = capsys.readouterr()
    assert out.startswith(f"data doctor: {data}")
    assert "dropped         2  duplicate of an earlier row: row 13, 14" in out
    assert "truncated by max_length=512" in out and "first pair as the model sees it" in out
    assert "dropped 2 of 14 rows" in err
    assert report.rows_kept == 12
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main([str(data), "--model_name_or_path", str(tiny_model_dir), "--histogram", str(png)])  # its own: replaced
    assert "length histogram written to" in capsys.readouterr().out


def test_the_histogram_never_replaces_a_file_it_did_not_write_nor_names_a_folder(tmp_path, capsys):
    """Was: --histogram over a user's file replaced it; `.` was a ValueError traceback; `folder/` wrote folder.png
    beside the folder."""
    data = write_jsonl(trl_ultrafeedback_rows(4), tmp_path / "uf.jsonl")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n not made by the doctor")
    (tmp_path / "userdir").mkdir()
    for name, said in (
        (mine, "exists and is not a figure these tools wrote"),
        (".", "a folder"),
        (f"{tmp_path / 'userdir'}/", "a folder"),
        (tmp_path / "userdir", "a folder"),
    ):
        line = one_line_error(main, [str(data), "--histogram", str(name)], capsys)
        assert f"--histogram {name}: " in line and said in line, line
    assert mine.read_bytes().endswith(b"not made by the doctor") and not (tmp_path / "userdir.png").exists()


def _stats_line(table: str, part: str) -> str:
    return next(line for line in table.splitlines() if line.split()[:1] == [part])


def test_cli_text_format_phi2_counts_what_the_phi2_recipe_trains_on(truthy_file, tiny_model_dir, capsys):
    """`--prompt_format text --text_format phi2` formats rows as recipes/dpo_phi2.py does (its
    check_data call, repeated here), so the CLI's token counts are the recipe's."""
    cli = main(
        [
            str(truthy_file),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--prompt_format",
            "text",
            "--text_format",
            "phi2",
        ]
    )
    out = capsys.readouterr().out
    recipe = check_data(
        load_preference_data(str(truthy_file)),
        str(truthy_file),
        load_tokenizer(str(tiny_model_dir)),
        prompt_format="text",
        text_format=phi2_qa_format,
        max_length=1024,
        truncation_mode="keep_start",
    )
    for part in ("prompt", "chosen", "rejected"):
        assert cli.lengths[part].tolist() == recipe.lengths[part].tolist(), part
    assert _stats_line(out, "prompt") == _stats_line(recipe.table(), "prompt")
    assert "prompt: 'Instruct: " in out and "(phi2_qa_format)" in out
    plain = main([str(truthy_file), "--model_name_or_path", str(tiny_model_dir), "--prompt_format", "text"])
    assert (
        plain.lengths["prompt"] < cli.lengths["prompt"]
    ).all()  # the flag changes the counts: "Instruct:", "Output:"


def test_cli_text_format_needs_text_prompt_format(truthy_file, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(truthy_file), "--text_format", "phi2"])
    assert info.value.code == 2 and "add --prompt_format text" in capsys.readouterr().err


def test_cli_column_mapping_and_characters(tmp_path, capsys):
    data = tmp_path / "mine.csv"
    Dataset.from_list([{"query": f"q{i}", "good": "yes", "bad": "no"} for i in range(3)]).to_csv(data, index=False)
    report = main([str(data), "--prompt_column", "query", "--chosen_column", "good", "--rejected_column", "bad"])
    assert report.rows_kept == 3 and "characters" in capsys.readouterr().out


def test_cli_fail_on_degenerate_exits_2(tmp_path, capsys):
    data = write_jsonl(
        [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}],
        tmp_path / "d.jsonl",
    )
    with pytest.raises(SystemExit) as info:
        main([str(data), "--fail_on_degenerate"])
    assert info.value.code == 2 and "1 chosen identical to rejected" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_schema_error_exits_2_with_one_clean_line(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + '\n{"prompt": "q", "chosen": \n')
    proc = subprocess.run(
        [sys.executable, "-m", "dpo.doctor", str(data)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: {data}, line 2: malformed JSON" in proc.stderr


def test_cli_speaks_the_recipes_flag_names(tmp_path, capsys):
    """--dataset_name / --dataset_train_split as in every recipe; --config is a recipe's YAML file, not a doctor flag."""
    from datasets import DatasetDict

    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    DatasetDict({"train": Dataset.from_list(rows[:3]), "test": Dataset.from_list(rows[3:])}).save_to_disk(
        tmp_path / "dd"
    )
    report = main(["--dataset_name", str(tmp_path / "dd"), "--dataset_train_split", "test"])
    assert report.rows_in == 2 and capsys.readouterr().out.startswith(f"data doctor: {tmp_path / 'dd'}")
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "dd"), "--config", "en"])
    assert info.value.code == 2 and "unrecognized arguments: --config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "no dataset" in capsys.readouterr().err


def test_check_data_returns_the_template_it_chose_and_leaves_the_tokenizer_alone(tokenizer, capsys):
    """A tokenizer without a chat template: the rows are rendered with the plain template, which the
    report carries (the recipe trains and saves with it); the caller's tokenizer is not rewritten."""
    from dpo.data.formats import PLAIN_CHAT_TEMPLATE

    tokenizer.chat_template = None
    report = check_data(Dataset.from_list(hh_rows(4)), "hh.jsonl", tokenizer, max_length=256)
    assert report.chat_template == PLAIN_CHAT_TEMPLATE and tokenizer.chat_template is None
    assert "no chat template" in capsys.readouterr().err
    text = check_data(Dataset.from_list(orca_rows(4)), "orca.jsonl", tokenizer, prompt_format="text")
    assert text.chat_template is None  # text rows use no template


# ── pairs that cancel: swapped answers, answers the same once cut to max_length ─────────────────────────


def test_pairs_that_contradict_each_other_are_dropped_both_and_counted(tokenizer):
    """The same prompt with chosen and rejected swapped in another row (was: both kept, the preference cancels).
    Both rows go, and a repeat of either; an unrelated row, and a row with the same prompt and other answers,
    stay. `fail=True` stops on them."""
    good = [{"prompt": f"q{i}", "chosen": "right", "rejected": "wrong"} for i in range(3)]
    rows = [
        *good,
        {"prompt": "q1", "chosen": "wrong", "rejected": "right "},  # row 4: row 2 swapped (spaces as _same ignores)
        {"prompt": "q1", "chosen": "right", "rejected": "wrong"},  # row 5: row 2 again: also contradicted
        {"prompt": "q1", "chosen": "right", "rejected": "other"},  # row 6: same prompt, another pair: kept
    ]
    pairs, _ = to_pairs(Dataset.from_list(rows), "data.jsonl", prompt_format="text")
    report = examine(pairs, tokenizer, max_length=None)
    assert [row for row, why in report.drops if why == SWAPPED] == [2, 4, 5]
    assert report.kept_rows == [1, 3, 6] and report.rows_in == report.rows_kept + report.rows_dropped
    assert f"dropped         3  {SWAPPED}: row 2, 4, 5" in report.table()
    with pytest.raises(UserError, match="contradicted by another row"):
        examine(pairs, tokenizer, max_length=None, fail=True)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_pairs_identical_after_truncation_are_dropped_as_trl_would_train_them(tokenizer, truncation_mode):
    """Answers that differ only beyond max_length (keep_start: at their end; keep_end: at their start) train on the
    same tokens with the same mask (was: "truncated 2 of 3" and a training-time warning). The doctor's verdict
    is checked against TRL's own tokenization and collator; `degenerate_rows: fail` stops on it."""
    from dpo.compat import DataCollatorForPreference

    shared = " ".join(f"step {i} of the method is to keep going" for i in range(40))
    answers = {  # same tokens within the last / first max_length of the sequence
        "keep_start": (shared + " and then stop.", shared + " and never stop."),
        "keep_end": ("Yes: " + shared, "No: " + shared),
    }[truncation_mode]
    rows = [
        {"prompt": "How?", "chosen": answers[0], "rejected": answers[1]},
        {"prompt": "Why?", "chosen": "Because it works.", "rejected": "No idea."},
        {"prompt": "When?", "chosen": shared + " now.", "rejected": "Later " + shared},  # differs in both windows
    ]
    pairs, _ = to_pairs(Dataset.from_list(rows), "data.jsonl", prompt_format="text")
    max_length = 64
    report = examine(pairs, tokenizer, max_length=max_length, truncation_mode=truncation_mode)
    collate = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    batch = collate(list(trl_tokenized(pairs, tokenizer, None)))
    n = len(rows)
    trl_same = [
        bool((batch["input_ids"][i] == batch["input_ids"][n + i]).all())
        and bool((batch["completion_mask"][i] == batch["completion_mask"][n + i]).all())
        for i in range(n)
    ]
    assert trl_same == [True, False, False]
    assert [row for row, why in report.drops if why == SAME_AFTER_CUT] == [1]
    assert report.kept_rows == [2, 3]
    with pytest.raises(UserError, match="identical to rejected after truncation"):
        examine(pairs, tokenizer, max_length=max_length, truncation_mode=truncation_mode, fail=True)


# ── long rows: lengths in windows, a table whose columns never run together ──────────────────────


def test_a_long_row_is_tokenized_in_windows_with_trls_exact_counts(tokenizer, monkeypatch):
    """A 50 MB row took 10 GB in one tokenizer call (about a kilobyte a token). Texts over LONG_TEXT characters
    are tokenized in windows of at most WINDOW characters: here both are made small, and the counts still equal
    TRL's own tokenization of the whole texts, for text and chat pairs."""
    from dpo.data import tokens

    monkeypatch.setattr(tokens, "LONG_TEXT", 600)
    monkeypatch.setattr(tokens, "WINDOW", 300)
    longest = []
    real_call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        longest.append(max(map(len, [text] if isinstance(text, str) else text)))
        return real_call(self, text, *args, **kwargs)

    body = " ".join(f"Line {i}: it's   {i * 7} (café, 東京)\n\nand more" for i in range(120))
    rows = [
        {"prompt": "Explain at length. " + body[:900], "chosen": body, "rejected": body[:1500] + " but shorter."},
        {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."},
    ]
    for prompt_format in ("text", "chat"):
        pairs, _ = to_pairs(Dataset.from_list(rows), "data.jsonl", prompt_format=prompt_format)
        if prompt_format == "chat":
            ensure_chat_template(tokenizer)
        assert tokens._windows_are_exact(tokenizer)  # its one-off check on a sample, outside the spy
        longest.clear()
        monkeypatch.setattr(type(tokenizer), "__call__", spy)
        report = examine(pairs, tokenizer, max_length=None)
        monkeypatch.setattr(type(tokenizer), "__call__", real_call)
        trl = trl_tokenized(pairs, tokenizer, None)
        expected = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trl]
        got = list(zip(*(report.lengths[part].tolist() for part in ("prompt", "chosen", "rejected"))))
        assert got == expected, prompt_format
        assert len(body) > 4 * tokens.WINDOW and max(longest) <= tokens.WINDOW, (prompt_format, max(longest))


def test_the_length_table_keeps_its_columns_apart_at_any_width():
    """p95 17301516 and max 31457282 were printed as `1730151631457282`."""
    import numpy as np

    from dpo.data.doctor_report import DoctorReport

    report = DoctorReport(
        "big.jsonl", 3, Dataset.from_dict({"prompt": ["a"] * 3, "chosen": ["b"] * 3, "rejected": ["c"] * 3})
    )
    big = np.array([21, 17301516, 31457282_000], dtype=np.int64)
    report.lengths = {"prompt": np.array([44, 61, 61]), "chosen": big, "rejected": np.array([18, 18, 18])}
    fields = _stats_line(report.table(), "chosen").split()
    assert fields == ["chosen", "17301516", f"{np.percentile(big, 95):.0f}", "31457282000"], fields
    header = next(line for line in report.table().splitlines() if "median" in line)
    assert header.split() == ["tokens", "median", "p95", "max"]


# ── a held-out split that holds training pairs (dpo/data/doctor.py check_splits) ────────────────────────────
def split_args(dataset: str, output_dir, test_split: str = "test"):
    """The settings check_splits reads, as recipes/dpo_any.py passes them."""
    script = SimpleNamespace(
        dataset_name=str(dataset), dataset_config=None, dataset_train_split="train", dataset_test_split=test_split
    )
    training = SimpleNamespace(output_dir=str(output_dir), max_length=None, truncation_mode="keep_start")
    return script, training


def qa_rows(start: int, n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(start, n)]


def test_held_out_rows_that_are_training_pairs_are_dropped_and_counted(tmp_path, capsys):
    """A test split holding training pairs, as they are or with chosen and rejected swapped (was: kept, so the
    held-out accuracy scored pairs the model trained on, or their reversal). They are dropped and counted in the
    test split's table and its one warning line; new pairs, and a training prompt with other answers, stay."""
    from dpo.data.doctor import check_splits
    from dpo.data.doctor_report import IN_TRAINING, IN_TRAINING_SWAPPED

    folder = tmp_path / "data"
    folder.mkdir()
    train = qa_rows(0, 8)
    write_jsonl(train, folder / "train.jsonl")
    swapped = {"prompt": "question 3", "chosen": "wrong 3 ", "rejected": "right 3"}  # spaces as _same ignores
    other = {"prompt": "question 4", "chosen": "right 4", "rejected": "another"}  # a training prompt, new pair
    test = [*qa_rows(100, 103), dict(train[1]), swapped, other, dict(train[6])]
    write_jsonl(test, folder / "test.jsonl")
    report, heldout = check_splits(*split_args(folder, tmp_path / "out"), None, prompt_format="text")
    assert report.rows_kept == 8
    assert heldout.kept["prompt"] == ["question 100", "question 101", "question 102", "question 4"]
    assert heldout.drops == [(4, IN_TRAINING), (5, IN_TRAINING_SWAPPED), (7, IN_TRAINING)]
    assert heldout.rows_in == heldout.rows_kept + heldout.rows_dropped
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith(f"warning: {folder} [test]")]
    assert warning == [
        f"warning: {folder} [test]: dropped 3 of 7 rows (2 {IN_TRAINING}, 1 {IN_TRAINING_SWAPPED}; first: row 4, 5, 7)"
    ], out


def hub_splits(monkeypatch, splits: dict):
    """load_preference_data answering for a hub dataset 'org/data' with these splits (no Hub here)."""
    import dpo.data.doctor

    def load(name, config, split, missing_ok=False):
        assert name == "org/data"
        return Dataset.from_list(splits[split]) if split in splits else None

    monkeypatch.setattr(dpo.data.doctor, "load_preference_data", load)


@pytest.mark.parametrize("source", ["copied_file", "hub_split", "all_swapped"])
def test_a_held_out_split_of_only_training_pairs_is_one_line(source, tmp_path, monkeypatch):
    """test.jsonl a copy of train.jsonl (was: "64 training pairs, 64 held out", the same rows), a hub dataset
    whose 'validation' split holds the 'train' rows, or a test split of the training pairs all swapped: one line,
    before any model loads, naming the split, the counts and the fix."""
    from dpo.data.doctor import check_splits

    train = qa_rows(0, 6)
    test = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in train]
    if source == "hub_split":
        hub_splits(monkeypatch, {"train": train, "validation": list(reversed(train))})
        dataset, split, counts = "org/data", "validation", "6 the same, 0 with"
    else:
        dataset, split = tmp_path / "data", "test"
        dataset.mkdir()
        write_jsonl(train, dataset / "train.jsonl")
        write_jsonl(train if source == "copied_file" else test, dataset / "test.jsonl")
        counts = "6 the same, 0 with" if source == "copied_file" else "0 the same, 6 with"
    with pytest.raises(UserError) as error:
        check_splits(*split_args(dataset, tmp_path / "out", split), None, prompt_format="text")
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(
        f"{dataset} [{split}]: no held-out pair left: 6 of its 6 rows are training pairs ({counts} "
    )
    assert "leave dataset_test_split unset" in message
