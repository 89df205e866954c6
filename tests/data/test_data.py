"""dpo/data/loading.py, dpo/data/pairs.py, dpo/data/formats.py: every supported layout, written in its dataset's
exact shape, converts to the expected prompt / chosen / rejected; every schema error names the file, the row and the field.

The rows are built in each dataset's shape by tests/helpers.py.
"""

import json

import pytest
from datasets import Dataset
from helpers import (
    SYSTEM,
    assistant,
    h4_ultrafeedback_rows,
    hh_rows,
    orca_rows,
    qa,
    trl_ultrafeedback_rows,
    user,
)

from dpo.data.formats import PLAIN_CHAT_TEMPLATE, _render_plain, ensure_chat_template, phi2_qa_format, render
from dpo.data.loading import load_preference_data
from dpo.data.pairs import DIVERGE, NO_SHARED_PROMPT, Columns, to_pairs
from dpo.errors import UserError
from dpo.offline.tiny import truthy_like_rows, write_jsonl
from dpo.train.model_checks import load_tokenizer


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A fresh tiny tokenizer (no chat template; tests may give it one)."""
    return load_tokenizer(str(tiny_model_dir))


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ── layouts ──────────────────────────────────────────────────────────────────────────


def test_truthy_rows_in_text_format_and_phi2_format():
    rows = truthy_like_rows(4)
    pairs, layout = to_pairs(Dataset.from_list(rows), "truthy.jsonl", prompt_format="text")
    assert layout.kind == "text" and (layout.prompt, layout.system) == ("prompt", "system")
    for row, pair in zip(rows, pairs):
        expected_prompt = f"{row['system']}\n\n{row['prompt']}" if row["system"] else row["prompt"]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (expected_prompt, row["chosen"], row["rejected"])
        assert pair["problem"] == ""
    phi2, _ = to_pairs(Dataset.from_list(rows), "truthy.jsonl", prompt_format="text", text_format=phi2_qa_format)
    assert phi2[0]["prompt"] == f"Instruct: {rows[0]['system']}\n\n{rows[0]['prompt']}\nOutput:"
    assert phi2[1]["prompt"] == f"Instruct: {rows[1]['prompt']}\nOutput:"  # empty system: no blank line
    assert phi2[0]["chosen"] == " " + rows[0]["chosen"]


def test_truthy_rows_in_chat_format_render_with_the_plain_template(tokenizer, capsys):
    rows = truthy_like_rows(2)
    pairs, _ = to_pairs(Dataset.from_list(rows), "truthy.jsonl")
    assert pairs[0]["prompt"] == [
        {"role": "system", "content": rows[0]["system"]},
        {"role": "user", "content": rows[0]["prompt"]},
    ]
    assert pairs[1]["prompt"] == [{"role": "user", "content": rows[1]["prompt"]}]  # empty system: no message
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": rows[0]["chosen"]}]

    assert ensure_chat_template(tokenizer) is True
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    assert "no chat template" in capsys.readouterr().err
    prompt, prompt_chosen, _ = render(pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"], tokenizer)
    assert prompt == f"{rows[0]['system']}\n\nHuman: {rows[0]['prompt']}\n\nAssistant:"
    assert prompt_chosen == f"{prompt} {rows[0]['chosen']}{tokenizer.eos_token}"
    assert ensure_chat_template(tokenizer) is False  # has one now: no second warning
    assert capsys.readouterr().err == ""


def test_orca_question_column_is_the_prompt():
    rows = orca_rows(4)
    pairs, layout = to_pairs(Dataset.from_list(rows), "orca.parquet", prompt_format="text")
    assert layout.prompt == "question" and layout.system == "system"
    assert pairs[0]["prompt"] == rows[0]["question"]
    assert pairs[1]["prompt"] == f"{SYSTEM}\n\n{rows[1]['question']}"
    chat, _ = to_pairs(Dataset.from_list(rows), "orca.parquet")
    assert chat[1]["prompt"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": rows[1]["question"]},
    ]


def test_h4_ultrafeedback_prompt_text_with_full_conversations():
    rows = h4_ultrafeedback_rows(3)
    pairs, layout = to_pairs(Dataset.from_list(rows), "HuggingFaceH4/ultrafeedback_binarized")
    assert layout.kind == "conversational" and layout.prompt_kind == "text"
    assert "prompt = shared turns" in layout.describe()
    for row, pair in zip(rows, pairs):
        assert pair["prompt"] == [{"role": "user", "content": row["prompt"]}]  # the user turn, once
        assert pair["chosen"] == [{"role": "assistant", "content": row["chosen"][1]["content"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": row["rejected"][1]["content"]}]
        assert pair["problem"] == ""


def test_trl_ultrafeedback_implicit_prompt_is_the_shared_turns_multi_turn_included():
    rows = trl_ultrafeedback_rows(3)
    pairs, layout = to_pairs(Dataset.from_list(rows), "trl-lib/ultrafeedback_binarized")
    assert layout.kind == "conversational" and layout.prompt is None
    multi = pairs[2]
    assert multi["prompt"] == rows[2]["chosen"][:3]  # hello, hi, question
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]
    assert multi["chosen"] == rows[2]["chosen"][3:] and multi["rejected"] == rows[2]["rejected"][3:]


def test_explicit_prompt_messages_or_text_with_answer_only_lists():
    rows = [{"prompt": [user("Hi?")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}]
    pairs, layout = to_pairs(Dataset.from_list(rows), "x.jsonl")
    assert layout.prompt_kind == "messages" and "prompt = prompt column" in layout.describe()
    assert (pairs[0]["prompt"], pairs[0]["chosen"]) == ([user("Hi?")], [assistant("Hello.")])
    rows = [{"prompt": "Hi?", "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}]
    pairs, layout = to_pairs(Dataset.from_list(rows), "x.jsonl")
    assert layout.prompt_kind == "text" and "prompt = prompt column" in layout.describe()
    assert (pairs[0]["prompt"], pairs[0]["chosen"]) == ([user("Hi?")], [assistant("Hello.")])


def test_hh_transcripts_text_and_chat_multi_turn(tokenizer):
    rows = hh_rows(2)
    q, good, bad = qa(1)
    text, layout = to_pairs(Dataset.from_list(rows), "hh.jsonl", prompt_format="text")
    assert layout.kind == "hh"
    assert (
        text[1]["prompt"] == f"\n\nHuman: Hi there.\n\nAssistant: Hello, how can I help?\n\nHuman: {q}\n\nAssistant:"
    )
    assert (text[1]["chosen"], text[1]["rejected"]) == (f" {good}", f" {bad}")
    assert text[1]["prompt"] + text[1]["chosen"] == rows[1]["chosen"]  # nothing lost or added

    chat, _ = to_pairs(Dataset.from_list(rows), "hh.jsonl")
    assert chat[1]["prompt"] == [user("Hi there."), assistant("Hello, how can I help?"), user(q)]
    assert chat[1]["chosen"] == [assistant(good)]
    # with the plain template, HH reads as it was written (plus EOS after each assistant turn)
    ensure_chat_template(tokenizer)
    prompt, _, prompt_rejected = render(chat[1]["prompt"], chat[1]["chosen"], chat[1]["rejected"], tokenizer)
    eos = tokenizer.eos_token
    assert prompt == text[1]["prompt"].replace("help?", f"help?{eos}")
    assert prompt_rejected == rows[1]["rejected"].replace("help?", f"help?{eos}") + eos


def test_hh_rows_that_cannot_be_split_are_flagged_not_lost():
    rows = [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # no shared turn
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: z\n\nAssistant: w",
        },  # differ at a human turn
        {"chosen": "\n\nHuman: a\n\nAssistant: fine", "rejected": "\n\nHuman: a\n\nAssistant: bad"},
    ]
    for fmt in ("text", "chat"):
        pairs, _ = to_pairs(Dataset.from_list(rows), "hh.jsonl", prompt_format=fmt)
        assert pairs["problem"] == [NO_SHARED_PROMPT, DIVERGE, ""], fmt
        assert pairs["row"] == [1, 2, 3]


def test_column_mapping_from_the_yaml():
    rows = [{"query": "q1", "good": "yes", "bad": "no", "persona": "Be brief."}]
    pairs, layout = to_pairs(
        Dataset.from_list(rows),
        "mine.csv",
        Columns(prompt="query", chosen="good", rejected="bad", system="persona"),
        prompt_format="text",
    )
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("Be brief.\n\nq1", "yes", "no")
    assert "prompt=query" in layout.describe()
    with pytest.raises(
        UserError, match=r"mine.csv: prompt_column: 'question' is not a column; the data has \['query'"
    ):
        to_pairs(Dataset.from_list(rows), "mine.csv", Columns(prompt="question"))


def test_unknown_columns_say_how_to_map_them():
    """Callers with column options (dpo_any.py, the doctor) pass Columns and get them named; the
    others (the phi-2 recipe) are pointed at dpo_any.py instead of options they lack."""
    other_names = Dataset.from_list([{"q": "a", "good": "b", "bad": "c"}])
    no_prompt = Dataset.from_list([{"query": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(UserError, match=r"missing field\(s\) \['chosen', 'rejected'\].*chosen_column"):
        to_pairs(other_names, "mine.jsonl", Columns())
    with pytest.raises(UserError, match="no prompt column.*prompt_column"):
        to_pairs(no_prompt, "mine.jsonl", Columns())
    for data in (other_names, no_prompt):
        with pytest.raises(UserError, match="use recipes/dpo_any.py") as err:
            to_pairs(data, "mine.jsonl")
        assert "_column" not in str(err.value)


def test_the_tokenizers_own_chat_template_is_used(tokenizer):
    tokenizer.chat_template = CHATML
    assert ensure_chat_template(tokenizer) is False
    pairs, _ = to_pairs(Dataset.from_list(h4_ultrafeedback_rows(1)), "uf")
    prompt, prompt_chosen, _ = render(pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"], tokenizer)
    assert prompt == f"<|im_start|>user\n{qa(0)[0]}<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_chosen == prompt + f"{qa(0)[1]}<|im_end|>\n"


def test_plain_template_in_python_matches_the_jinja_one(tokenizer):
    ensure_chat_template(tokenizer)
    messages = [{"role": "system", "content": "S"}, user("u1"), assistant("a1"), user("u2")]
    jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _render_plain(messages, True) == jinja.replace(tokenizer.eos_token, "")


def test_conversational_data_refuses_text_format_and_phi2_format():
    data = Dataset.from_list(trl_ultrafeedback_rows(2))
    with pytest.raises(UserError, match="needs prompt_format: chat"):
        to_pairs(data, "uf", prompt_format="text")
    with pytest.raises(UserError, match="recipes/dpo_any.py"):
        to_pairs(Dataset.from_list(hh_rows(2)), "hh", prompt_format="text", text_format=phi2_qa_format)


# ── loading and schema errors ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_local_format_loads_the_same_rows(tmp_path, suffix):
    rows = orca_rows(3)
    path = tmp_path / f"data{suffix}"
    data = Dataset.from_list(rows)
    if suffix == ".jsonl":
        write_jsonl(rows, path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))  # one JSON array
    elif suffix == ".parquet":
        data.to_parquet(path)
    else:
        data.to_csv(path, index=False)
    loaded = load_preference_data(str(path))
    assert [dict(r) for r in loaded] == [
        {**r, "system": r["system"] or (None if suffix == ".csv" else "")} for r in rows
    ]


def _compress(path, suffix):
    """`path` compressed as `path` + suffix (.gz or .zst), as datasets are distributed."""
    import gzip

    import zstandard

    raw = path.read_bytes()
    out = path.with_name(path.name + suffix)
    out.write_bytes(gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw))
    return out


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json.gz", "data.csv.gz", "data.jsonl.zst"])
def test_compressed_files_load_the_same_rows_as_plain_ones(tmp_path, name):
    rows = orca_rows(3)
    plain = tmp_path / name.rsplit(".", 1)[0]
    if plain.suffix == ".jsonl":
        write_jsonl(rows, plain)
    elif plain.suffix == ".json":
        plain.write_text(json.dumps(rows))
    else:
        Dataset.from_list(rows).to_csv(plain, index=False)
    compressed = _compress(plain, "." + name.rsplit(".", 1)[1])
    assert [dict(r) for r in load_preference_data(str(compressed))] == [
        dict(r) for r in load_preference_data(str(plain))
    ]


def test_errors_in_a_compressed_file_name_the_row_and_line(tmp_path):
    lines = [json.dumps(r) for r in orca_rows(4)]
    lines[2] = lines[2][:-5]  # cut off the end of line 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert _error(_compress(bad, ".gz")).startswith(f"{bad}.gz, line 3: malformed JSON")
    rows = truthy_like_rows(4)
    rows[3]["rejected"] = 42
    typed = tmp_path / "typed.jsonl"
    typed.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    assert _error(_compress(typed, ".zst")).startswith(f"{typed}.zst, row 4 (line 5), field 'rejected': expected text")
    (tmp_path / "d.parquet.gz").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported file type '.parquet.gz'"):
        load_preference_data(str(tmp_path / "d.parquet.gz"))


def test_the_real_hh_rlhf_file_loads_as_distributed():
    """Anthropic's harmless-base test split, the original .jsonl.gz: 2,312 multi-turn transcripts."""
    from helpers import HH_FILE

    raw = load_preference_data(str(HH_FILE))
    pairs, layout = to_pairs(raw, str(HH_FILE))
    assert len(raw) == 2312 and layout.kind == "hh"
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"][-1]["role"] == "assistant"
    assert sum(p == "" for p in pairs["problem"]) > 2200  # nearly every row splits into prompt + two replies


def test_a_save_to_disk_folder_loads_by_split(tmp_path):
    from datasets import DatasetDict

    DatasetDict(train=Dataset.from_list(orca_rows(3)), test=Dataset.from_list(orca_rows(1))).save_to_disk(
        tmp_path / "dd"
    )
    assert len(load_preference_data(str(tmp_path / "dd"))) == 3
    assert len(load_preference_data(str(tmp_path / "dd"), split="test")) == 1
    Dataset.from_list(orca_rows(2)).save_to_disk(tmp_path / "one")
    assert load_preference_data(str(tmp_path / "one"), split="test", missing_ok=True) is None
    with pytest.raises(UserError, match="has no split 'dev'"):
        load_preference_data(str(tmp_path / "dd"), split="dev")


def test_a_local_file_has_only_a_train_split(tmp_path):
    path = write_jsonl(orca_rows(2), tmp_path / "d.jsonl")
    assert load_preference_data(str(path), split="test", missing_ok=True) is None
    assert len(load_preference_data(str(path))) == 2


def _error(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        to_pairs(load_preference_data(str(path)), str(path), **kwargs)
    return str(info.value)


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in orca_rows(4)]
    lines[2] = lines[2][:-5]  # cut off the end of line 3
    path.write_text("\n".join(lines) + "\n")
    assert _error(path).startswith(f"{path}, line 3: malformed JSON")


def test_empty_file_and_blank_file(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.csv", "")):
        (tmp_path / name).write_text(text)
        assert _error(tmp_path / name) == f"{tmp_path / name}: the file is empty"
    (tmp_path / "header.csv").write_text("prompt,chosen,rejected\n")
    assert "no rows" in _error(tmp_path / "header.csv")


def test_wrong_type_names_row_and_field_with_line_when_blank_lines_shift_it(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    rows[3]["rejected"] = 42
    path = tmp_path / "typed.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    )
    assert (
        _error(path)
        == f"{path}, row 4 (line 5), field 'rejected': expected text as in the rows before, got a number (42)"
    )


def test_missing_value_names_row_and_field(tmp_path):
    rows = truthy_like_rows(4)
    del rows[1]["chosen"]
    path = write_jsonl(rows, tmp_path / "missing.jsonl")
    assert _error(path) == f"{path}, row 2, field 'chosen': missing (no value)"


def test_malformed_message_names_row_field_and_message(tmp_path):
    rows = trl_ultrafeedback_rows(3)
    rows[2]["rejected"][1] = {"role": "assistant", "text": "oops"}  # "text" instead of "content"
    path = write_jsonl(rows, tmp_path / "msgs.jsonl")
    assert _error(path).startswith(
        f"{path}, row 3, field 'rejected', message 2: expected {{'role': text, 'content': text}}"
    )
    rows = trl_ultrafeedback_rows(2)
    rows[1]["chosen"] = "just text"
    path = write_jsonl(rows, tmp_path / "mixed.jsonl")
    assert _error(path).startswith(f"{path}, row 2, field 'chosen': expected a list of messages")


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_preference_data(str(tmp_path / "d.txt"))
    with pytest.raises(UserError, match="dataset file not found"):
        load_preference_data(str(tmp_path / "nope.jsonl"))


def test_every_input_row_gives_one_output_row_in_order():
    rows = hh_rows(7) + [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}]
    pairs, _ = to_pairs(Dataset.from_list(rows), "hh")
    assert len(pairs) == len(rows) and pairs["row"] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(
    "module", ["loading", "datafiles", "pairs", "preferences", "formats", "tools", "nested", "prompts"]
)
def test_every_public_function_of_the_data_modules_is_used_by_the_project(module):
    """No dead code in dpo/data/loading.py, datafiles.py, pairs.py, preferences.py, formats.py: each public function or class is used by the package, a recipe,
    a benchmark or a notebook, not only by its own definition (tests do not count)."""
    import ast
    import re

    from helpers import ROOT

    tree = ast.parse((ROOT / "dpo" / "data" / f"{module}.py").read_text())
    public = [
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
    ]
    used: set[str] = set()
    for path in [*(ROOT / "dpo").rglob("*.py"), *(ROOT / "recipes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.alias):
                used.add(node.name)
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                used.update(re.findall(r"\w+", "".join(cell["source"])))
    assert public and [name for name in public if name not in used] == []
