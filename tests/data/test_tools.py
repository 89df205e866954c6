"""Tool-calling preference rows (dpo/data/tools.py): tool calls, tool results and a tools column are kept,
rendered through the chat template exactly as TRL's DPOTrainer renders them, inside the completion TRL trains
on; a template that cannot render them is refused in one line naming it and chat_template_path."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import cli, load_recipe, one_line_error

from dpo.compat import DataCollatorForPreference, DPOTrainer
from dpo.data.doctor import check_data
from dpo.data.doctor import main as doctor
from dpo.data.loading import load_preference_data
from dpo.data.pairs import to_pairs
from dpo.data.tools import TOOLS_COLUMN
from dpo.errors import UserError
from dpo.offline.tiny import write_jsonl
from dpo.train.model_checks import load_tokenizer

TEMPLATE = Path(__file__).parent / "fixtures" / "tool_chat_template.jinja"  # Qwen2.5-style, renders tools
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def user(text):
    return {"role": "user", "content": text}


def answer(text):
    return {"role": "assistant", "content": text}


def call(city, name="get_weather"):
    """An assistant turn that only calls a tool: empty content, as agents write it."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {"city": city}}}],
    }


def result(text):
    return {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": text}


def tool_rows():
    """Row 1: call vs a guess; row 2: the right call vs a wrong one; row 3: a tool result in the prompt, final
    answers; row 4: call, result and final answer in one chosen reply."""
    return [
        {
            "prompt": [user("Weather in Paris?")],
            "chosen": [call("Paris")],
            "rejected": [answer("Sunny.")],
            "tools": [WEATHER],
        },
        {
            "prompt": [user("Weather in Rome?")],
            "chosen": [call("Rome")],
            "rejected": [call("Paris")],
            "tools": [WEATHER],
        },
        {
            "prompt": [user("Weather in Oslo?"), call("Oslo"), result("-3C, snow")],
            "chosen": [answer("It is -3C and snowing in Oslo.")],
            "rejected": [answer("It is warm in Oslo.")],
            "tools": [WEATHER],
        },
        {
            "prompt": [user("Weather in Lima?")],
            "chosen": [call("Lima"), result("19C, cloudy"), answer("Lima: 19C and cloudy.")],
            "rejected": [answer("Lima is always sunny.")],
            "tools": [WEATHER],
        },
    ]


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tool_file(tmp_path):
    return write_jsonl(tool_rows(), tmp_path / "tools.jsonl")


def checked(tool_file, tokenizer, **kwargs):
    return check_data(load_preference_data(str(tool_file)), str(tool_file), tokenizer, **kwargs)


def test_rows_whose_chosen_reply_is_a_tool_call_are_kept_not_dropped_as_empty(tool_file, tokenizer):
    report = checked(tool_file, tokenizer, chat_template_path=str(TEMPLATE))
    assert report.rows_kept == 4 and report.rows_dropped == 0, report.table()
    assert "tools" in report.layout  # the tools column was read
    kept = report.kept[0]
    assert kept["chosen"] == [call("Paris")]  # the tool call survives, and no key another message had
    assert json.loads(kept["tools"]) == [WEATHER]
    assert kept["prompt"] == [user("Weather in Paris?")]  # no tool_calls: None from Arrow on a plain turn


def test_rendered_chosen_text_holds_the_calls_name_and_arguments(tool_file, tokenizer):
    report = checked(tool_file, tokenizer, chat_template_path=str(TEMPLATE))
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in report.example["chosen"]
    assert "Sunny." in report.example["rejected"]
    assert '"description": "The weather in a city"' in report.example["prompt"]  # the tools, as the template puts them
    assert report.chat_template == TEMPLATE.read_text()  # what the recipe trains and saves the tokenizer with


def trl_prepared(kept, tokenizer):
    """TRL's own DPOTrainer dataset preparation of the doctor's kept pairs (tools column included)."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), kept, tokenizer, args, "train")


def test_token_counts_are_trls_and_the_loss_mask_covers_the_call(tool_file, tokenizer):
    """TRL's completion mask (DataCollatorForPreference over its tokenized rows) covers the call's name and
    arguments, and the doctor counts the same tokens TRL does, tools and all."""
    report = checked(tool_file, tokenizer, chat_template_path=str(TEMPLATE))
    tokenizer.chat_template = report.chat_template  # as recipes/dpo_any.py does with the doctor's template
    prepared = trl_prepared(report.kept, tokenizer)
    counts = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in prepared]
    ours = list(zip(*(report.lengths[part].tolist() for part in ("prompt", "chosen", "rejected"))))
    assert ours == counts
    batch = DataCollatorForPreference(pad_token_id=tokenizer.eos_token_id)([prepared[0]])
    chosen_ids, mask = batch["input_ids"][0], batch["completion_mask"][0]  # first half: chosen
    trained = tokenizer.decode(chosen_ids[mask.bool()])
    untrained = tokenizer.decode(chosen_ids[~mask.bool()])
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in trained
    assert "get_weather" in untrained  # the tool's schema, in the prompt
    assert '"city": "Paris"' not in untrained


def test_a_tool_result_and_the_final_answer_render_in_order(tool_file, tokenizer):
    """Row 4's chosen reply: the call, the tool's result, then the final answer, in this order, all in the
    completion; row 3's tool result sits in the prompt."""
    report = checked(tool_file, tokenizer, chat_template_path=str(TEMPLATE))
    tokenizer.chat_template = report.chat_template
    row = report.kept[3]
    prepared = trl_prepared(report.kept.select([3]), tokenizer)[0]
    completion = tokenizer.decode(prepared["chosen_ids"])
    marks = ['"city": "Lima"', "<tool_response>\n19C, cloudy\n</tool_response>", "Lima: 19C and cloudy."]
    at = [completion.index(mark) for mark in marks]
    assert at == sorted(at), completion
    assert [m["role"] for m in row["chosen"]] == ["assistant", "tool", "assistant"]
    prompt_of_row_3 = tokenizer.decode(trl_prepared(report.kept.select([2]), tokenizer)[0]["prompt_ids"])
    assert prompt_of_row_3.index('"city": "Oslo"') < prompt_of_row_3.index("-3C, snow")


def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's own chat template, read from the pip-installed GGUF's metadata."""
    from gguf import GGUFReader

    from dpo.offline.pip_models import gguf_path

    field = GGUFReader(gguf_path("smollm2-135m-instruct")).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.slow  # reading the GGUF's metadata takes tens of seconds on a loaded 2-core machine
def test_smollm2s_template_is_refused_in_one_line_naming_it_and_chat_template_path(
    tool_file, tiny_model_dir, tmp_path, capsys
):
    model = shutil.copytree(tiny_model_dir, tmp_path / "smol-template")
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = smollm2_template()
    assert "content" in tokenizer.chat_template and "tool" not in tokenizer.chat_template  # role and content only
    tokenizer.save_pretrained(model)
    line = one_line_error(doctor, [tool_file, "--model_name_or_path", model], capsys)
    assert f"{tool_file}: rows hold tool calls or tools (first: row 1)" in line
    assert f"the chat template of {model} cannot render them" in line
    assert "chat_template_path" in line and ".jinja" in line
    # the same data and model with a template that renders tools: accepted
    assert doctor([str(tool_file), "--model_name_or_path", str(model), "--chat_template_path", str(TEMPLATE)])


def test_a_tokenizer_without_a_template_is_refused_before_weights_load(
    tool_file, tiny_model_dir, tmp_path, capsys, no_weights_load
):
    """The recipe: the plain fallback template cannot render tool calls either; one line, no weights loaded."""
    recipe = load_recipe("dpo_any")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", tool_file, "--output_dir", tmp_path / "out"]
    line = one_line_error(recipe.main, argv, capsys)
    assert "the plain Human/Assistant template" in line and "has no chat template" in line
    assert "--chat_template_path" in line


def test_a_chat_template_path_that_is_not_a_jinja_file_is_refused_by_the_gate(tool_file, tmp_path, capsys):
    (tmp_path / "template.txt").write_text("{{ messages }}")
    for path in (tmp_path / "missing.jinja", tmp_path / "template.txt"):
        line = one_line_error(doctor, [tool_file, "--chat_template_path", path], capsys)
        assert "chat_template_path" in line and ".jinja" in line


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("chosen", [{"role": "user", "content": "", "tool_calls": call("x")["tool_calls"]}], "only assistant turns"),
        (
            "chosen",
            [{**call("x"), "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}],
            "tool call 1",
        ),
        ("chosen", [{**call("x"), "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}], "not JSON"),
        ("chosen", [{**call("x"), "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "an object"),
        ("chosen", [{"role": "assistant", "content": None}], "expected {'role': text, 'content': text}"),
        ("tools", "get_weather", "not JSON"),
        ("tools", [{"type": "function"}], "tool 1"),
    ],
)
def test_a_malformed_tool_field_is_one_line_naming_file_row_and_field(field, value, expected, tmp_path, capsys):
    rows = tool_rows()
    rows[1][field] = value
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    line = one_line_error(doctor, [path], capsys)
    assert f"{path}, row 2, field '{field}'" in line and expected in line, line


def test_openai_string_arguments_are_read_as_an_object(tmp_path):
    """OpenAI writes arguments as JSON text; templates render them with tojson, so they are read into an object
    (as text, the call would render as a quoted string)."""
    rows = tool_rows()[:1]
    rows[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    rows[0]["chosen"][0]["content"] = None  # OpenAI's null content beside tool calls
    pairs, _ = to_pairs(load_preference_data(str(write_jsonl(rows, tmp_path / "o.jsonl"))), "o.jsonl")
    assert pairs[0]["chosen"] == [call("Paris")]


def test_a_tools_column_without_tool_messages_is_checked_too(tmp_path, tokenizer):
    rows = [{"prompt": [user("Hi")], "chosen": [answer("Hello")], "rejected": [answer("Go")], "tools": [WEATHER]}]
    path = write_jsonl(rows, tmp_path / "t.jsonl")
    with pytest.raises(UserError, match="rows hold tool calls or tools"):
        check_data(load_preference_data(str(path)), str(path), tokenizer)


@pytest.mark.slow
def test_the_recipe_trains_on_tool_rows_with_the_template_file_and_saves_it(tiny_model_dir, tmp_path):
    rows = [
        dict(r, prompt=[user(f"{r['prompt'][0]['content']} ({i})"), *r["prompt"][1:]])
        for i in range(3)
        for r in tool_rows()
    ]
    data = write_jsonl(rows, tmp_path / "tools.jsonl")
    out = tmp_path / "out"
    fast = cli(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1, save_strategy="no")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    trainer = load_recipe("dpo_any").main([*argv, "--chat_template_path", str(TEMPLATE), *fast])
    assert trainer.state.global_step == 1
    tokenizer = trainer.processing_class
    completions = [tokenizer.decode(r["chosen_ids"]) for r in trainer.train_dataset]
    assert any('"name": "get_weather", "arguments": {"city":' in c for c in completions)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE.read_text()
    from dpo.evaluation.evaluate import read_heldout_pairs

    heldout = read_heldout_pairs(out / "heldout_pairs.jsonl")  # what python -m dpo.evaluate scores and prompts
    assert heldout and all(json.loads(pair["tools"]) == [WEATHER] for pair in heldout)


def test_held_out_tool_rows_keep_their_tools_and_evaluate_renders_them_as_training_did(tool_file, tokenizer, tmp_path):
    """heldout_pairs.jsonl kept only prompt/chosen/rejected: `python -m dpo.evaluate` scored and prompted a
    tool-calling run's held-out pairs without the tools the model was trained to see."""
    from dpo.evaluation.evaluate import encode_pairs, read_heldout_pairs
    from dpo.evaluation.sampling import render_prompt
    from dpo.train.trainer import HELDOUT_COLUMNS, write_heldout_pairs

    assert TOOLS_COLUMN in HELDOUT_COLUMNS  # the trainer (below the data layer) names the data layer's column
    report = checked(tool_file, tokenizer, chat_template_path=str(TEMPLATE))
    tokenizer.chat_template = report.chat_template  # the run's saved tokenizer carries the template
    write_heldout_pairs(report.kept, tmp_path / "heldout_pairs.jsonl")
    pairs = read_heldout_pairs(tmp_path / "heldout_pairs.jsonl")
    assert json.loads(pairs[0]["tools"]) == [WEATHER] and pairs[0]["chosen"] == [call("Paris")]
    assert pairs[3]["chosen"] == tool_rows()[3]["chosen"]  # call, result, answer: every message field kept
    # the implicit rewards score exactly the tokens TRL trained on, tools and calls included
    prompt_ids, chosen_ids, rejected_ids = encode_pairs(tokenizer, pairs, None)
    prepared = trl_prepared(report.kept, tokenizer)
    assert prompt_ids == [r["prompt_ids"] for r in prepared]
    assert chosen_ids == [r["chosen_ids"] for r in prepared]
    assert rejected_ids == [r["rejected_ids"] for r in prepared]
    # the generations are prompted with the tools too
    prompt = render_prompt(tokenizer, pairs[0]["prompt"], pairs[0]["tools"])
    assert '"description": "The weather in a city"' in prompt
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == prepared[0]["prompt_ids"]


@pytest.mark.parametrize("entry", ["doctor", "dpo_phi2", "sft_phi2", "dpo_any_text", "dpo_sentiment_tiny"])
def test_a_chat_template_file_where_no_chat_row_is_rendered_is_refused_in_one_line(
    entry, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """chat_template_path was accepted by every recipe and silently ignored where the rows are text: phi-2's QA
    format, prompt_format text, the sentiment demo's reviews."""
    template = ["--chat_template_path", TEMPLATE]
    model = ["--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out"]
    if entry == "doctor":
        main, argv = doctor, [truthy_file, "--prompt_format", "text", *template]
    elif entry == "dpo_any_text":
        main, argv = load_recipe("dpo_any").main, [*model, "--dataset_name", truthy_file, "--prompt_format", "text"]
        argv += template
    elif entry == "dpo_sentiment_tiny":
        main, argv = load_recipe(entry).main, ["--output_dir", tmp_path / "out", *template]
    else:
        main, argv = load_recipe(entry).main, [*model, "--dataset_name", truthy_file, *template]
    line = one_line_error(main, argv, capsys)
    assert f"chat_template_path {TEMPLATE}:" in line and "are text" in line, line
    assert "leave chat_template_path unset" in line


def test_keys_parquet_added_to_arguments_and_tools_are_not_rendered(tmp_path, tokenizer):
    """Was: written as Parquet (how hub datasets are published), row 1's call came back as
    {"city": "Paris", "query": null} and its tool schema with a null "query" property, and both were rendered."""
    from datasets import Dataset

    search = {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
    }
    query = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "x"}}}]}  # fmt: skip
    rows = [
        tool_rows()[0],
        {"prompt": [user("Find x")], "chosen": [query], "rejected": [answer("No.")], "tools": [search]},
    ]
    path = tmp_path / "tools.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    raw = load_preference_data(str(path))[0]
    assert raw["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "query": None}  # the format
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert pairs[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert json.loads(pairs[0]["tools"]) == [WEATHER] and json.loads(pairs[1]["tools"]) == [search]
    text = tokenizer.apply_chat_template(
        pairs[0]["prompt"] + pairs[0]["chosen"], tools=json.loads(pairs[0]["tools"]), tokenize=False,
        chat_template=TEMPLATE.read_text(),
    )  # fmt: skip
    assert "Paris" in text and "query" not in text, text


def test_tools_on_text_rows_are_refused_not_ignored(tmp_path, capsys):
    rows = [{"prompt": "Weather in Paris?", "chosen": "Sunny.", "rejected": "Rain.", "tools": [WEATHER]}]
    path = write_jsonl(rows, tmp_path / "text-tools.jsonl")
    line = one_line_error(doctor, [path], capsys)
    assert f"{path}, row 1, field 'tools': tools offered on a row of text" in line, line
    rows[0]["tools"] = []  # none offered: a text row as any other
    assert checked(write_jsonl(rows, tmp_path / "text.jsonl"), None).rows_kept == 1


def test_named_templates_are_checked_as_transformers_picks_them(tool_file, tokenizer):
    """Hermes-style tokenizers hold {"default": ..., "tool_use": ...}: rows with tools render with "tool_use"
    (was: refused, "unhashable type: 'dict'"); rows whose calls come without tools render with "default", which is
    checked too."""
    tools_template = TEMPLATE.read_text()
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = {"default": plain, "tool_use": tools_template}
    rows = tool_rows()
    path = write_jsonl(rows, tool_file.parent / "named.jsonl")
    assert checked(path, tokenizer).rows_kept == 4  # every row offers tools: "tool_use" renders them
    rows[1].pop("tools")  # a call without tools offered: "default" renders it, and cannot
    with pytest.raises(UserError, match="cannot render them: its 'default' template: a probe conversation") as error:
        checked(write_jsonl(rows, tool_file.parent / "bare.jsonl"), tokenizer)
    assert "(first: row 2)" in str(error.value)  # the row "default" renders, not row 1 (rendered with tools)
    tokenizer.chat_template = {"default": tools_template, "tool_use": tools_template}
    assert checked(write_jsonl(rows, tool_file.parent / "bare2.jsonl"), tokenizer).rows_kept == 4


def test_an_empty_tool_calls_list_beside_text_is_a_plain_message(tmp_path):
    """Exports write `"tool_calls": []` on answers that call nothing (was: refused, "must be a non-empty list")."""
    rows = [{"prompt": [user("Hi")], "chosen": [{**answer("Hello."), "tool_calls": []}], "rejected": [answer("Go.")]}]
    pairs, _ = to_pairs(load_preference_data(str(write_jsonl(rows, tmp_path / "e.jsonl"))), "e.jsonl")
    assert pairs[0]["chosen"] == [answer("Hello.")] and list(pairs["problem"]) == [""]


def test_tool_rows_past_the_first_10_mib_of_a_jsonl_load(tmp_path):
    """pyarrow types a JSON Lines file from its first 10 MiB: a tool call first seen after that, with argument names
    of its own, failed with "Couldn't cast array of type" and no row. Valid JSON is read as its values instead."""
    long = "x" * 10_000
    plain = [
        {"prompt": [user(f"q{i} {long}")], "chosen": [answer("a")], "rejected": [answer("b")]} for i in range(1100)
    ]
    query = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "x", "limit": 3}}}]}  # fmt: skip
    late = [{"prompt": [user("Find x")], "chosen": [query], "rejected": [answer("No.")]}, *tool_rows()[:1]]
    path = write_jsonl(plain + late, tmp_path / "big.jsonl")
    assert path.stat().st_size > 10 << 20
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert len(pairs) == 1102 and pairs[0]["chosen"] == [answer("a")]
    assert pairs[1100]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"query": "x", "limit": 3}
    assert pairs[1101]["chosen"] == [call("Paris")] and json.loads(pairs[1101]["tools"]) == [WEATHER]


def test_a_flat_calls_id_stays_on_the_call(tmp_path):
    """A call written with the function's fields at the top ({"id", "name", "arguments"}) keeps its id on the call,
    where templates read tool_call.id (was: moved inside "function")."""
    flat = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}}],
    }
    rows = [{"prompt": [user("Weather in Oslo?")], "chosen": [flat], "rejected": [answer("Cold.")]}]
    pairs, _ = to_pairs(load_preference_data(str(write_jsonl(rows, tmp_path / "flat.jsonl"))), "flat.jsonl")
    (got,) = pairs[0]["chosen"][0]["tool_calls"]
    assert got == {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def test_a_system_column_and_a_system_message_that_differ_are_refused(tmp_path, capsys):
    """Was: the system column was dropped without a word when the prompt opened with a system message."""
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi")]
    rows = [{"prompt": prompt, "chosen": [answer("Hello.")], "rejected": [answer("Go.")], "system": "Be kind."}]
    path = write_jsonl(rows, tmp_path / "two-systems.jsonl")
    line = one_line_error(doctor, [path], capsys)
    assert f"{path}, row 1, field 'system': the prompt opens with a system message of its own" in line, line
    rows[0]["system"] = "Be brief."  # the same: nothing lost
    pairs, _ = to_pairs(load_preference_data(str(write_jsonl(rows, tmp_path / "same.jsonl"))), "same.jsonl")
    assert pairs[0]["prompt"] == prompt


def test_reviewed_edges_of_tool_rows(tmp_path, capsys):
    """A flat call beside nested ones in Parquet keeps type "function" and no null keys; `tool_calls: []` does not make
    a null content legal; an unrelated "tools" field on text rows stays theirs; a system column equal to the prompt's
    own system message but for spacing passes, and an empty system message gives way to the column."""
    from datasets import Dataset

    nested = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}  # fmt: skip
    flat = {"role": "assistant", "content": "", "tool_calls": [{"name": "g", "arguments": "{}"}]}
    rows = [{"prompt": [user("a")], "chosen": [nested], "rejected": [answer("x")]},
            {"prompt": [user("b")], "chosen": [flat], "rejected": [answer("y")]}]  # fmt: skip
    path = tmp_path / "mixed.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert pairs[1]["chosen"][0]["tool_calls"] == [{"type": "function", "function": {"name": "g", "arguments": {}}}]
    assert pairs[0]["chosen"][0]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": {}},
    }

    capsys.readouterr()  # the Parquet writer's progress bar
    null_user = [
        {
            "prompt": [{"role": "user", "content": None, "tool_calls": []}],
            "chosen": [answer("x")],
            "rejected": [answer("y")],
        }
    ]
    line = one_line_error(doctor, [write_jsonl(null_user, tmp_path / "null.jsonl")], capsys)
    assert "row 1, field 'prompt', message 1: expected {'role': text, 'content': text}" in line, line

    text = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "tools": "calculator"}]
    assert checked(write_jsonl(text, tmp_path / "text.jsonl"), None).rows_kept == 1

    system = [{"prompt": [{"role": "system", "content": "Be brief.\n"}, user("Hi")], "chosen": [answer("Hello.")],
               "rejected": [answer("Go.")], "system": "Be brief."}]  # fmt: skip
    assert checked(write_jsonl(system, tmp_path / "s1.jsonl"), None).rows_kept == 1
    system[0]["prompt"][0]["content"] = ""
    pairs, _ = to_pairs(load_preference_data(str(write_jsonl(system, tmp_path / "s2.jsonl"))), "s2.jsonl")
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be brief."}, user("Hi")]


def test_a_folder_whose_files_pyarrow_types_apart_loads_as_one(tmp_path):
    """One file past pyarrow's first 10 MiB read as its values, its sibling typed by pyarrow: the columns differed
    ("columns [...] differ from ...") though each file loaded alone. The folder is read as values, file and row kept."""
    folder = tmp_path / "data"
    folder.mkdir()
    long = "x" * 10_000
    plain = [
        {"prompt": [user(f"q{i} {long}")], "chosen": [answer("a")], "rejected": [answer("b")]} for i in range(1100)
    ]
    query = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "x"}}}]}  # fmt: skip
    write_jsonl([*plain, {"prompt": [user("Find x")], "chosen": [query], "rejected": [answer("No.")]}],
                folder / "train-00000.jsonl")  # fmt: skip
    write_jsonl(tool_rows()[:1], folder / "train-00001.jsonl")
    pairs, _ = to_pairs(load_preference_data(str(folder)), str(folder))
    assert len(pairs) == 1102 and pairs[1101]["chosen"] == [call("Paris")]
    assert pairs[1100]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"query": "x"}


@pytest.mark.parametrize("prompt_format", ["chat", "text"])
def test_a_transcripts_preamble_and_a_system_column_are_one_system_text(prompt_format):
    """An HH transcript's preamble is its system text: was, beside a system column, the column dropped (chat) or
    both prepended (text). The same text is kept once; two that differ are refused, naming row and field."""
    from datasets import Dataset

    row = {"chosen": "Be brief.\n\nHuman: q\n\nAssistant: a", "rejected": "Be brief.\n\nHuman: q\n\nAssistant: b"}
    pairs, _ = to_pairs(Dataset.from_list([{**row, "system": "Be brief."}]), "hh", prompt_format=prompt_format)
    prompt = pairs[0]["prompt"]
    said = prompt.count("Be brief.") if prompt_format == "text" else [m["content"] for m in prompt].count("Be brief.")
    assert said == 1, prompt
    with pytest.raises(
        UserError, match="hh, row 1, field 'system': the prompt opens with a system message of its own"
    ):
        to_pairs(Dataset.from_list([{**row, "system": "Be kind."}]), "hh", prompt_format=prompt_format)
