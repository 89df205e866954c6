"""The rounds recipe's advice can be followed: each `error:` that says to change a setting or delete something is
followed here by doing exactly that, in the same folder, and the run then works; a plan refusal comes before
any model work; --overwrite_output_dir starts the rounds over, deleting only what the recipe wrote.

Was: after "only 0 pairs ... lower min_margin" (or the warm-up plan refusal, which came only after the starting
model was trained and sampled), the rerun as told answered "holds rounds run with other settings ... use another
--output_dir" though no round had finished, and --overwrite_output_dir true was ignored."""

import json
import shutil

import pytest
import yaml
from helpers import load_recipe, one_line_error
from test_rounds import reward_module, settings, write_config  # noqa: F401  (reward_module: the tests' fixture)

from dpo.evaluation.model_card import recipe_of

pytestmark = pytest.mark.usefixtures("one_torch_thread", "reward_module")  # rounds_test_rewards importable


def run_rounds(values, folder, argv=()):
    return load_recipe("dpo_rounds").main([*write_config(folder / "rounds.yaml", values), *map(str, argv)])


def sentiment_settings(out, **overrides) -> dict:
    """The sentiment task, its starting model trained by the recipe (a few steps: nothing here measures it)."""
    values = settings(None, "sentiment", out, reward="dpo.rounds.sentiment:ground_truth", **overrides)
    del values["model_name_or_path"]
    return {**values, "sft_examples": 64, "sft_steps": 2, "task_prompts": 16}


def test_a_warm_up_plan_is_refused_before_the_starting_model_is_trained_or_sampled(tmp_path, capsys, no_weights_load):
    """8 prompts a round, a quarter held out: at most 6 pairs, 3 steps of 2, all inside a 5-step warm-up. The
    sentiment task would first train its starting model, then sample: neither happens."""
    out = tmp_path / "run"
    values = sentiment_settings(out, warmup_steps=5)
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert "round 1 trains on at most 6 pairs" in line and "warmup_steps" in line, line
    assert not (out / "sft_reference").exists() and not (out / "round-1").exists()


@pytest.mark.slow
def test_advice_after_a_refused_plan_and_a_round_without_pairs_works_in_the_same_folder(
    tiny_model_dir,
    truthy_file,
    tmp_path,
    capsys,
):
    """The plan refusal says "lower warmup_steps": done, with a min_margin no pair reaches; that round stops with
    "lower min_margin": done; the run then finishes in that folder, round 1's samples kept (only settings applied
    after sampling changed)."""
    out = tmp_path / "run"
    values = settings(tiny_model_dir, truthy_file, out, rounds=1, warmup_steps=5)
    line = one_line_error(run_rounds, [values, tmp_path], capsys) if False else None
    with pytest.raises(SystemExit) as stop:
        run_rounds(values, tmp_path)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "lower warmup_steps" in err and not (out / "round-1").exists(), err

    values = {**values, "warmup_steps": 0, "min_margin": 1.0e6}  # answers differ by tens of characters at most
    with pytest.raises(SystemExit) as stop:
        run_rounds(values, tmp_path)
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert stop.value.code == 2 and len(line) == 1 and "lower min_margin" in line[0], err
    samples = (out / "round-1" / "samples.jsonl").read_bytes()

    summary = run_rounds({**values, "min_margin": 0.0}, tmp_path)
    err = capsys.readouterr().out  # the log
    assert "round 1 starts over, its samples kept" in err and "min_margin" in err, err
    assert (out / "round-1" / "samples.jsonl").read_bytes() == samples  # not sampled again
    assert [r["round"] for r in summary["rounds"]] == [1] and (out / "round-1" / "run_complete.json").is_file()
    assert json.loads((out / "rounds_settings.json").read_text())["settings"]["min_margin"] == 0.0
    # the round's resolved_config.yaml (its card's Reproduce) is the rounds run's --config: the same run, found done
    resolved = out / "round-1" / "resolved_config.yaml"
    assert recipe_of(yaml.safe_load(resolved.read_text())) == "recipes/dpo_rounds.py"
    assert load_recipe("dpo_rounds").main(["--config", str(resolved)])["rounds"] == summary["rounds"]
    assert "round 1: done earlier" in capsys.readouterr().out
    del line


@pytest.mark.slow
def test_other_settings_after_a_dpo_run_began_name_overwrite_which_deletes_only_the_rounds_files(
    tiny_model_dir, truthy_file, tmp_path, capsys, monkeypatch
):
    """Round 1's DPO run stopped by Ctrl-C with a checkpoint. A rerun with another learning rate would throw that
    training away: refused, naming the ways out. Each followed: the same command (as the stop line says) finishes
    the round from its checkpoint; --overwrite_output_dir true with the other settings deletes the rounds and
    runs them again. A file of the user's in the folder stays."""
    out = tmp_path / "run"
    values = settings(tiny_model_dir, truthy_file, out, rounds=1, save_strategy="steps", save_steps=100)
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", "step:1:SIGINT")
    with pytest.raises(SystemExit):
        run_rounds(values, tmp_path)
    monkeypatch.delenv("DPO_TEST_SIGNAL_AT")
    assert "Resume by running the same command again" in capsys.readouterr().err
    assert list((out / "round-1").glob("checkpoint-*"))
    (out / "notes.txt").write_text("mine")
    other = {**values, "learning_rate": 5.0e-3}
    with pytest.raises(SystemExit) as stop:
        run_rounds(other, tmp_path)
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1, err
    for way in ("learning_rate", "DPO run began", "the same settings to continue", "--overwrite_output_dir true"):
        assert way in errors[0], errors

    summary = run_rounds(values, tmp_path)  # the same command again
    assert "resuming its DPO run from" in capsys.readouterr().out and summary["rounds"][0]["round"] == 1

    summary = run_rounds(other, tmp_path, ["--overwrite_output_dir", "true"])
    log = capsys.readouterr().out
    assert "--overwrite_output_dir: deleted round-1" in log and "not written by the rounds recipe" not in log, log
    assert [r["round"] for r in summary["rounds"]] == [1] and (out / "notes.txt").read_text() == "mine"
    assert not (out / "round-1" / "checkpoint-1").exists()  # the stopped run's (the new one saves its last step)
    assert json.loads((out / "rounds_settings.json").read_text())["training"]["learning_rate"] == 5.0e-3


def prompts_file(path, prompts):
    rows = [{"prompt": p, "chosen": "yes", "rejected": "no"} for p in prompts for _ in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_too_few_prompts_get_advice_that_can_be_followed(tiny_model_dir, tmp_path, capsys, no_weights_load):
    """Was: one distinct prompt was told "lower eval_prompts", which is at least 1 already."""
    one = prompts_file(tmp_path / "one.jsonl", ["Why is the sky blue?"])
    values = settings(tiny_model_dir, one, tmp_path / "o", reward="dpo.rounds.sentiment:ground_truth")
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert "1 distinct usable prompt(s)" in line and "at least 2" in line and "lower eval_prompts" not in line
    three = prompts_file(tmp_path / "three.jsonl", ["Why is the sky blue?", "What is 2 + 2?", "Name a colour."])
    values = {**values, "prompts": str(three), "prompts_per_round": 0, "test_size": 0.0, "min_pairs": 1}
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert "set eval_prompts to 2 or less" in line, line
    with pytest.raises(AssertionError, match="weights were loaded"):  # followed: past every check, to the model
        load_recipe("dpo_rounds").main(write_config(tmp_path / "r.yaml", {**values, "eval_prompts": 2}))


@pytest.mark.slow
def test_a_starting_model_saved_without_its_tokenizer_is_to_be_deleted_which_works(tmp_path, capsys, monkeypatch):
    """Was: "Save the tokenizer of the model it came from into it", for a folder the recipe itself writes."""
    recipe = load_recipe("dpo_rounds")
    out = tmp_path / "run"
    values = sentiment_settings(out, rounds=1)
    argv = write_config(tmp_path / "r.yaml", values)

    def stopped(*_):
        raise KeyboardInterrupt  # the starting model is trained and scored; stop before round 1

    monkeypatch.setattr(recipe, "run_rounds", stopped)
    with pytest.raises(SystemExit):
        recipe.main(argv)
    reference = out / "sft_reference"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        (reference / name).unlink(missing_ok=True)
    capsys.readouterr()
    line = one_line_error(recipe.main, argv, capsys)
    assert f"delete {reference} and run the same command again" in line, line
    shutil.rmtree(reference)  # as told
    with pytest.raises(SystemExit) as stop:
        recipe.main(argv)
    assert stop.value.code == 130 and (reference / "model.safetensors").is_file()  # trained again, stopped as before
    assert "error:" not in capsys.readouterr().err


def chat_prompts_file(path, prompts):
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for p in prompts
        for a in ("yes", "sure")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_chat_template_file_renders_the_rounds_chat_prompts_and_is_refused_for_text_ones(
    tiny_model_dir, tmp_path, capsys, no_weights_load
):
    """chat_template_path was accepted by the rounds and silently ignored: the policy sampled and trained with
    its own template."""
    from helpers import ROOT

    template = ROOT / "tests" / "data" / "fixtures" / "tool_chat_template.jinja"  # Qwen2.5-style
    prompts = ["Why is the sky blue?", "What is 2 + 2?", "Name a colour.", "Say hi."]
    values = settings(tiny_model_dir, chat_prompts_file(tmp_path / "chat.jsonl", prompts), tmp_path / "o")
    values.update(reward="dpo.rounds.sentiment:ground_truth", chat_template_path=str(template), eval_prompts=2)
    values.update(prompts_per_round=0, test_size=0.0, min_pairs=1)
    with pytest.raises(AssertionError, match="weights were loaded"):  # past every check, to the model
        load_recipe("dpo_rounds").main(write_config(tmp_path / "r.yaml", values))
    shown = capsys.readouterr().out
    assert "continues, e.g.: '<|im_start|>user\\n" in shown, shown  # the file's template (the tiny model has none)
    sentiment = {**values, "prompts": "sentiment", "output_dir": str(tmp_path / "o2")}  # the demo's text prompts
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", sentiment), capsys)
    assert f"chat_template_path {template}: the prompts of sentiment are text" in line, line
