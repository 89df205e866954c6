"""Bad input gives one clear message naming what is wrong (exit status 2), before any
weights are loaded. Each case runs the real recipe entry point in-process."""

import json

import pytest
from helpers import ROOT, cli, load_recipe, one_line_error


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dpo_phi2")


def fail(recipe, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # progress bars may precede it; the message itself is one `error:` line (+ indented hints)
    assert "\nerror: " in "\n" + err, err
    return err[err.index("error: ") :]


@pytest.fixture
def local(tiny_model_dir, truthy_file, tmp_path):
    return cli(
        model_name_or_path=tiny_model_dir,
        dataset_name=truthy_file,
        output_dir=tmp_path / "out",
    )


def test_unknown_yaml_key(recipe, local, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "recipes" / "dpo_phi2.yaml").read_text() + "\nlearning_rat: 1e-5\n")
    err = fail(recipe, ["--config", str(config), *local], capsys)
    assert "unknown config key(s): learning_rat" in err and str(config) in err


def test_removed_trl_option_gets_a_hint(recipe, local, tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text((ROOT / "recipes" / "dpo_phi2.yaml").read_text() + "\nrpo_alpha: 1.0\n")
    err = fail(recipe, ["--config", str(config), *local], capsys)
    assert "rpo_alpha" in err and "loss_weights" in err


def test_unknown_cli_flag(recipe, local, capsys):
    err = fail(recipe, [*local, "--betta", "0.2"], capsys)
    assert "unknown command-line key(s): betta" in err


def test_missing_config_file(recipe, capsys):
    err = fail(recipe, ["--config", "no/such.yaml"], capsys)
    assert "config file not found: no/such.yaml" in err


def test_missing_data_file(recipe, tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    err = fail(recipe, ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(missing)], capsys)
    assert str(missing) in err and "not found" in err


def test_data_missing_a_required_field(recipe, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "no_rejected.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a"}) + "\n" for i in range(4)))
    err = fail(recipe, ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data)], capsys)
    assert str(data) in err and "rejected" in err


def test_data_field_of_wrong_type_names_file_row_and_field(recipe, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad_row.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    rows[2]["chosen"] = None  # row 3 as an editor numbers lines
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = fail(recipe, ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data)], capsys)
    assert str(data) in err and "row 3" in err and "chosen" in err


def test_lora_target_matching_nothing(recipe, local, capsys):
    err = fail(recipe, [*local, "--lora_target_modules", "Wqkv", "fc1"], capsys)
    assert "['Wqkv']" in err and "train nothing" in err and "q_proj" in err


def test_model_folder_not_found(recipe, truthy_file, tmp_path, capsys):
    err = fail(
        recipe, ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(truthy_file)], capsys
    )
    assert "model folder not found" in err


def test_hub_dataset_unreachable(recipe, tiny_model_dir, capsys):
    err = fail(recipe, ["--model_name_or_path", str(tiny_model_dir)], capsys)  # YAML: jondurbin/truthy-dpo-v0.1
    assert "could not load dataset 'jondurbin/truthy-dpo-v0.1'" in err and "--dataset_name data.jsonl" in err


def test_token_in_config_is_refused(recipe, local, capsys):
    err = fail(recipe, [*local, "--hub_token", "hf_secret"], capsys)
    assert "HF_TOKEN" in err and "hf_secret" not in err


def test_config_flag_without_a_file(recipe, capsys):
    err = fail(recipe, ["--config"], capsys)
    assert "--config needs a YAML file" in err


def test_config_equals_form_is_read(tmp_path):
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "recipes" / "dpo_phi2.yaml").read_text().replace("beta: 0.1", "beta: 0.3"))
    recipe = load_recipe("dpo_phi2")
    _, training, _, _ = parse_recipe_args(
        (recipe.ScriptArguments, RecipeDPOConfig, ModelConfig),
        ROOT / "recipes" / "dpo_phi2.yaml",
        [f"--config={other}"],
    )
    assert training.beta == 0.3


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("beta: 0.1\n  learning_rate: [1\n", ":2:16:", "mapping values are not allowed here"),
        (
            "beta: 0.1\nlora_target_modules: [q_proj, v_proj\n",
            ":3:1:",
            "while parsing a flow sequence that began at line 2",
        ),
    ],
    ids=["bad_indentation", "unclosed_list"],
)
def test_invalid_yaml_is_one_line_with_file_line_and_column(
    recipe, tmp_path, capsys, no_weights_load, text, where, problem
):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    line = one_line_error(recipe.main, ["--config", config], capsys)
    assert f"{config}{where} not valid YAML" in line and problem in line, line


def copy_model(tiny_model_dir, folder):
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize(
    "config_json, expected",
    [
        (None, "is not a model folder: it has no config.json"),
        ('{"model_type": "phi",\n  "hidden_size": 64,,\n}', "config.json is not valid JSON (line 2, column 21"),
        ('{"hidden_size": 64}', "could not load the model in folder"),  # transformers' own error, no hub hint
    ],
    ids=["missing", "invalid_json", "no_model_type"],
)
def test_local_folder_without_a_valid_config_json_is_not_a_model_folder(
    recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load, config_json, expected
):
    model = copy_model(tiny_model_dir, tmp_path / "my-model")
    if config_json is None:
        (model / "config.json").unlink()
    else:
        (model / "config.json").write_text(config_json)
    line = one_line_error(
        recipe.main,
        ["--model_name_or_path", model, "--dataset_name", truthy_file, "--output_dir", tmp_path / "o"],
        capsys,
    )
    assert str(model) in line and expected in line, line
    assert "hf download" not in line and "Hub" not in line  # a local folder gets no download hint


@pytest.mark.parametrize(
    "keep", [0.5, 100 / 534680, 4 / 534680], ids=["half", "inside_the_header", "no_header_length"]
)
def test_truncated_safetensors_is_named_before_weights_load(
    recipe, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load, keep
):
    model = copy_model(tiny_model_dir, tmp_path / "my-model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 1)])
    line = one_line_error(
        recipe.main,
        ["--model_name_or_path", model, "--dataset_name", truthy_file, "--output_dir", tmp_path / "o"],
        capsys,
    )
    assert f"{weights} is truncated or corrupt" in line and "download or copy it again" in line, line
