"""python -m dpo.evaluate reads a run folder's heldout_pairs.jsonl through the checked reader with a bound on each
field (dpo/files.py read_jsonl_objects): a 1 MB prompt, in a folder whose run_complete.json records that very
file, is one `error:` line naming the file, row and field, before any weights load (it was tokenized whole)."""

import json
import shutil

import pytest
from helpers import cli, load_recipe, one_line_error

from dpo.files import file_sha256
from dpo.train.safety.runs import RUN_MARKER


@pytest.fixture(scope="module")
def finished(tiny_model_dir, truthy_file, tmp_path_factory):
    """A finished 1-step run that held pairs out (test_size 0.1: heldout_pairs.jsonl)."""
    out = tmp_path_factory.mktemp("finished")
    flags = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=out, max_steps=1)
    load_recipe("dpo_phi2").main([*flags, *cli(gradient_accumulation_steps=1, save_strategy="no")])
    return out


def test_a_held_out_prompt_of_a_megabyte_is_named_by_file_row_and_field(finished, tmp_path, capsys, no_weights_load):
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.evaluate import read_run

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    pairs_file = run / "heldout_pairs.jsonl"
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(read_run(run)[1]) == len(rows) >= 2  # the run's own rows pass
    huge = "why " * (2**20 // 4)  # 1 MiB
    rows[1]["prompt"] = huge if isinstance(rows[1]["prompt"], str) else [{"role": "user", "content": huge}]
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    marker = json.loads((run / RUN_MARKER).read_text())
    marker["sha256"]["heldout_pairs.jsonl"] = file_sha256(pairs_file)  # the record agrees with the file
    (run / RUN_MARKER).write_text(json.dumps(marker))
    line = one_line_error(evaluate, [run], capsys)
    assert f"{pairs_file}:2: the row's prompt is 1,04" in line and "characters long, above 131,072" in line, line
