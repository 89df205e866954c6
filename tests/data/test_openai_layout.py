"""OpenAI's preference fine-tuning layout (dpo/data/nested.py): input.messages is the prompt, input.tools the tools,
preferred_output / non_preferred_output the chosen / rejected replies, read like the other real layouts; a
malformed row is one line naming the file, the row and the field by its path."""

import json

import pytest
from helpers import one_line_error

from dpo.data.doctor import check_data
from dpo.data.doctor import main as doctor
from dpo.data.loading import load_preference_data
from dpo.data.pairs import to_pairs
from dpo.offline.tiny import write_jsonl

# OpenAI's documented example row (platform.openai.com, preference fine-tuning), and one with a system turn
DOC_ROW = {
    "input": {
        "messages": [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}],
        "tools": [],
        "parallel_tool_calls": True,
    },
    "preferred_output": [
        {
            "role": "assistant",
            "content": "Today in San Francisco, it is not quite cold as expected. Morning clouds will give away to "
            "sunshine, with a high near 68°F (20°C) and a low around 57°F (14°C).",
        }
    ],
    "non_preferred_output": [{"role": "assistant", "content": "It is not particularly cold in San Francisco today."}],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def rows():
    tool_row = {
        "input": {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER],
        },
        "preferred_output": [
            {
                "role": "assistant",
                "content": None,  # as OpenAI writes a reply that only calls a tool; arguments as JSON text
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            }
        ],
        "non_preferred_output": [{"role": "assistant", "content": "Cold."}],
    }
    return [DOC_ROW, tool_row]


def test_openai_rows_are_read_as_prompt_chosen_rejected_and_tools(tmp_path):
    path = write_jsonl(rows(), tmp_path / "openai.jsonl")
    pairs, layout = to_pairs(load_preference_data(str(path)), str(path))
    assert "prompt=input.messages" in layout.describe() and "chosen=preferred_output" in layout.describe()
    first, second = pairs[0], pairs[1]
    assert first["prompt"] == DOC_ROW["input"]["messages"]
    assert first["chosen"] == DOC_ROW["preferred_output"] and first["rejected"] == DOC_ROW["non_preferred_output"]
    assert first["tools"] is None  # OpenAI's "tools": [] offers none
    assert [m["role"] for m in second["prompt"]] == ["system", "user"]
    assert second["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert json.loads(second["tools"]) == [WEATHER]
    assert list(pairs["problem"]) == ["", ""]


def test_the_doctor_keeps_every_openai_row(tmp_path):
    other = dict(DOC_ROW, non_preferred_output=[{"role": "assistant", "content": "Hot."}])
    path = write_jsonl([DOC_ROW, other], tmp_path / "o.jsonl")
    report = check_data(load_preference_data(str(path)), str(path))
    assert report.rows_kept == 2 and report.rows_dropped == 0, report.table()
    assert "how cold San Francisco is today" in report.example["prompt"]


@pytest.mark.parametrize(
    "change, field, expected",
    [
        ({"input": None}, "input", "expected an object with messages, tools (optional); missing (no value)"),
        ({"input": {"tools": []}}, "input.messages", "missing (no value)"),
        ({"input": {"messages": [{"role": "human", "content": "hi"}]}}, "input.messages", "role 'human'"),
        ({"preferred_output": None}, "preferred_output", "missing (no value)"),
        ({"non_preferred_output": [{"role": "assistant"}]}, "non_preferred_output", "expected {'role': text"),
    ],
)
def test_a_malformed_openai_row_is_one_line_naming_file_row_and_field(change, field, expected, tmp_path, capsys):
    data = rows()
    data[1] = {**data[1], **change}
    path = write_jsonl(data, tmp_path / "bad.jsonl")
    line = one_line_error(doctor, [path], capsys)
    assert f"{path}, row 2, field '{field}'" in line and expected in line, line


def test_named_columns_win_over_the_detected_layout(tmp_path, capsys):
    """A user who maps the columns gets them read as mapped (here wrongly: input is an object, not text)."""
    path = write_jsonl(rows(), tmp_path / "openai.jsonl")
    argv = [path, "--prompt_column", "input", "--chosen_column", "preferred_output"]
    line = one_line_error(doctor, [*argv, "--rejected_column", "non_preferred_output"], capsys)
    assert "row 1, field 'input'" in line


def test_tools_beside_the_input_are_the_rows_tools_and_twice_differently_is_refused(tmp_path, capsys):
    """Was: a top-level `tools` (some exports put it beside `input`) was dropped without a word."""
    row = rows()[1]
    beside = {**row, "input": {"messages": row["input"]["messages"]}, "tools": [WEATHER]}
    path = write_jsonl([DOC_ROW, beside], tmp_path / "beside.jsonl")
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert json.loads(pairs[1]["tools"]) == [WEATHER] and pairs[0]["tools"] is None
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    twice = {**row, "tools": [other]}
    path = write_jsonl([DOC_ROW, twice], tmp_path / "twice.jsonl")
    line = one_line_error(doctor, [path], capsys)
    assert f"{path}, row 2, field 'tools': tools given twice" in line and "'input.tools'" in line, line


def test_an_empty_list_in_row_1_is_a_dropped_row_not_the_layout(tmp_path):
    """Was: row 1's empty input.messages decided the prompt was text, and the file was refused ("expected text")."""
    empty = {**DOC_ROW, "input": {"messages": []}}
    path = write_jsonl([empty, *rows()], tmp_path / "empty-first.jsonl")
    report = check_data(load_preference_data(str(path)), str(path))
    assert report.rows_kept == 2 and report.rows_dropped == 1, report.table()


def test_the_same_tools_twice_in_parquet_pass(tmp_path):
    """Parquet gives row 1's tools the keys of row 2's (as nulls): the same tools in input.tools and beside it are
    still the same (was: refused as differing)."""
    from datasets import Dataset

    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    first = {**DOC_ROW, "input": {"messages": DOC_ROW["input"]["messages"], "tools": [WEATHER]}, "tools": [WEATHER]}
    second = {**DOC_ROW, "input": {"messages": DOC_ROW["input"]["messages"], "tools": [strict]}, "tools": None}
    path = tmp_path / "o.parquet"
    Dataset.from_list([first, second]).to_parquet(str(path))
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert json.loads(pairs[0]["tools"]) == [WEATHER] and json.loads(pairs[1]["tools"]) == [strict]


def test_tools_given_as_json_text_keep_the_nulls_they_mean(tmp_path):
    """JSON text is read exactly (dpo/data/tools.py): a schema's "default": null stays (was: datasets' Json type
    parsed the text into a list, and the nulls Parquet adds were then dropped from it too)."""
    schema = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "object", "properties": {
        "unit": {"type": ["string", "null"], "default": None}}}}}  # fmt: skip
    row = rows()[1]
    row["input"] = {**row["input"], "tools": json.dumps([schema])}
    path = write_jsonl([row], tmp_path / "text-tools.jsonl")
    pairs, _ = to_pairs(load_preference_data(str(path)), str(path))
    assert json.loads(pairs[0]["tools"]) == [schema]
