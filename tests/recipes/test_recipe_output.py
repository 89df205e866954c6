"""What the recipes print about the run: the first pair cut to what the model sees (dpo.log.preview),
and, when done, only the final files that were written (dpo.train.trainer.written_summary)."""

import json
import re

import pytest
from helpers import load_recipe

from dpo.log import PREVIEW_CHARS
from dpo.offline.tiny import truthy_like_rows, write_jsonl


@pytest.mark.parametrize("recipe_name", ["dpo_any", "dpo_phi2"])
def test_a_long_first_pair_is_printed_cut_to_what_the_model_sees(
    recipe_name, tiny_model_dir, tmp_path, capsys, no_weights_load
):
    rows = truthy_like_rows(8, seed=0)
    rows[0]["chosen"] = "Yes. " + "very " * 40_000 + "true."  # one 200 kB answer
    data = write_jsonl(rows, tmp_path / "long.jsonl")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", tmp_path / "out"]
    argv += [
        "--max_length",
        "128",
        "--test_size",
        "0",
        "--reference_cache",
        "false",
        "--gradient_accumulation_steps",
        "1",
    ]
    with pytest.raises(AssertionError, match="weights were loaded"):  # the log line comes just before
        load_recipe(recipe_name).main([str(a) for a in argv])
    log = capsys.readouterr().out
    shown = log.split("the first as the model sees it:\n", 1)[1].split("\n[dpo-recipes]", 1)[0].rstrip("\n")
    assert rows[0]["prompt"] in shown and "Yes. very very" in shown and "true." not in shown
    note = re.search(r"\[the model sees the first max_length=128 of ([\d,]+) tokens\]$", shown)
    assert note and int(note.group(1).replace(",", "")) > 40_000, shown[-300:]
    assert len(shown) < PREVIEW_CHARS + 200 and len(log) < 20_000


def test_a_pair_longer_than_the_preview_says_how_many_characters_are_not_shown(tiny_model_dir):
    from dpo.log import preview
    from dpo.train.model_checks import load_tokenizer

    text = "Question? " + "x" * (3 * PREVIEW_CHARS)
    shown = preview(text, load_tokenizer(str(tiny_model_dir)), max_length=10**6)  # no token cut
    assert shown == text[:PREVIEW_CHARS] + f"…\n[{len(text) - PREVIEW_CHARS:,} more characters not shown]"
    assert preview("short pair", load_tokenizer(str(tiny_model_dir)), max_length=64) == "short pair"


@pytest.mark.slow
@pytest.mark.parametrize("logging_steps, plotted", [(10, False), (1, True)], ids=["nothing_logged", "logged"])
def test_done_names_only_the_final_files_written(
    tiny_model_dir, truthy_file, tmp_path, capsys, logging_steps, plotted
):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", out]
    argv += ["--max_steps", "1", "--logging_steps", str(logging_steps), "--gradient_accumulation_steps", "1"]
    argv += ["--logging_first_step", str(plotted)]  # the recipes log step 1 by default (dpo/train/config.py)
    load_recipe("dpo_phi2").main([str(a) for a in argv])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f" in {out}"), last
    assert ("training_curves.png" in last) == plotted == (out / "training_curves.png").is_file(), last
    written = json.loads((out / "run_complete.json").read_text())["files"]
    for name in ("resolved_config.yaml", "final_metrics.json"):
        assert name in last and name in written
    assert "adapter" in last and "adapter_model.safetensors" in written


def test_the_same_command_on_a_finished_run_says_it_trains_it_again(tiny_model_dir, truthy_file, tmp_path, capsys):
    """Rerunning a finished run with the same command trained it again from scratch without a word."""
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file), "--max_steps", "1"]
    argv += ["--output_dir", str(tmp_path / "out"), "--gradient_accumulation_steps", "1", "--test_size", "0"]
    argv += ["--save_strategy", "no", "--per_device_train_batch_size", "2", "--max_length", "64"]
    load_recipe("dpo_phi2").main(argv)
    assert "holds this same run" not in capsys.readouterr().out
    load_recipe("dpo_phi2").main(argv)
    said = capsys.readouterr().out
    assert "holds this same run, finished at step 1: it is trained again from the start" in said, said
