"""dpo/gate/output_dir.py: adapter_config.json has one checked reader (read_adapter_config_file), used by the
output_dir check and by dpo/train/adapters.py, so a broken one is the same one-line error naming the file,
whichever reads it first; nothing reads it on its own any more."""

import json

import pytest

from dpo.errors import UserError
from dpo.gate.output_dir import ADAPTER_CONFIG, check_output_dir_apart
from dpo.train.adapters import resolve_start

BROKEN = [
    ("{not json", "is not valid JSON (line 1, column 2"),
    ("[]", "holds a list, not an object"),
    (
        json.dumps({"base_model_name_or_path": 7}),
        "entry 'base_model_name_or_path' is an integer, not a string or null",
    ),
]


@pytest.mark.parametrize("text, expected", BROKEN)
def test_a_broken_adapter_config_is_the_same_one_line_error_for_both_readers(text, expected, tmp_path):
    """Was: the output_dir check read it with json.loads and let any problem pass (base None); the adapter reader
    said "not valid JSON" in its own words, and a JSON list or number ended in an AttributeError traceback."""
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text(text)
    lines = []
    for read in (
        lambda: check_output_dir_apart(tmp_path / "out", str(adapter), None),
        lambda: resolve_start(str(adapter), None),
        lambda: resolve_start(str(tmp_path / "base"), str(adapter)),
    ):
        with pytest.raises(UserError) as err:
            read()
        lines.append(str(err.value))
    assert len(set(lines)) == 1, lines  # one reader, one message
    (line,) = set(lines)
    assert line.startswith(str(adapter / ADAPTER_CONFIG)) and expected in line and "\n" not in line, line


def test_a_null_or_absent_base_passes_the_reader(tmp_path):
    """PEFT may write a null base: the reader passes it, and resolve_start names what to do (its own check)."""
    adapter = tmp_path / "sft"
    adapter.mkdir()
    for config in ({"base_model_name_or_path": None}, {}):
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
        check_output_dir_apart(tmp_path / "out", str(adapter), None)  # nothing to protect beyond the adapter
        with pytest.raises(UserError, match="names no base_model_name_or_path; pass the base"):
            resolve_start(str(adapter), None)
