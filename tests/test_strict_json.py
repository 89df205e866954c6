"""Every JSON file the tools write is strict JSON (dpo/files.py json_text / jsonl_text): Python's json wrote NaN
and Infinity, which jq, JavaScript and strict parsers refuse (rounds.json held NaN and -Infinity from a reward
of 1.7e308). Records a tool reads back as truth refuse a non-finite number, naming the file and the entry;
observations (metrics) write it as null and say so in the log. A scan keeps every writer on that path."""

import ast
import json
import math
from pathlib import Path

import pytest
from helpers import ROOT, cli, load_recipe

from dpo.files import json_text, jsonl_text
from dpo.train.safety.checkpoints import write_json_atomic


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as a strict parser does."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_record_with_a_nan_is_refused_naming_the_file_and_the_entry(tmp_path):
    path = tmp_path / "rounds.json"
    with pytest.raises(ValueError) as err:
        write_json_atomic(path, {"rounds": [{"heldout": {"reward": float("nan"), "kl": 0.1}}]})
    assert f"refusing to write {path}" in str(err.value) and "rounds[0].heldout.reward is nan" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_observations_are_written_as_null_and_said_in_the_log(tmp_path, capsys):
    metrics = {"eval_loss": float("nan"), "curve": [1.0, float("inf")], "steps": 3}
    text = json_text(metrics, tmp_path / "metrics.json", observations=True, sort_keys=True)
    assert strict(text) == {"eval_loss": None, "curve": [1.0, None], "steps": 3}
    log = capsys.readouterr().out
    assert f"{tmp_path / 'metrics.json'}: 2 non-finite value(s) written as null" in log
    assert "eval_loss = nan" in log and "curve[1] = inf" in log
    assert math.isnan(metrics["eval_loss"])  # the caller's data is not changed
    rows = jsonl_text([{"score": -math.inf}, {"score": 1.5}], "generations.jsonl", observations=True)
    assert [strict(line) for line in rows.splitlines()] == [{"score": None}, {"score": 1.5}]


def test_evaluate_writes_strict_json_when_a_metric_is_nan(tmp_path, monkeypatch):
    from dpo.evaluation import report

    monkeypatch.setattr(report, "markdown", lambda metrics, rows: "")  # the tables are not what is tested here
    monkeypatch.setattr(report, "page", lambda metrics, rows: "")
    report.write_eval_folder(tmp_path, {"kl": float("nan")}, [{"policy_score": float("-inf"), "prompt": "p"}], None)
    assert strict((tmp_path / "eval" / "metrics.json").read_text()) == {"kl": None}
    assert strict((tmp_path / "eval" / "generations.jsonl").read_text()) == {"policy_score": None, "prompt": "p"}


def test_a_run_whose_metric_is_nan_writes_strict_final_metrics(tiny_model_dir, truthy_file, tmp_path, monkeypatch):
    """One whole run: a non-finite metric (here train_loss, as a diverged eval loss would be) is written as null;
    final_metrics.json, run_complete.json and every other JSON file of the folder parse strictly."""
    import dpo.train.trainer as trainer

    real = trainer.whole_run_metrics
    monkeypatch.setattr(trainer, "whole_run_metrics", lambda *a: {**real(*a), "train_loss": float("nan")})
    out = tmp_path / "run"
    data = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=out)
    load_recipe("dpo_phi2").main([*data, *cli(gradient_accumulation_steps=1, test_size=0, max_steps=1)])
    assert strict((out / "final_metrics.json").read_text())["train_loss"] is None
    ours = [p for p in out.rglob("*.json") if p.name != "trainer_state.json"]  # trainer_state.json: transformers'
    assert len(ours) >= 2 and all(strict(p.read_text()) is not None for p in ours)


# json.dumps outside dpo/files.py that writes no file: text that is hashed or compared, a log line. Any other
# json.dumps / json.dump in dpo/, recipes/ or benchmarks/ would be a writer that bypasses the strict path.
NOT_WRITERS = {
    "dpo/data/doctor_report.py": "a pair's hash",
    "dpo/rounds/prompts.py": "a prompt's de-duplication key",
    "dpo/train/config.py": "a round trip to plain types, not written",
    "dpo/train/safety/runs.py": "the training data's sha256",
    "dpo/train/speed/refstore.py": "the reference cache's key hash",
    "dpo/evaluation/gguf.py": "a log line",
    "recipes/dpo_rounds.py": "the prompts' sha256",
    "dpo/data/tools.py": "a row's tools as the JSON text TRL's tokenizer reads (in memory)",
    "dpo/data/formats.py": "a tool call's arguments in the text compared for identical answers (in memory)",
    "benchmarks/real_plan.py": "the held-out rows' sha256",
    "benchmarks/fork_runner.py": "the fork server's requests and answers on its pipes",
    "dpo/data/nested.py": "tools given as text, kept text through datasets' Json type (in memory)",
}


def json_dump_calls(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("dump", "dumps")
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "json"
        for node in ast.walk(tree)
    )


def test_every_json_writer_goes_through_the_strict_text():
    found = {}
    for folder in ("dpo", "recipes", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name != "dpo/files.py" and json_dump_calls(path):
                found[name] = json_dump_calls(path)
    assert set(found) == set(NOT_WRITERS), f"json.dump(s) outside dpo/files.py json_text: {found}"
    assert all(count == 1 for count in found.values()), found
