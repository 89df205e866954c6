"""per_device_train_batch_size: auto as the recipes read it (dpo/gate/autobatch.py, dpo/gate/table.py): the CUDA
recipes' YAML says auto with its configured micro-batch, a number on the command line replaces it, and every misuse
is one `error:` line, exit 2, before any weights load."""

from __future__ import annotations

import pytest
from helpers import ROOT, load_recipe, one_line_error

from dpo.compat import ModelConfig
from dpo.train.config import RecipeDPOConfig, parse_recipe_args


def parse(yaml_name, argv=()):
    recipe = load_recipe("dpo_any")
    return parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), ROOT / "recipes" / yaml_name, list(argv)
    )


@pytest.mark.parametrize("yaml_name", ["dpo_phi2.yaml", "dpo_any.yaml", "dpo_hh_rlhf.yaml"])
def test_the_cuda_recipes_say_auto_and_keep_their_pairs_per_step(yaml_name):
    _, training, _, _ = parse(yaml_name)
    assert training.auto_batch_base == training.per_device_train_batch_size  # auto, its configured micro-batch
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 64
    assert training.auto_batch_memory_gib is None  # the device's free memory


def test_a_number_on_the_command_line_replaces_the_yamls_auto_and_its_settings():
    _, training, _, _ = parse("dpo_phi2.yaml", ["--per_device_train_batch_size", "2"])  # the T4 setting
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 32)
    assert training.auto_batch_base is None and training.auto_batch_memory_gib is None  # not auto


def test_auto_on_the_command_line_with_a_cap():
    _, training, _, _ = parse(
        "dpo_phi2.yaml",
        ["--per_device_train_batch_size=auto", "--auto_batch_memory_gib", "15", "--auto_batch_base", "4"],
    )
    assert (training.per_device_train_batch_size, training.auto_batch_base, training.auto_batch_memory_gib) == (
        4,
        4,
        15.0,
    )


def test_auto_without_a_base_is_one_pair_per_micro_batch(tmp_path):
    yaml = tmp_path / "auto.yaml"
    text = (ROOT / "recipes" / "dpo_any.yaml").read_text()
    yaml.write_text(text.replace("auto_batch_base: 2", "# no base"))
    _, training, _, _ = parse(str(yaml))
    assert (training.per_device_train_batch_size, training.auto_batch_base) == (1, 1)


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["--per_device_train_batch_size", "2", "--auto_batch_memory_gib", "15"],
            "auto_batch_memory_gib applies only",
        ),
        (["--auto_batch_memory_gib", "0"], "auto_batch_memory_gib must be > 0"),
        (["--auto_batch_memory_gib", "nan"], "auto_batch_memory_gib must be > 0"),
        (["--auto_find_batch_size", "true"], "two automatic batch sizes"),
        (["--gradient_accumulation_steps", "auto"], "gradient_accumulation_steps"),  # auto is for the micro-batch only
        (["--per_device_eval_batch_size", "auto"], "per_device_eval_batch_size"),
    ],
)
def test_misuse_is_one_line_before_weights_load(
    argv, words, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    main = load_recipe("dpo_any").main
    base = ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", tmp_path / "out"]
    line = one_line_error(main, [*base, *argv], capsys)
    assert words in line, line


def test_the_base_without_auto_in_one_yaml_is_refused(tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load):
    yaml = tmp_path / "numbers.yaml"
    text = (ROOT / "recipes" / "dpo_any.yaml").read_text()
    yaml.write_text(text.replace("per_device_train_batch_size: auto", "per_device_train_batch_size: 2"))
    main = load_recipe("dpo_any").main
    argv = ["--config", yaml, "--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file]
    line = one_line_error(main, [*argv, "--output_dir", tmp_path / "out"], capsys)
    assert "auto_batch_base applies only with per_device_train_batch_size: auto (it is 2)" in line, line


def test_auto_is_refused_where_the_recipe_cannot_choose(
    tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    main = load_recipe("sft_phi2").main
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", tmp_path / "out"]
    line = one_line_error(main, [*argv, "--per_device_train_batch_size", "auto"], capsys)
    assert "per_device_train_batch_size auto is read by the DPO recipes only" in line, line


def test_the_relations_hold_for_arguments_built_in_code():
    """build_dpo_trainer's callers that skip the recipes' parser: the table's relation says the same."""
    from dpo.gate.check import problems

    assert problems({"auto_batch_base": 2, "per_device_train_batch_size": 2}) == []
    (mismatch,) = problems({"auto_batch_base": 2, "per_device_train_batch_size": 8})
    assert "auto_batch_base 2 marks per_device_train_batch_size auto" in mismatch and "is 8" in mismatch
    (cap,) = problems({"auto_batch_memory_gib": 15.0, "per_device_train_batch_size": 8})
    assert "auto_batch_memory_gib 15.0 applies only with per_device_train_batch_size: auto" in cap
    (fsdp,) = problems({"auto_batch_base": 2, "per_device_train_batch_size": 2, "fsdp": ["full_shard"]})
    assert "per_device_train_batch_size auto with fsdp" in fsdp
