"""Settings that would reverse, zero or silently break training, tokens in the config, an unusable
output_dir, pickled model weights and argument parse errors: each stops the real recipe entry point
with one `error:` line and exit status 2, before any weights load (the `no_weights_load` fixture
fails the test if they do). docs/reliability.md lists these cases; tests/test_reliability_doc.py
checks that every test it names exists."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, load_recipe, message_lines, one_line_error

from dpo.errors import UserError


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dpo_phi2")


@pytest.fixture
def local(tiny_model_dir, truthy_file, tmp_path):
    return ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)] + [
        "--output_dir",
        str(tmp_path / "out"),
    ]


# ── settings that reverse or zero the preference, or that TRL/PEFT would ignore or crash on ──────

BAD_SETTINGS = {
    "beta_zero": (["--beta", "0"], "beta must be positive"),
    "beta_negative": (["--beta", "-0.1"], "beta must be positive"),
    "label_smoothing_ignored_by_sigmoid": (["--label_smoothing", "0.1"], "label_smoothing=0.1 is not used"),
    "label_smoothing_flips_robust": (["--loss_type", "robust", "--label_smoothing", "0.5"], "[0, 0.5)"),
    "label_smoothing_negative_aot": (["--loss_type", "aot", "--label_smoothing", "-0.1"], "[0, 0.5)"),
    "exo_pair_without_label_smoothing": (["--loss_type", "exo_pair"], "'exo_pair' needs label_smoothing > 0"),
    "unknown_loss_type": (["--loss_type", "dpo"], "Unknown loss type(s) ['dpo']"),
    "cdpo_is_not_a_trl_loss": (["--loss_type", "cdpo"], "Unknown loss type(s) ['cdpo']"),
    "loss_weights_wrong_length": (["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0"], "loss_weights"),
    "learning_rate_zero": (["--learning_rate", "0"], "learning_rate must be > 0"),
    "learning_rate_negative": (["--learning_rate=-1e-5"], "learning_rate must be > 0"),
    "train_batch_size_zero": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    "eval_batch_size_zero": (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1"),
    "accumulation_zero": (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1"),
    "lora_r_zero": (["--lora_r", "0"], "lora_r must lie in [1, 65536]"),
    "lora_alpha_zero": (["--lora_alpha", "0"], "lora_alpha must be > 0; got 0"),  # scale alpha/r = 0
    "max_length_zero": (["--max_length", "0"], "max_length must be >= 1"),  # not "every row was dropped"
    "lora_dropout_one": (["--lora_dropout", "1.0"], "lora_dropout must lie in [0, 1)"),
    "lora_dropout_negative": (["--lora_dropout", "-0.1"], "lora_dropout must lie in [0, 1)"),
    "max_steps_zero": (["--max_steps", "0"], "max_steps must be >= 1"),
    "num_train_epochs_zero": (["--num_train_epochs", "0"], "num_train_epochs must be > 0"),
    "f_divergence_with_bco": (["--loss_type", "bco_pair", "--f_divergence_type", "js_divergence"], "bco_pair"),
    "wpo_weighting_with_aot": (["--loss_type", "aot", "--use_weighting", "true"], "cannot weight 'aot'"),
    "ld_alpha_above_one": (["--ld_alpha", "1.5"], "ld_alpha must lie in [0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_is_refused_before_weights_load(case, recipe, local, capsys, no_weights_load):
    flags, expected = BAD_SETTINGS[case]
    line = one_line_error(recipe.main, [*local, *flags], capsys)
    assert expected in line, line


def test_every_problem_is_named_at_once(recipe, local, capsys, no_weights_load):
    line = one_line_error(recipe.main, [*local, "--beta", "0", "--lora_r", "0", "--max_steps", "0"], capsys)
    assert "beta" in line and "lora_r" in line and "max_steps" in line


@pytest.mark.parametrize(
    "flags",
    [
        ["--beta", "1e-4"],
        ["--loss_type", "robust", "--label_smoothing", "0.49"],
        ["--loss_type", "exo_pair", "--label_smoothing", "1e-3"],
        ["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"],
        ["--lora_dropout", "0"],
        ["--max_steps", "1"],
    ],
)
def test_edge_values_that_are_valid_pass(flags, local):
    from dpo.compat import ModelConfig
    from dpo.gate.check import check_settings
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    recipe = load_recipe("dpo_phi2")
    _, training, model, _ = parse_recipe_args(  # as the recipe parses it
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), ROOT / "recipes" / "dpo_phi2.yaml", [*local, *flags]
    )
    check_settings(training, model)  # raises on a false alarm


@pytest.mark.parametrize(
    "name, config",
    [
        ("dpo_phi2", "dpo_phi2.yaml"),
        ("dpo_any", "dpo_any.yaml"),
        ("dpo_any", "dpo_hh_rlhf.yaml"),
        ("dpo_any", "dpo_smollm2_hh.yaml"),
        ("dpo_sentiment_tiny", "dpo_sentiment_tiny.yaml"),
    ],
)
def test_every_shipped_yaml_passes_the_checks(name, config):
    from dpo.compat import ModelConfig
    from dpo.gate.check import check_settings
    from dpo.gate.credentials import check_no_secrets
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    recipe = load_recipe(name)
    _, training, model, _ = parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), ROOT / "recipes" / config, []
    )
    check_settings(training, model)
    check_no_secrets(training, model)


# ── argument parse errors: one line naming the flag and what it accepts, not the usage ─────────


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--beta", "abc"], ["--beta (on the command line)", "'abc'", "accepted: a number"]),
        (["--lr_scheduler_type", "foo"], ["--lr_scheduler_type", "'foo'", "accepted: one of linear, cosine"]),
        (["--load_in_4bit", "maybe"], ["--load_in_4bit", "maybe", "true/false"]),
        (["--per_device_train_batch_size", "1.5"], ["--per_device_train_batch_size", "accepted: a whole number"]),
        (["--beta"], ["--beta", "expected one argument", "accepted: a number"]),
        (["--learning_rate", "-1e-5", "--beta", "0.1"], ["--learning_rate", "--learning_rate=-1e-5"]),
    ],
    ids=["not_a_number", "invalid_choice", "bad_boolean", "float_for_int", "missing_value", "negative_number"],
)
def test_parse_error_is_one_line_naming_flag_and_accepted_values(flags, expected, recipe, local, capsys):
    line = one_line_error(recipe.main, [*local, *flags], capsys)
    assert all(e in line for e in expected), line


def test_parse_error_in_yaml_names_the_yaml(recipe, local, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "recipes" / "dpo_phi2.yaml").read_text().replace("beta: 0.1", "beta: high"))
    line = one_line_error(recipe.main, ["--config", str(config), *local], capsys)
    assert f"--beta (in {config})" in line and "'high'" in line, line


# ── tokens anywhere in the config ──────────────────────────────────────────────────────────────

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize(
    "extra, where",
    [
        ({"model_init_kwargs": {"token": "not-even-hf-shaped"}}, "model_init_kwargs.token"),
        ({"run_name": FAKE_TOKEN}, "run_name"),
        ({"model_init_kwargs": {"revision": "main", "headers": [FAKE_TOKEN]}}, "model_init_kwargs.headers[0]"),
    ],
    ids=["model_init_kwargs_token", "hf_token_as_a_value", "hf_token_nested_in_a_list"],
)
def test_token_anywhere_in_the_config_is_refused_and_never_written(
    extra, where, recipe, local, tmp_path, capsys, no_weights_load
):
    config = tmp_path / "with_token.yaml"
    settings = yaml.safe_load((ROOT / "recipes" / "dpo_phi2.yaml").read_text())
    config.write_text(yaml.safe_dump({**settings, **extra}))
    line = one_line_error(recipe.main, ["--config", str(config), *local], capsys)
    assert where in line and "HF_TOKEN" in line, line
    assert FAKE_TOKEN not in line and "not-even-hf-shaped" not in line
    assert not (tmp_path / "out").exists()  # no resolved_config.yaml, no training_args.bin


def test_build_dpo_trainer_refuses_a_token_too(tiny_model_dir, no_weights_load):
    """Notebooks and scripts that build the trainer without load_recipe_args are covered as well."""
    from dpo.compat import DPOConfig, ModelConfig
    from dpo.train.trainer import build_dpo_trainer

    training = DPOConfig(output_dir="unused", model_init_kwargs={"token": FAKE_TOKEN}, use_cpu=True, bf16=False)
    with pytest.raises(UserError, match=r"model_init_kwargs\.token"):
        build_dpo_trainer(ModelConfig(model_name_or_path=str(tiny_model_dir)), training, None, None, None)


# ── output_dir ─────────────────────────────────────────────────────────────────────────────────


def test_output_dir_that_is_a_file(recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(a_file)], capsys)
    assert f"output_dir {a_file} is a file" in line
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(a_file / "run1")], capsys)
    assert f"{a_file} is a file" in line


def test_output_dir_not_writable(recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load):
    """/proc takes no new folders, even for root; a read-only folder is checked when not root."""
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", "/proc/dpo-out"], capsys)
    assert "output_dir /proc/dpo-out is not writable" in line
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_line_error(recipe.main, [*argv, "--output_dir", str(locked / "run")], capsys)
        assert "is not writable" in line
    ok = tmp_path / "new" / "run"
    from dpo.gate.output_dir import check_output_dir

    check_output_dir(ok)  # a creatable folder passes, and the check leaves nothing behind
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def model_copy(tiny_model_dir, folder):
    """A copy of the tiny model with a README.md of the user's own; returns (folder, its files' bytes)."""
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("my own notes on this model")
    return folder, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("where", ["model folder", "inside the model folder"])
@pytest.mark.parametrize("name", ["dpo_phi2", "sft_phi2"])
def test_output_dir_in_the_model_folder_is_refused(
    name, where, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    model, files = model_copy(tiny_model_dir, tmp_path / "my-model")
    out = model if where == "model folder" else model / "runs" / "first"
    argv = ["--model_name_or_path", model, "--dataset_name", truthy_file, "--output_dir", out]
    line = one_line_error(load_recipe(name).main, argv, capsys)
    assert f"--output_dir {out} " in line and f"model folder {model}" in line, line
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == files  # nothing written
    assert not (model / "runs").exists()


@pytest.mark.parametrize(
    "given_as, where",
    [
        ("--sft_adapter_path", "adapter"),
        ("--sft_adapter_path", "inside"),
        ("--model_name_or_path", "adapter"),
        ("--model_name_or_path", "inside"),
        ("--model_name_or_path", "base"),  # with --sft_adapter_path, the base is the model: the test above
    ],
)
def test_output_dir_in_the_sft_adapter_folder_or_its_base_is_refused(
    given_as, where, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """Checked with the arguments as given, before the adapter is read: an adapter folder given as the
    model protects the local base its adapter_config.json names as well."""
    base, files = model_copy(tiny_model_dir, tmp_path / "base")
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "README.md").write_text("the SFT run's card")
    out = {"adapter": adapter, "inside": adapter / "dpo", "base": base}[where]
    model = ["--model_name_or_path", adapter] if given_as == "--model_name_or_path" else []
    if given_as == "--sft_adapter_path":
        model = ["--model_name_or_path", base, "--sft_adapter_path", adapter]
    line = one_line_error(
        load_recipe("dpo_any").main, [*model, "--dataset_name", truthy_file, "--output_dir", out], capsys
    )
    what = "base model" if where == "base" else ("model" if given_as == "--model_name_or_path" else "SFT adapter")
    assert f"{what} folder" in line and "pick an --output_dir outside it" in line, line
    assert (adapter / "README.md").read_text() == "the SFT run's card"
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == files


# ── model folders without a usable tokenizer ───────────────────────────────────────────────────


def without_tokenizer(tiny_model_dir, folder):
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    return folder


def empty_vocabulary(tiny_model_dir, folder):
    """Tokenizer files that load but hold no vocabulary: what transformers builds for a folder without any."""
    from transformers import AutoTokenizer

    without_tokenizer(tiny_model_dir, folder)
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # the empty GPT-2 tokenizer, saved
    return folder


@pytest.mark.parametrize(
    "make, expected", [(without_tokenizer, "has no tokenizer files"), (empty_vocabulary, "to 0 tokens")]
)
@pytest.mark.parametrize("name", ["dpo_phi2", "dpo_any", "sft_phi2", "dpo_sentiment_tiny"])
def test_model_folder_without_a_usable_tokenizer_is_refused(
    name, make, expected, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """transformers turns such a folder into an empty-vocabulary tokenizer: every text 0 tokens, margins 0,
    train_loss 0, exit 0. Refused, naming the folder, before any weights load."""
    model = make(tiny_model_dir, tmp_path / "model")
    data = [] if name == "dpo_sentiment_tiny" else ["--dataset_name", truthy_file]
    line = one_line_error(
        load_recipe(name).main, ["--model_name_or_path", model, *data, "--output_dir", tmp_path / "out"], capsys
    )
    assert expected in line and str(model) in line, line


# ── model folders without safetensors ──────────────────────────────────────────────────────────


def test_model_with_only_pickled_weights(recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load):
    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    argv = ["--model_name_or_path", str(pickled), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "pytorch_model.bin" in line and "safetensors are required" in line
    assert "save_pretrained" in line and "use_safetensors=False" in line  # how to convert


def test_pickled_weights_beside_a_stray_safetensors_file(
    recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """A *.safetensors that is not model.safetensors (a backup, an adapter) beside pytorch_model.bin: the check
    used to pass it and from_pretrained(use_safetensors=True) failed with a traceback."""
    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "model-backup.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    argv = ["--model_name_or_path", str(pickled), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "has only pickled weights (pytorch_model.bin) (model-backup.safetensors beside them is not" in line, line
    (pickled / "pytorch_model.bin").unlink()
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "has no weights: no model.safetensors" in line and "model-backup.safetensors is not loaded" in line, line


def test_a_weight_index_naming_a_shard_outside_the_folder_is_refused(
    recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """model.safetensors.index.json maps tensors to shard files: each must lie inside the model folder."""
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (tmp_path / "elsewhere").mkdir()
    (sharded / "model.safetensors").rename(tmp_path / "elsewhere" / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere/model-00001-of-00001.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    argv = ["--model_name_or_path", str(sharded), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "model.safetensors.index.json lists '../elsewhere/model-00001-of-00001.safetensors'" in line, line


def test_model_folder_without_weights(recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load):
    empty = tmp_path / "config-only"
    shutil.copytree(tiny_model_dir, empty)
    (empty / "model.safetensors").unlink()
    argv = ["--model_name_or_path", str(empty), "--dataset_name", str(truthy_file)]
    line = one_line_error(recipe.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "has no weights" in line


# ── the real command line: a fresh process, one line, no traceback ─────────────────────────────


@pytest.mark.parametrize("script, flags, expected", [("dpo_any.py", ["--beta", "0"], "beta must be positive")])
def test_command_line_prints_one_line_and_exits_2(script, flags, expected, tiny_model_dir, truthy_file, tmp_path):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), *argv, "--output_dir", str(tmp_path / "out"), *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not result.stdout.strip()  # nothing was logged: it stopped before the model phase


def test_test_size_that_cannot_split(recipe, local, capsys, no_weights_load):
    line = one_line_error(recipe.main, [*local, "--test_size", "1.5"], capsys)
    assert "test_size must lie in [0, 1); got 1.5" in line, line  # the settings gate, before the data is read
