"""The gate's other classes, at the real entry points: the run's plan, integrations (report_to, push_to_hub,
pad_token, max_length vs the model's positions, assistant_only_loss), a YAML key given twice, abbreviated or
misspelt flags, and `python -m dpo.tiny` onto something that exists. Each stops with one `error:` line,
exit 2, before any weights load."""

import dataclasses
import json
import math

import pytest
import yaml
from helpers import load_recipe, message_lines, one_line_error

from dpo.compat import ModelConfig
from dpo.gate.plan import check_plan, plan_of
from dpo.train.config import RecipeDPOConfig, RecipeSFTConfig


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dpo_phi2")


@pytest.fixture
def local(tiny_model_dir, truthy_file, tmp_path):
    return ["--model_name_or_path", tiny_model_dir, "--dataset_name", truthy_file, "--output_dir", tmp_path / "out"]


def args(**settings):
    return RecipeDPOConfig(output_dir="x", use_cpu=True, bf16=False, **settings)


# ── the plan ─────────────────────────────────────────────────────────────────────────────────
def test_the_plan_counts_optimizer_steps_as_the_trainer_does():
    # 36 pairs, 2 per device x 32 accumulation: 18 micro-batches -> one (partial) accumulation -> 1 step per epoch
    plan = plan_of(36, args(per_device_train_batch_size=2, gradient_accumulation_steps=32, num_train_epochs=1))
    assert (plan.batches_per_epoch, plan.steps, plan.warmup, plan.pairs_per_step) == (18, 1, 0, 64)
    plan = plan_of(36, args(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_train_epochs=3))
    assert plan.steps == 3 * math.ceil(18 / 4) == 15
    assert plan_of(36, args(per_device_train_batch_size=2, gradient_accumulation_steps=4), world_size=2).steps == 3 * 3
    assert plan_of(10, args(max_steps=7, warmup_steps=0.1)).warmup == 1  # transformers: ceil(0.1 x 7)


def test_a_small_dataset_whose_steps_never_leave_the_warm_up_is_refused(recipe, local, capsys, no_weights_load):
    """recipes/README.md step 3 with too few pairs: one 64-pair step inside the 10% warm-up trained at lr 0."""
    line = one_line_error(recipe.main, [*local, "--num_train_epochs", "1"], capsys)
    assert "this run would not train" in line and "43 training pairs at 64 pairs per optimizer step" in line, line
    assert "1 optimizer step(s)" in line and "gradient_accumulation_steps" in line


def test_an_explicit_max_steps_inside_the_warm_up_is_said_not_refused():
    plan, warning = check_plan(43, args(max_steps=1, warmup_steps=0.1))
    assert plan.steps == 1 and "ends inside the 1-step warm-up" in warning
    assert check_plan(43, args(max_steps=2, warmup_steps=0.1))[1] is None


def test_a_run_shorter_than_logging_steps_still_logs_its_first_step(recipe, local):
    trainer = recipe.main(
        [str(a) for a in local]
        + ["--max_steps", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "10", "--save_strategy", "no"]
    )
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1]


# ── integrations ─────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--report_to", "wandb"], "report_to wandb: the wandb package is not installed"),
        (["--push_to_hub", "true"], "push_to_hub needs the Hub, and HF_HUB_OFFLINE is set"),
        (["--pad_token", "<nope>"], "pad_token '<nope>' is not a token of the tokenizer's vocabulary"),
        (["--max_length", "4096"], "max_length 4096 is above the model's 2048 positions"),
    ],
    ids=[
        "report_to_not_installed",
        "push_to_hub_offline",
        "pad_token_not_in_vocabulary",
        "max_length_above_positions",
    ],
)
def test_an_integration_that_cannot_work_is_refused(flags, expected, recipe, local, capsys, no_weights_load):
    line = one_line_error(recipe.main, [*local, *flags], capsys)
    assert expected in line, line


def test_assistant_only_loss_without_generation_markers_is_refused(local, capsys, no_weights_load):
    line = one_line_error(load_recipe("sft_phi2").main, [*local, "--assistant_only_loss", "true"], capsys)
    assert "assistant_only_loss needs a chat template that marks assistant turns" in line, line


def test_push_to_hub_without_a_token_is_refused(recipe, local, capsys, no_weights_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    line = one_line_error(recipe.main, [*local, "--push_to_hub", "true"], capsys)
    assert "push_to_hub needs a token" in line, line


# ── configuration files and flags ────────────────────────────────────────────────────────────
def test_a_yaml_key_given_twice_is_refused_naming_both_lines(recipe, local, tmp_path, capsys, no_weights_load):
    config = tmp_path / "twice.yaml"
    config.write_text("beta: 0.1\nlearning_rate: 1.0e-4\nbeta: 0.5\n")
    with pytest.raises(SystemExit) as stop:
        recipe.main([str(a) for a in [*local, "--config", config]])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{config}:3:1" in err and "key 'beta' is given twice (first at line 1)" in err


@pytest.mark.parametrize("flag, near", [("--learning_rat=1e-4", "learning_rate"), ("--max_step=5", "max_steps")])
def test_an_abbreviated_or_misspelt_flag_is_unknown_and_the_near_name_is_suggested(
    flag, near, recipe, local, capsys, no_weights_load
):
    with pytest.raises(SystemExit) as stop:
        recipe.main([str(a) for a in [*local, flag]])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown command-line key(s)" in err and f"did you mean {near}?" in err, err


def test_the_commands_take_no_abbreviations(tmp_path, capsys):
    from dpo.evaluation.evaluate import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--num_prompt", "2"])  # --num_prompts, abbreviated
    lines = message_lines(capsys.readouterr().err)
    assert stop.value.code == 2 and len(lines) == 1 and "unrecognized arguments: --num_prompt" in lines[0], lines
    assert "did you mean num_prompts?" in lines[0] and "usage:" not in lines[0]


@pytest.mark.parametrize(
    "argv, flag, near",
    [
        (["--cache_d", "DIR", "list"], "--cache_d", "cache_dir"),  # was "command: invalid choice: 'DIR'"
        (["--cache_dir", "DIR", "remove", "--al"], "--al", "all"),  # a subcommand's flag: no hint was given
    ],
)
def test_an_unknown_flag_of_a_command_with_subcommands_is_named_with_the_near_one(argv, flag, near, tmp_path, capsys):
    from dpo.train.speed.refcache_admin import main

    (tmp_path / "keep").mkdir()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path) if a == "DIR" else a for a in argv])
    lines = message_lines(capsys.readouterr().err)
    assert stop.value.code == 2 and len(lines) == 1 and f"unrecognized arguments: {flag} " in lines[0], lines
    assert f"did you mean {near}?" in lines[0] and (tmp_path / "keep").is_dir()


# ── python -m dpo.tiny writes new files only ──────────────────────────────────────────────────
def test_tiny_refuses_a_file_and_a_non_empty_folder(tmp_path, capsys):
    from dpo.offline.tiny import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer_config.json").write_text(json.dumps({"kept": True}))
    afile = tmp_path / "file.txt"
    afile.write_text("kept")
    for target, expected in ((afile, "is a file"), (run, "is not empty"), (afile / "sub", "is a file, so nothing")):
        assert expected in one_line_error(main, [target], capsys)
    assert json.loads((run / "tokenizer_config.json").read_text()) == {"kept": True} and afile.read_text() == "kept"
    main([str(tmp_path / "new"), "--truthy_rows", str(tmp_path / "rows.jsonl")])
    assert (tmp_path / "new" / "config.json").is_file() and (tmp_path / "rows.jsonl").is_file()
    (tmp_path / "rows.jsonl").write_text('{"mine": 1}\n')  # a file of the user's under the same name
    assert "already exists" in one_line_error(
        main, [tmp_path / "new2", "--truthy_rows", tmp_path / "rows.jsonl"], capsys
    )
    assert (tmp_path / "rows.jsonl").read_text() == '{"mine": 1}\n'
    (tmp_path / "new" / "config.json").write_text("{}")  # the same file names, other bytes: still refused
    assert "is not empty" in one_line_error(main, [tmp_path / "new"], capsys)


# ── the stop message says what the check saw, not more ─────────────────────────────────────────
def test_a_non_finite_weight_after_a_step_is_not_reported_as_caught_before_it():
    from dpo.train.safety.guards import NonFiniteTraining, nonfinite_advice

    settings = args()
    after = nonfinite_advice(NonFiniteTraining(3, "the norm of the trainable weights", math.nan), settings, None)
    before = nonfinite_advice(NonFiniteTraining(3, "the loss", math.nan), settings, None)
    assert "that step's update made the weights non-finite" in after and "before that step" not in after
    assert "training stopped before that step changed any weight" in before


# ── relations between settings (dpo/gate/table.py RELATIONS): each has a case here ──────────────
RELATION_CASES = {
    "_scheduler": (
        "dpo_phi2",
        ["--lr_scheduler_type", "cosine_with_min_lr"],
        "lr_scheduler_type cosine_with_min_lr needs lr_scheduler_kwargs {min_lr: ...} or {min_lr_rate: ...}",
    ),
    "_splits": ("dpo_any", ["--dataset_test_split", "train"], "dataset_test_split is the training split ('train')"),
    "_weights_total": (
        "dpo_phi2",
        ["--loss_type", "sigmoid", "sft", "--loss_weights", "0", "0"],
        "loss_weights are all 0",
    ),
    # was a transformers traceback after the weights loaded ("cannot perform fine-tuning on purely quantized models")
    "_quantized_full": ("dpo_any", ["--use_peft", "false"], "use_peft false with load_in_4bit true"),
    # was accepted and unused
    "_cache_dir_unused": (
        "dpo_any",
        ["--reference_cache", "false", "--reference_cache_dir", "somewhere"],
        "reference_cache_dir somewhere is set but reference_cache is false",
    ),
    # was accepted and chose nothing: no row is packed without packing: true
    "_packing_attention": (
        "dpo_any",
        ["--packing_attention", "segments"],
        "packing_attention segments is set but packing is false",
    ),
    # per_device_train_batch_size: auto (the YAML's) beside transformers' own halving after an out-of-memory
    "auto_batch_relations": ("dpo_any", ["--auto_find_batch_size", "true"], "two automatic batch sizes"),
}


def test_every_relation_has_a_case():
    from dpo.gate.table import RELATIONS

    assert {check.__name__ for _, check in RELATIONS} == {*RELATION_CASES, "_prefetch"}


YAML_CASES = {  # a recipe YAML's lines replaced or added; what the one error line must say
    "min_lr_nan": (
        {
            "lr_scheduler_type: constant_with_warmup": "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: .nan}"
        },
        "lr_scheduler_kwargs.min_lr must be >= 0; got nan",
    ),
    "min_lr_rate_negative": (
        {
            "lr_scheduler_type: constant_with_warmup": "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr_rate: -1}"
        },
        "lr_scheduler_kwargs.min_lr_rate must lie in [0, 1]; got -1",
    ),
    "wsd_without_decay_steps": (
        {"lr_scheduler_type: constant_with_warmup": "lr_scheduler_type: warmup_stable_decay"},
        "lr_scheduler_type warmup_stable_decay needs lr_scheduler_kwargs {num_decay_steps: ...}",
    ),
    "choices_from_the_yaml": (
        {
            "bnb_4bit_quant_type: nf4": "bnb_4bit_quant_type: nf5",
            "max_length: 1024": "max_length: 1024\ntruncation_mode: keep_middle",
        },
        "truncation_mode must be one of keep_end, keep_start; got 'keep_middle'; bnb_4bit_quant_type must be one of fp4, nf4; got 'nf5'",
    ),
    "max_length_null_on_a_model_with_positions": (
        {"max_length: 1024": "max_length: null"},
        "max_length is null (no limit), and the model has 2048 positions",
    ),
    "seed_not_whole": ({"seed: 42": "seed: 1.5"}, "seed must lie in [0, 4294967295] and a whole number; got 1.5"),
    # a list, a mapping or null where the field takes one value: a TypeError inside the dataclasses, or later
    "beta_a_list": ({"beta: 0.1 ": "beta: [0.1, 0.2] "}, "beta takes a single value; got a list ([0.1, 0.2])"),
    "scheduler_a_mapping": (
        {"lr_scheduler_type: constant_with_warmup": "lr_scheduler_type: {name: cosine}"},
        "lr_scheduler_type takes a single value; got a mapping",
    ),
    "learning_rate_null": (
        {"learning_rate: 5.0e-5": "learning_rate: null"},
        "learning_rate takes a single value; got null",
    ),
}


@pytest.mark.parametrize("recipe_name", ["dpo_any", "dpo_phi2", "sft_phi2", "dpo_sentiment_tiny", "dpo_rounds"])
def test_every_shipped_yaml_has_values_of_the_kinds_its_fields_take(recipe_name):
    from helpers import ROOT

    from dpo.gate.flags import yaml_kind_problems

    recipe = load_recipe(recipe_name)
    config = RecipeSFTConfig if recipe_name == "sft_phi2" else RecipeDPOConfig
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        keys = {f.name for c in (recipe.ScriptArguments, config, ModelConfig) for f in dataclasses.fields(c)}
        if set(values) <= keys:  # a YAML of this recipe
            assert yaml_kind_problems((recipe.ScriptArguments, config, ModelConfig), values) == [], path


def test_a_null_in_the_yaml_overridden_on_the_command_line_is_no_problem(local, tmp_path, capsys, no_weights_load):
    config = tmp_path / "template.yaml"
    config.write_text(
        "dataset_name: null   # given on the command line\nmodel_name_or_path: null\nlearning_rate: -1\n"
    )
    line = one_line_error(load_recipe("dpo_any").main, [*local, "--config", config], capsys)
    assert "learning_rate must be > 0" in line and "dataset_name" not in line, line


def test_model_name_or_path_null_is_one_line(truthy_file, tmp_path, capsys, no_weights_load):
    """Was a TypeError traceback from pathlib."""
    config = tmp_path / "settings.yaml"
    config.write_text(f"model_name_or_path: null\ndataset_name: {truthy_file}\noutput_dir: {tmp_path / 'o'}\n")
    line = one_line_error(load_recipe("dpo_any").main, ["--config", config], capsys)
    assert "model_name_or_path is not set" in line, line


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_a_yaml_setting_outside_its_rule_is_refused_as_on_the_command_line(
    case, recipe, local, tmp_path, capsys, no_weights_load
):
    """A YAML value skips argparse (its choices, its types): the gate sees it all the same."""
    from helpers import ROOT

    replace, expected = YAML_CASES[case]
    text = (ROOT / "recipes" / "dpo_phi2.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "settings.yaml"
    config.write_text(text)
    line = one_line_error(recipe.main, [*local, "--config", config], capsys)
    assert expected in line, line


def test_an_eos_token_not_in_the_vocabulary_is_refused(local, capsys, no_weights_load):
    line = one_line_error(load_recipe("sft_phi2").main, [*local, "--eos_token", "<nope>"], capsys)
    assert "eos_token '<nope>' is not a token of the tokenizer's vocabulary" in line, line


def test_the_plan_names_only_fixes_that_apply():
    from dpo.errors import UserError

    with pytest.raises(UserError) as refused:  # accumulation already 1: half an epoch inside a 20-step warm-up
        check_plan(
            43,
            args(per_device_train_batch_size=2, gradient_accumulation_steps=1, num_train_epochs=0.5, warmup_steps=20),
        )
    message = str(refused.value)
    assert (
        "never reach" in message and "would not move" not in message and "lower gradient_accumulation" not in message
    )


@pytest.mark.parametrize("case", sorted(RELATION_CASES))
def test_a_broken_relation_between_settings_is_refused(case, local, capsys, no_weights_load):
    recipe_name, flags, expected = RELATION_CASES[case]
    line = one_line_error(load_recipe(recipe_name).main, [*local, *flags], capsys)
    assert expected in line, line


def test_prefetch_without_workers_is_refused_by_the_table_too():
    """transformers refuses it while parsing; the table says it for any object the gate is handed."""
    from dpo.gate.check import problems

    found = problems({"dataloader_prefetch_factor": 2, "dataloader_num_workers": 0})
    assert found == [
        "dataloader_prefetch_factor needs dataloader_num_workers >= 1 (prefetching is done by the workers)"
    ]


@pytest.mark.parametrize("flags", [["--beta", "0.1", "--beta", "0.5"], ["--beta=0.1", "--beta", "0.5"]])
def test_a_flag_given_twice_is_refused(flags, recipe, local, capsys, no_weights_load):
    line = one_line_error(recipe.main, [*local, *flags], capsys)
    assert "--beta is given twice on the command line" in line, line


@pytest.mark.parametrize(
    "rank, expected",
    [
        (10**29, "65536"),  # was "disk full: adapter 7e23 GB"; the table's bound, for every recipe
        (60000, "exceeds the narrower side of the targeted layer"),  # inside the table's bound, not the model's
    ],
)
def test_an_absurd_lora_rank_is_refused_naming_lora_r(rank, expected, recipe, local, capsys, no_weights_load):
    line = one_line_error(recipe.main, [*local, "--lora_r", rank], capsys)
    assert expected in line and "lora_r" in line and "disk" not in line, line


def test_a_lora_rank_up_to_the_narrowest_targeted_layer_passes_that_check(tiny_model_dir):
    from dpo.train.model_checks import (
        check_lora_rank,
        check_lora_targets,
        linear_features,
        load_model_config,
        meta_model,
    )

    config = load_model_config(str(tiny_model_dir))
    targets = check_lora_targets(config, ["q_proj", "fc1"])
    modules = dict(meta_model(config).named_modules())
    narrowest = min(min(linear_features(modules[n])) for n in targets)
    check_lora_rank(config, ModelConfig(lora_r=narrowest, use_peft=True), targets)  # no error
    with pytest.raises(Exception, match=f"set lora_r to {narrowest} or less"):
        check_lora_rank(config, ModelConfig(lora_r=narrowest + 1, use_peft=True), targets)


def test_assistant_only_loss_reads_a_named_templates_default():
    """Hermes-style tokenizers hold {"default": ..., "tool_use": ...}: the check read the dict's keys, so it
    refused every such tokenizer, markers or not."""
    from types import SimpleNamespace

    from dpo.gate.integrations import model_integration_problems

    marked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    args = SimpleNamespace(assistant_only_loss=True, max_length=64, model_init_kwargs=None)
    config = SimpleNamespace(max_position_embeddings=2048)
    for template, refused in (({"default": marked, "tool_use": marked}, False), ({"default": "{{ x }}"}, True)):
        tokenizer = SimpleNamespace(chat_template=template, get_vocab=dict)
        problems = model_integration_problems(args, config, tokenizer)
        assert any("assistant_only_loss" in p for p in problems) == refused, problems
