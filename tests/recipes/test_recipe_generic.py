"""recipes/dpo_any.py end to end on the tiny offline Phi model (real bitsandbytes 4-bit + LoRA on
all linear layers, on CPU), on rows in UltraFeedback's and Anthropic HH's exact shapes; and
recipes/dpo_hh_rlhf.yaml, the README's worked second recipe, on HH rows."""

import json

import pytest
from helpers import ROOT, cli, h4_ultrafeedback_rows, hh_rows, load_recipe, one_line_error

from dpo.data.formats import PLAIN_CHAT_TEMPLATE
from dpo.offline.tiny import write_jsonl

FAST = cli(max_steps=2, gradient_accumulation_steps=1, per_device_train_batch_size=2, eval_steps=2, logging_steps=1)
FAST += cli(save_strategy="no")
PHI_LINEAR = {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dpo_any")


@pytest.mark.slow
def test_generic_recipe_trains_on_ultrafeedback_rows_doctor_first(recipe, tiny_model_dir, tmp_path, capsys):
    import bitsandbytes as bnb

    rows = h4_ultrafeedback_rows(20)
    rows[5]["chosen"][1]["content"] = " "  # row 6: empty answer
    rows.append(json.loads(json.dumps(rows[0])))  # row 21: duplicate of row 1
    data = write_jsonl(rows, tmp_path / "uf.jsonl")
    out = tmp_path / "out"
    trainer = recipe.main(
        ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out), *FAST]
    )
    stdout = capsys.readouterr().out

    # the doctor's table comes before any weights are loaded, with every drop counted
    doctor_at = stdout.index(f"data doctor: {data}")
    assert doctor_at < stdout.index("trainable parameters")
    assert (  # H4's score_chosen / score_rejected check every pair's orientation (dpo/data/preferences.py)
        "conversational, prompt = shared turns (prompt, chosen, rejected, checked by score_chosen / score_rejected, "
        "ties dropped); chat format, plain template" in stdout
    )
    assert "1  empty chosen or rejected: row 6" in stdout and "1  duplicate of an earlier row: row 21" in stdout
    assert "rows kept      19" in stdout
    assert "no split 'test'" in stdout  # a local file: held out test_size of train instead
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == 19

    # 4-bit base, LoRA on every linear layer, no reference copy
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    lora_layers = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n
    }
    assert lora_layers == PHI_LINEAR
    assert trainer.ref_model is None and trainer.state.global_step == 2

    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "final_metrics.json",
        "training_curves.png",
        "data_lengths.png",
        "resolved_config.yaml",
    ):
        assert (out / name).is_file(), name
    saved_targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[-1] for t in saved_targets} == PHI_LINEAR and len(saved_targets) == 2 * len(PHI_LINEAR)
    # the template the data was formatted with is saved with the tokenizer, for inference
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == PLAIN_CHAT_TEMPLATE

    # a rerun with other data and settings is refused, and leaves the finished run's files as they were: the
    # length histogram too (was drawn by the doctor before the output folder was checked)
    histogram = (out / "data_lengths.png").read_bytes()
    other = write_jsonl(h4_ultrafeedback_rows(40)[20:], tmp_path / "uf2.jsonl")
    argv = [
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        other,
        "--output_dir",
        out,
        *FAST,
        "--beta",
        "0.3",
    ]
    with pytest.raises(SystemExit) as refused:
        recipe.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "holds a finished run with different settings" in err, err
    assert (out / "data_lengths.png").read_bytes() == histogram


@pytest.mark.slow
def test_hh_rlhf_recipe_yaml_trains_on_hh_rows(recipe, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(hh_rows(12), tmp_path / "hh.jsonl")
    out = tmp_path / "hh_out"
    trainer = recipe.main(
        [
            *cli(
                config=ROOT / "recipes" / "dpo_hh_rlhf.yaml",
                model_name_or_path=tiny_model_dir,
                dataset_name=data,
                output_dir=out,
                test_size="0.25",
            ),
            *FAST,
        ]
    )
    stdout = capsys.readouterr().out
    assert "Human/Assistant transcripts, prompt = shared turns (chosen, rejected); chat format" in stdout
    assert "truncated by max_length=512" in stdout
    assert trainer.args.beta == 0.1 and trainer.args.max_length == 512  # the YAML's settings
    assert len(trainer.train_dataset) == 9 and len(trainer.eval_dataset) == 3
    assert (out / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert "eval_rewards/accuracies" in metrics


def test_degenerate_rows_fail_stops_before_any_weights_load(recipe, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import dpo.train.trainer

    monkeypatch.setattr(dpo.train.trainer, "build_dpo_trainer", lambda *a, **k: pytest.fail("weights were loaded"))
    rows = h4_ultrafeedback_rows(4)
    rows[2]["rejected"] = rows[2]["chosen"]  # row 3: identical
    data = write_jsonl(rows, tmp_path / "uf.jsonl")
    with pytest.raises(SystemExit) as info:
        recipe.main(
            cli(
                model_name_or_path=tiny_model_dir, dataset_name=data, output_dir=tmp_path / "o", degenerate_rows="fail"
            )
        )
    assert info.value.code == 2
    assert "1 chosen identical to rejected; first: row 3" in capsys.readouterr().err


def test_no_recipe_shadows_the_dpo_package():
    """`python recipes/x.py` puts recipes/ first on the import path: a recipes/dpo.py would be
    imported instead of the dpo package by every recipe script."""
    assert not [
        p.name for p in (ROOT / "recipes").glob("*.py") if p.stem in ("dpo", "trl", "transformers", "datasets")
    ]


def test_schema_error_is_one_clean_line_naming_file_row_and_field(recipe, tiny_model_dir, tmp_path, capsys):
    rows = hh_rows(3)
    rows[1]["rejected"] = ["not", "a", "transcript"]
    data = write_jsonl(rows, tmp_path / "hh.jsonl")
    with pytest.raises(SystemExit) as info:
        recipe.main(cli(model_name_or_path=tiny_model_dir, dataset_name=data, output_dir=tmp_path / "o"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {data}, row 2, field 'rejected': expected text" in err  # HH rows hold transcripts
    assert "Traceback" not in err


def test_yaml_defaults_and_docstring(recipe):
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    script, training, model, _ = parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), ROOT / "recipes" / "dpo_any.yaml", []
    )
    assert model.lora_target_modules == "all-linear" and model.load_in_4bit and model.use_peft
    assert script.prompt_format == "chat" and script.degenerate_rows == "drop"
    assert (script.dataset_name, script.dataset_test_split) == ("trl-lib/ultrafeedback_binarized", "test")
    assert recipe.__doc__.splitlines()[2].strip().startswith("accelerate launch recipes/dpo_any.py")
    for yaml_file in ("dpo_any.yaml", "dpo_hh_rlhf.yaml"):
        head = (ROOT / "recipes" / yaml_file).read_text().splitlines()[:6]
        assert any("accelerate launch recipes/dpo_any.py" in line for line in head), yaml_file


# ── label layouts train the right way round ─────────────────────────────────────────────────────


def review_rows(n: int, seed: int, invert: bool = False, layout: str = "label") -> list[dict]:
    """A tiny learnable set: the better review ends in "wonderful", the worse in "awful" (the only difference).
    layout "label": PKU-SafeRLHF's shape, the better one at a random position named by better_response_id
    (`invert`: the other id); "chosen": the same pairs as plain chosen/rejected, the truth without any label."""
    import random

    rng = random.Random(seed)
    things = ["the plot", "the actors", "the story", "the music", "the ending", "the pacing", "the writing"]
    rows = []
    for i in range(n):
        thing = rng.choice(things)
        good, bad, better = f" {thing} was wonderful", f" {thing} was awful", rng.randrange(2)
        responses = [good, bad] if better == 0 else [bad, good]
        prompt = f"review of the movie: {rng.choice(things)} (#{seed}.{i})"  # numbered: no duplicates
        if layout == "chosen":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
            continue
        rows.append(
            {
                "prompt": prompt,
                "response_0": responses[0],
                "response_1": responses[1],
                "better_response_id": 1 - better if invert else better,
            }
        )
    return rows


@pytest.mark.slow
def test_label_layout_trains_the_preferred_answer_up_and_an_inverted_label_down(recipe, tiny_model_dir, tmp_path):
    """recipes/dpo_any.py on label-layout data (detected: better_response_id): held-out implicit-reward
    accuracy, on pairs given as plain chosen/rejected (the truth, read without the label code), is > 0.9
    after training on the right labels and < 0.1 after training on inverted ones (a label read the wrong
    way round would train every pair backwards, as PKU's rows were)."""
    heldout = review_rows(16, seed=99, layout="chosen")  # 16 = 4 eval batches of 4: no padded batch in the mean
    accuracy = {}
    for invert in (False, True):
        folder = tmp_path / f"data_{invert}"
        folder.mkdir()
        write_jsonl(review_rows(48, seed=0, invert=invert), folder / "train.jsonl")
        write_jsonl(heldout, folder / "test.jsonl")
        out = tmp_path / f"out_{invert}"
        recipe.main(
            [
                "--model_name_or_path",
                str(tiny_model_dir),
                "--dataset_name",
                str(folder),
                "--dataset_test_split",
                "test",
                "--output_dir",
                str(out),
                "--max_length",
                "64",
                "--max_steps",
                "12",
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "1",
                "--learning_rate",
                "2e-2",  # a LoRA on a random tiny model: large, so 12 steps learn the one-token difference
                "--warmup_steps",
                "0",
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
            ]
        )
        accuracy[invert] = json.loads((out / "final_metrics.json").read_text())["eval_rewards/accuracies"]
    assert accuracy[False] > 0.9 and accuracy[True] < 0.1, accuracy


def test_a_test_split_that_copies_the_training_split_stops_before_weights_load(
    recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """The probe's case: a data folder whose test.jsonl is a copy of train.jsonl trained and reported "64 training
    pairs, 64 held out", the same rows. Now one line from the recipe, exit 2, before any weights load."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (folder / name).write_bytes(truthy_file.read_bytes())
    argv = [
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        folder,
        "--dataset_test_split",
        "test",
        "--prompt_format",
        "text",
    ]
    line = one_line_error(recipe.main, [*argv, "--output_dir", tmp_path / "out", *FAST], capsys)
    assert f"{folder} [test]: no held-out pair left: 48 of its 48 rows are training pairs (48 the same" in line, line
