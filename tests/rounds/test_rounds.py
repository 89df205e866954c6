"""On-policy DPO in rounds (recipes/dpo_rounds.py, dpo/rounds/) on the tiny model: the summary equals the
rounds' own files, sampling is on-policy, the reference is the one asked for exactly, a killed round 2
resumes and more rounds run only the new ones, and the user errors are one line before weights load."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, load_recipe, one_line_error

from dpo.evaluation.sampling import Sampling, sample_answers
from dpo.files import file_sha256
from dpo.rounds.pairing import make_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REWARDS = '''
def length(prompt, completion):
    """Characters of the answer: the tiny model's random answers rarely tie on it."""
    return float(len(completion))


def constant(prompt, completion):
    return 0.5


def numpy_length(prompt, completion):
    import numpy

    return numpy.float32(len(completion))


def not_a_number(prompt, completion):
    return str(len(completion))


def exits(prompt, completion):
    import sys

    sys.exit(0)


def huge(prompt, completion):
    return 1.7e308
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "rounds_test_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def settings(model_dir, prompts, output_dir, **overrides) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "prompts": str(prompts),
        "reward": "rounds_test_rewards:length",
        "rounds": 2,
        "prompts_per_round": 8,
        "samples_per_prompt": 4,
        "max_new_tokens": 8,
        "generation_batch_size": 16,
        "eval_prompts": 4,
        "min_pairs": 2,
        "test_size": 0.25,
        "load_in_4bit": True,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "max_length": 96,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-2,  # large: each round's adapter moves visibly
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "num_train_epochs": 1,
        "activation_checkpointing": False,
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "output_dir": str(output_dir),
        **overrides,
    }


def write_config(path, values) -> list[str]:
    path.write_text(yaml.safe_dump(values))
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, truthy_file, reward_module, tmp_path_factory):
    """Two rounds, reference initial, run once for the tests that read a finished folder."""
    folder = tmp_path_factory.mktemp("rounds")
    out = folder / "run"
    argv = write_config(folder / "rounds.yaml", settings(tiny_model_dir, truthy_file, out))
    return out, load_recipe("dpo_rounds").main(argv), argv


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_summary_numbers_equal_the_rounds_own_files(finished):
    out, summary, _ = finished
    on_disk = json.loads((out / "rounds.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))  # what main returned is what it wrote
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    k = on_disk["settings"]["samples_per_prompt"]
    for record in on_disk["rounds"]:
        folder = out / f"round-{record['round']}"
        samples = jsonl(folder / "samples.jsonl")
        rewards = [[a["reward"] for a in s["answers"]] for s in samples]
        assert all(len(r) == k for r in rewards)
        assert record["samples"]["mean_reward"] == pytest.approx(
            sum(map(sum, rewards)) / (k * len(rewards)), rel=1e-12
        )
        assert record["samples"]["best_of_k"] == pytest.approx(sum(map(max, rewards)) / len(rewards), rel=1e-12)
        # the reward really is the function's, and the pairs are the pairing rule's on these samples
        assert all(a["reward"] == float(len(a["text"])) for s in samples for a in s["answers"])
        pairs, counts = make_pairs(samples, "max_min", 0.0, seed=0 + 1000 * record["round"])
        assert jsonl(folder / "pairs.jsonl") == pairs and record["pairs"] == counts
        assert record["train_pairs"] + record["heldout_pairs"] == counts["kept"]  # keep_pairs false
        final = json.loads((folder / "final_metrics.json").read_text())
        assert record["implicit_reward_accuracy"] == final["eval_rewards/accuracies"]
        assert record == json.loads((folder / "round.json").read_text())
        assert (folder / "run_complete.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    table = (out / "rounds.md").read_text()
    assert f"{on_disk['rounds'][1]['heldout']['reward']:+.3f}" in table and (out / "rounds.png").stat().st_size > 0


@pytest.mark.slow
def test_round_2_samples_from_round_1s_adapter(finished, tiny_model_dir):
    """On-policy: round 2's samples are exactly what base + round 1's saved adapter draws with round 2's seed,
    and not what the starting model draws."""
    from peft import PeftModel

    from dpo.compat import ModelConfig
    from dpo.rounds.models import load_policy
    from dpo.train.model_checks import load_tokenizer

    out, summary, _ = finished
    samples = jsonl(out / "round-2" / "samples.jsonl")
    prompts = [s["prompt"] for s in samples]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    from dpo.data.formats import ensure_chat_template

    ensure_chat_template(tokenizer)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=True, dtype="float32")

    class Args:  # what load_policy reads of the training arguments
        trust_remote_code, fp16, model_init_kwargs = False, False, None

    sampling = Sampling(1.0, 1.0, 8, 16)

    def texts(model, prompts=prompts, round_number=2):
        drawn = sample_answers(model, tokenizer, prompts, 4, sampling, seed=0 + 1000 * round_number)
        return [[a["text"] for a in answers] for answers in drawn["answers"]]

    policy = load_policy(model_args, Args, str(out / "round-1"))
    assert isinstance(policy, PeftModel)
    assert texts(policy) == [[a["text"] for a in s["answers"]] for s in samples]
    start = load_policy(model_args, Args, None)
    assert texts(start) != [[a["text"] for a in s["answers"]] for s in samples]
    # Round 1 sampled with the starting model the recipe had loaded for its held-out numbers: what a freshly
    # loaded starting model draws with round 1's seed.
    first = jsonl(out / "round-1" / "samples.jsonl")
    assert texts(start, [s["prompt"] for s in first], 1) == [[a["text"] for a in s["answers"]] for s in first]


def tiny_args(model_dir, output_dir):
    """The model and training settings of `settings` as objects, for building a round's trainer directly."""
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig

    values = settings(model_dir, "unused", output_dir)
    model_fields = {"model_name_or_path", "load_in_4bit", "use_peft", "lora_r", "lora_alpha", "lora_target_modules"}
    training = {k: v for k, v in values.items() if k not in model_fields and k in RecipeDPOConfig.__dataclass_fields__}
    return ModelConfig(dtype="float32", **{k: values[k] for k in model_fields}), RecipeDPOConfig(**training)


def chosen_logps(model, tokenizer, rows, reference: bool = False) -> torch.Tensor:
    """log pi(chosen | prompt) of each row under the model as it is, or (`reference`) under the reference
    TRL chooses for this model (its "ref" adapter, else adapters disabled)."""
    from dpo.evaluation.sampling import prompt_token_ids
    from dpo.scratch.logps import completion_logps
    from dpo.train.adapters import as_reference

    prompts = prompt_token_ids(tokenizer, [r["prompt"] for r in rows])
    answers = [tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] for r in rows]
    if reference:
        with as_reference(model):
            return completion_logps(model, prompts, answers, tokenizer.pad_token_id)
    return completion_logps(model, prompts, answers, tokenizer.pad_token_id)


@pytest.mark.slow
def test_round_2s_reference_is_exactly_the_initial_model_or_round_1s_policy(
    finished, tiny_model_dir, tmp_path, capsys
):
    """Round 2 as the loop builds it (policy from round 1's adapter, then set_reference): its reference
    scores every pair exactly as the starting model (initial) or round 1's saved policy (previous) does,
    each loaded on its own."""
    from datasets import Dataset

    from dpo.data.formats import ensure_chat_template
    from dpo.rounds.models import load_policy, set_reference
    from dpo.rounds.pairing import training_rows
    from dpo.train.model_checks import load_tokenizer
    from dpo.train.trainer import build_dpo_trainer

    out, _, _ = finished
    pairs = jsonl(out / "round-2" / "pairs.jsonl")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ensure_chat_template(tokenizer)
    round_1 = str(out / "round-1")
    model_args, training_args = tiny_args(tiny_model_dir, tmp_path / "x")
    starting = chosen_logps(load_policy(model_args, training_args, None), tokenizer, pairs)
    round_1_policy = chosen_logps(load_policy(model_args, training_args, round_1), tokenizer, pairs)
    assert not torch.equal(starting, round_1_policy)  # round 1 moved the policy: the two choices differ

    for reference, expected in (("initial", starting), ("previous", round_1_policy)):
        training_args.output_dir = str(tmp_path / reference)
        capsys.readouterr()
        trainer = build_dpo_trainer(
            *(model_args, training_args, Dataset.from_list(training_rows(pairs)), None, tokenizer, None, round_1),
            reference=lambda built, chosen=reference: set_reference(built, chosen, 2, None),
        )
        assert torch.equal(chosen_logps(trainer.model, tokenizer, pairs, reference=True), expected), reference
        # the log names this reference once (it said "base + frozen SFT adapter (round-1)" and then "the
        # starting model" for `initial`)
        said = [line for line in capsys.readouterr().out.splitlines() if "reference = " in line]
        words = {"initial": "the starting model", "previous": "round 1's policy, frozen"}[reference]
        assert len(said) == 1 and f"reference = {words}" in said[0], said
        del trainer


def snapshot(folder):
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_kill_in_round_2_resumes_there_and_more_rounds_run_only_the_new_ones(
    tiny_model_dir, truthy_file, reward_module, tmp_path
):
    """keep_pairs: round 2 trains on both rounds' pairs, so it has more steps than round 1 and the kill at its
    step 4 (SIGKILL, after a checkpoint every step) lands in round 2 only."""
    out = tmp_path / "run"
    values = settings(tiny_model_dir, truthy_file, out, keep_pairs=True, save_strategy="steps", save_steps=1)
    argv = write_config(tmp_path / "rounds.yaml", values)
    env = {
        **os.environ,
        "DPO_TEST_SIGNAL_AT": "step:4",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(reward_module)]),
    }
    killed = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dpo_rounds.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "round-1" / "round.json").is_file() and not (out / "round-2" / "round.json").exists()
    assert (out / "round-2" / "samples.jsonl").is_file() and list((out / "round-2").glob("checkpoint-*"))
    round_1, samples_2 = snapshot(out / "round-1"), file_sha256(out / "round-2" / "samples.jsonl")

    summary = load_recipe("dpo_rounds").main(argv)  # the same command again
    final = json.loads((out / "round-2" / "final_metrics.json").read_text())
    assert final["train_resumed_at_step"] == 3  # the newest complete checkpoint before the kill at step 4
    assert snapshot(out / "round-1") == round_1 and file_sha256(out / "round-2" / "samples.jsonl") == samples_2
    assert [r["round"] for r in summary["rounds"]] == [1, 2]

    both = {n: snapshot(out / f"round-{n}") for n in (1, 2)}
    summary = load_recipe("dpo_rounds").main([*argv, "--rounds", "3"])  # a finished folder asked for one more
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert {n: snapshot(out / f"round-{n}") for n in (1, 2)} == both  # earlier rounds' files untouched
    assert (out / "round-3" / "run_complete.json").is_file()
    assert summary["rounds"][2]["train_pairs"] + summary["rounds"][2]["heldout_pairs"] == sum(
        r["pairs"]["kept"] for r in summary["rounds"]
    )  # keep_pairs: round 3 trained on every round's pairs


def test_other_settings_in_a_finished_folder_are_refused_before_weights_load(finished, capsys, no_weights_load):
    out, _, argv = finished
    line = one_line_error(load_recipe("dpo_rounds").main, [*argv, "--pairing", "max_random"], capsys)
    assert "other settings" in line and "pairing" in line and str(out) in line


def test_fewer_rounds_than_have_finished_are_refused(finished, capsys, no_weights_load):
    """Was: --rounds 1 rewrote rounds.json, .md and .png without round 2, whose folder stayed."""
    out, _, argv = finished
    before = (out / "rounds.json").read_bytes()
    line = one_line_error(load_recipe("dpo_rounds").main, [*argv, "--rounds", "1"], capsys)
    assert "--rounds 1" in line and "2 finished rounds" in line and (out / "rounds.json").read_bytes() == before


def test_the_settings_are_checked_without_rounds_json(finished, tmp_path, capsys, no_weights_load):
    """rounds.json is rebuilt when deleted, so the settings are compared with rounds_settings.json; round
    folders with neither record cannot be checked and are refused."""
    out, _, argv = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "rounds.json").unlink()
    argv = [*argv, "--output_dir", str(copy)]
    line = one_line_error(load_recipe("dpo_rounds").main, [*argv, "--pairing", "max_random"], capsys)
    assert "other settings" in line and "pairing" in line
    (copy / "rounds_settings.json").unlink()
    line = one_line_error(load_recipe("dpo_rounds").main, argv, capsys)
    assert "holds round folders but no record of their settings" in line


def test_a_run_stopped_inside_round_1_is_checked_against_its_settings_and_prompts(
    tiny_model_dir, truthy_file, reward_module, tmp_path, capsys, monkeypatch
):
    """Was: stopped before round 1 finished (no rounds.json yet), a rerun with another reward or K, or an edited
    prompt file, reused round 1's samples and resumed its DPO run, and recorded the new settings. Now the samples
    are drawn again (round 1 starts over: no round finished, dpo/rounds/rerun.py) and the new settings recorded;
    a DPO run that began is never resumed with other settings (tests/rounds/test_rounds_advice.py)."""
    recipe = load_recipe("dpo_rounds")
    prompts = tmp_path / "prompts.jsonl"
    shutil.copyfile(truthy_file, prompts)
    out = tmp_path / "run"
    argv = write_config(tmp_path / "rounds.yaml", settings(tiny_model_dir, prompts, out))

    def sampled():
        (out / "round-1").mkdir(exist_ok=True)
        (out / "round-1" / "samples.jsonl").write_text("{}\n")

    def stopped(*_):
        sampled()  # as if round 1 sampled, then Ctrl-C inside it
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run_rounds", stopped)
    with pytest.raises(SystemExit):
        recipe.main(argv)
    assert (out / "rounds_settings.json").is_file() and not (out / "rounds.json").exists()

    def record():
        return json.loads((out / "rounds_settings.json").read_text())["settings"]

    def sampled_again(*_):
        assert not (out / "round-1" / "samples.jsonl").exists()  # the old samples are not reused
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run_rounds", sampled_again)
    old = record()
    for edit in ([*argv, "--reward", "rounds_test_rewards:constant"], [*argv, "--samples_per_prompt", "3"]):
        sampled()
        with pytest.raises(SystemExit):
            recipe.main(edit)
        assert record() != old
        old = record()
    sampled()
    prompts.write_text(prompts.read_text().replace("?", "?!", 1))  # one prompt edited, same file name
    with pytest.raises(SystemExit):
        recipe.main(argv)
    assert record()["prompts_sha256"] != old["prompts_sha256"]


def test_ctrl_c_in_a_round_says_to_run_the_same_command_again(
    tiny_model_dir, truthy_file, reward_module, tmp_path, monkeypatch, capsys
):
    """Was: "Resume with --resume_from_checkpoint last", which the rounds recipe refuses."""
    values = settings(tiny_model_dir, truthy_file, tmp_path / "run", rounds=1, save_strategy="steps", save_steps=100)
    argv = write_config(tmp_path / "rounds.yaml", values)
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", "step:1:SIGINT")
    with pytest.raises(SystemExit) as stop:
        load_recipe("dpo_rounds").main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Resume by running the same command again" in err, err
    assert "--resume_from_checkpoint" not in err and list((tmp_path / "run" / "round-1").glob("checkpoint-*"))


def test_a_signal_while_round_2_saves_its_samples_stops_the_rounds_there(
    tiny_model_dir, truthy_file, reward_module, tmp_path, monkeypatch, capsys
):
    """Was: a Ctrl-C during a save inside a round was dropped and the rounds went on to the end, exit 0. Now the
    save (here round 2's samples.jsonl) is finished, then the rounds stop between their steps, exit 130."""
    argv = write_config(tmp_path / "rounds.yaml", settings(tiny_model_dir, truthy_file, tmp_path / "run"))
    monkeypatch.setenv("DPO_TEST_SIGNAL_AT", "save-samples:2:SIGINT")
    with pytest.raises(SystemExit) as stop:
        load_recipe("dpo_rounds").main(argv)
    captured = capsys.readouterr()
    assert stop.value.code == 130 and "Run the same command again: the rounds continue" in captured.err, captured.err
    round_2 = tmp_path / "run" / "round-2"
    assert (tmp_path / "run" / "round-1" / "round.json").is_file()
    assert len(jsonl(round_2 / "samples.jsonl")) == 8  # every prompt's answers, whole
    # what round 2 starts from, then its samples, and nothing after them ran
    assert sorted(p.name for p in round_2.iterdir()) == ["round_start.json", "samples.jsonl"]


@pytest.mark.slow
def test_pairs_trl_would_drop_for_length_are_dropped_and_counted_before_training(
    tiny_model_dir, truthy_file, reward_module, tmp_path
):
    """Was: prompts that alone fill max_length (keep_start) were dropped inside TRL while round.json counted them
    as trained and held out."""
    rows = jsonl(truthy_file)
    for i, row in enumerate(rows):
        if i % 2:
            row["prompt"] += " and" * 300  # far past max_length 96
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = write_config(tmp_path / "rounds.yaml", settings(tiny_model_dir, prompts, tmp_path / "run", rounds=1))
    summary = load_recipe("dpo_rounds").main(argv)
    record = summary["rounds"][0]
    pairs = jsonl(tmp_path / "run" / "round-1" / "pairs.jsonl")
    short = [p for p in pairs if " and and" not in str(p["prompt"])]
    assert len(short) < len(pairs)  # some long prompts were sampled and paired
    assert record["train_pairs"] + record["heldout_pairs"] == len(short)


def test_more_prompts_per_round_than_prompts_is_refused(
    tiny_model_dir, truthy_file, reward_module, tmp_path, capsys, no_weights_load
):
    """Was: 100 per round from 56 prompts sampled prompts twice, and held-out pairs shared prompts with training ones."""
    argv = write_config(
        tmp_path / "rounds.yaml", settings(tiny_model_dir, truthy_file, tmp_path / "run", prompts_per_round=100000)
    )
    line = one_line_error(load_recipe("dpo_rounds").main, argv, capsys)
    assert "prompts_per_round 100000" in line and "training prompts" in line


def test_evaluate_and_export_on_a_rounds_folder_name_a_round(finished, tmp_path, capsys, no_weights_load):
    """Was: "not a finished run folder of these recipes"."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    out, _, _ = finished
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [out, *extra], capsys)
        assert "holds on-policy rounds" in line and str(out / "round-2") in line, line


def test_a_finished_rounds_adapter_replaced_afterwards_is_named_before_weights_load(
    finished, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """Round 3 would sample from round 2's adapter and round 2 was trained from round 1's: a finished round read
    back is verified against its run_complete.json hashes, so a swapped adapter stops the run instead of being used."""
    out, _, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    swapped = copy / "round-1" / "adapter_model.safetensors"
    shutil.copyfile(copy / "round-2" / "adapter_model.safetensors", swapped)  # a valid adapter, not round 1's
    argv = write_config(tmp_path / "rounds.yaml", settings(tiny_model_dir, truthy_file, copy))
    with pytest.raises(SystemExit) as stop:  # the tokenizer's chat-template warning comes first: it is no error
        load_recipe("dpo_rounds").main([*argv, "--rounds", "3"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(swapped) in errors[0] and "changed after the run finished" in errors[0], errors[0]
    assert not (copy / "round-3").exists()


def test_a_reward_model_without_a_classification_head_is_refused(
    tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    argv = write_config(
        tmp_path / "r.yaml", settings(tiny_model_dir, truthy_file, tmp_path / "o", reward=str(tiny_model_dir))
    )
    line = one_line_error(load_recipe("dpo_rounds").main, argv, capsys)
    assert "is not a reward model" in line and "ForSequenceClassification" in line


def test_a_round_whose_rewards_all_tie_stops_with_one_line(
    tiny_model_dir, truthy_file, reward_module, tmp_path, capsys
):
    """Found after sampling (weights have loaded): exit 2, one error line, no traceback, no training."""
    values = settings(tiny_model_dir, truthy_file, tmp_path / "o", reward="rounds_test_rewards:constant")
    with pytest.raises(SystemExit) as stop:
        load_recipe("dpo_rounds").main(write_config(tmp_path / "r.yaml", values))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "round 1: only 0 pairs from 8 prompts (8 ties" in errors[0] and "min_pairs 2" in errors[0]
    assert not (tmp_path / "o" / "round-1" / "run_complete.json").exists()


def test_a_reward_that_is_neither_function_nor_model_is_refused(
    tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    values = settings(tiny_model_dir, truthy_file, tmp_path / "o", reward="not a reward")
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert "neither 'module:function' nor a reward-model" in line


@pytest.mark.slow
def test_a_local_reward_model_scores_through_its_own_chat_template(tiny_model_dir, truthy_file, tmp_path, capsys):
    """A tiny sequence-classification reward model with its own chat template (unlike the policy's plain one):
    one round runs, the log shows the template's text once, and the stored rewards are the model's scores."""
    from transformers import AutoModelForSequenceClassification

    from dpo.offline.tiny import build_tokenizer, tiny_phi_config
    from dpo.rounds.reward import ModelReward

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    config = tiny_phi_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.eos_token_id)
    config.architectures = ["PhiForSequenceClassification"]
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    values = settings(tiny_model_dir, truthy_file, tmp_path / "o", reward=str(tmp_path / "rm"), rounds=1)
    summary = load_recipe("dpo_rounds").main(write_config(tmp_path / "r.yaml", values))
    assert summary["rounds"][0]["pairs"]["kept"] >= 2
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert err.count("reads, e.g.:") == 1 and "<user>" in err and "<assistant>" in err
    samples = jsonl(tmp_path / "o" / "round-1" / "samples.jsonl")[:2]
    reward = ModelReward(str(tmp_path / "rm"))
    prompts = [s["prompt"] for s in samples for _ in s["answers"]]
    texts = [a["text"] for s in samples for a in s["answers"]]
    again, stored = reward(prompts, texts), [a["reward"] for s in samples for a in s["answers"]]
    gap = max(abs(a - b) for a, b in zip(again, stored))
    # float32 with other batches (other padding): summation order only; relative to the largest score, never
    # elementwise. Measured 0.0 here (Intel, AVX512-BF16); 1e-5 leaves ~80 float32 ulps for another CPU's order
    assert len(again) == len(stored) and gap <= 1e-5 * max(1.0, max(map(abs, stored)))


def test_a_reward_function_may_return_any_real_number_and_nothing_else(reward_module, tmp_path):
    """Was: np.float32 refused as "must return a finite number", after the weights loaded and sampling ran."""
    from dpo.errors import UserError
    from dpo.rounds.reward import make_reward

    scores = make_reward("rounds_test_rewards:numpy_length", tmp_path)(["p", "p"], ["abc", "de"])
    assert scores == [3.0, 2.0] and all(type(s) is float for s in scores)  # plain floats, as rounds.json holds
    with pytest.raises(UserError, match="str, not a real number"):
        make_reward("rounds_test_rewards:not_a_number", tmp_path)(["p"], ["abc"])


@pytest.mark.slow
def test_deleting_a_finished_round_runs_every_later_round_again(finished, tmp_path, monkeypatch, capsys):
    """Was: round 1 was trained again and round 2, sampled from and trained on the old round 1's adapter, was kept
    as "done earlier". Round 2 recorded what it started from (round_start.json): it is moved aside (nothing is
    deleted) and run again from the new round 1. The rerun's seed is moved so that round 1 comes out other than
    before, as another reward or a GPU's nondeterminism would make it (a bitwise-equal round 1 keeps round 2)."""
    import dpo.rounds.loop

    out, _, argv = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    argv = [a.replace(str(out), str(copy)) for a in argv]
    config = yaml.safe_load(open(argv[1]).read())
    argv = write_config(tmp_path / "rounds.yaml", {**config, "output_dir": str(copy)})
    old_1, old_2 = (file_sha256(copy / f"round-{n}" / "adapter_model.safetensors") for n in (1, 2))
    shutil.rmtree(copy / "round-1")  # as the recipe's own errors advise, to run that round again
    monkeypatch.setattr(dpo.rounds.loop, "round_seed", lambda training_args, n: training_args.seed + 7 + 1000 * n)

    summary = load_recipe("dpo_rounds").main(argv)
    log = capsys.readouterr().out
    new_1 = file_sha256(copy / "round-1" / "adapter_model.safetensors")
    assert new_1 != old_1
    assert "round 2: it started from round 1's adapter with sha256" in log and "round 2 is run again" in log, log
    assert "round 2: done earlier" not in log
    assert file_sha256(copy / "round-2.stale-1" / "adapter_model.safetensors") == old_2  # moved aside, not lost
    trained_from = json.loads((copy / "round-2" / "run_complete.json").read_text())["run"]["sft_adapter_sha256"]
    assert (
        trained_from == new_1
        and json.loads((copy / "round-2" / "round_start.json").read_text())["adapter_sha256"] == new_1
    )
    assert [r["start"]["adapter_sha256"] for r in summary["rounds"]] == [None, new_1]


def test_a_base_replaced_in_place_stops_the_rounds_before_weights_load(
    tiny_model_dir, truthy_file, reward_module, tmp_path, capsys, request
):
    """Was: the rounds continued on the new base with the old rounds' adapters. The base's weights hash is recorded
    (rounds_settings.json, each round's records): a rerun on other weights under the same path is refused."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "run"
    argv = write_config(tmp_path / "rounds.yaml", settings(base, truthy_file, out, rounds=1))
    load_recipe("dpo_rounds").main(argv)
    weights = base / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] + 0.01}, weights, metadata={"format": "pt"})
    request.getfixturevalue("no_weights_load")
    capsys.readouterr()
    line = one_line_error(load_recipe("dpo_rounds").main, [*argv, "--rounds", "2"], capsys)
    assert f"{out / 'rounds_settings.json'} was derived from the base model {base}" in line, line
    assert "weights sha256" in line and "Put the model the rounds started from back" in line, line
    assert not (out / "round-2").exists()


def error_after_weights(main, argv, capsys) -> str:
    """The one `error:` line of a run that ended with exit 2 after the weights loaded (so the libraries' notices
    may come before it); no traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "name, said",
    [("exits", "called sys.exit(0)"), ("huge", "returned 1.7e+308 for held-out prompt 1")],
)
def test_a_reward_that_exits_or_returns_1_7e308_ends_the_run_in_one_line(
    tiny_model_dir, truthy_file, reward_module, tmp_path, capsys, name, said
):
    """Was: sys.exit(0) in the reward ended the run with exit 0, nothing trained, no message; 1.7e308 (finite)
    gave NaN and -Infinity in the mean reward, the interval and rounds.json (invalid JSON), exit 0. Now one line
    naming the function, the answer and the value or the exit, exit 2, the traceback in the run folder."""
    from dpo.rounds.reward import TRACEBACK_FILE

    out = tmp_path / "o"
    values = settings(tiny_model_dir, truthy_file, out, reward=f"rounds_test_rewards:{name}", rounds=1)
    line = error_after_weights(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert f"reward rounds_test_rewards:{name}" in line and said in line, line
    assert (str(out / TRACEBACK_FILE) in line) == (name == "exits") == (out / TRACEBACK_FILE).is_file()
    assert not (out / "rounds.json").exists() and not (out / "round-1").exists()


def test_a_reward_module_with_a_syntax_error_is_one_line_before_weights_load(
    tiny_model_dir, truthy_file, tmp_path, capsys, monkeypatch, no_weights_load
):
    (tmp_path / "typo_reward.py").write_text("def score(prompt, completion)\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    values = settings(tiny_model_dir, truthy_file, tmp_path / "o", reward="typo_reward:score")
    line = one_line_error(load_recipe("dpo_rounds").main, write_config(tmp_path / "r.yaml", values), capsys)
    assert "reward typo_reward:score: importing typo_reward raised SyntaxError" in line and "line 1" in line, line
    assert "reward_traceback.txt" in line


def test_samples_scored_by_an_edited_reward_function_are_scored_again(
    tiny_model_dir, truthy_file, tmp_path, capsys, monkeypatch
):
    """Was: after the function's code changed, a rerun in the same folder read the old samples.jsonl, scored by
    the old code, without a word. Now every sample records the sha256 of the source that scored it; another
    source: its answers are scored again (the sampled text kept), said in the log."""
    module = tmp_path / "edited_reward.py"
    module.write_text("def score(prompt, completion):\n    return 0.5\n")  # all tie: round 1 stops after sampling
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_reward", raising=False)
    out = tmp_path / "o"
    argv = write_config(tmp_path / "r.yaml", settings(tiny_model_dir, truthy_file, out, reward="edited_reward:score"))
    line = error_after_weights(load_recipe("dpo_rounds").main, argv, capsys)
    assert "only 0 pairs" in line
    before = jsonl(out / "round-1" / "samples.jsonl")
    assert {a["reward"] for s in before for a in s["answers"]} == {0.5}

    module.write_text("def score(prompt, completion):\n    return float(len(completion))  # edited\n")
    monkeypatch.delitem(sys.modules, "edited_reward")  # a new run is a new process: the edited code imports
    summary = load_recipe("dpo_rounds").main([*argv, "--rounds", "1"])
    log = capsys.readouterr().out
    assert (
        "was scored by another version of the function edited_reward:score" in log
        and "scoring its answers again" in log
    )
    after = jsonl(out / "round-1" / "samples.jsonl")
    assert [[a["text"] for a in s["answers"]] for s in after] == [[a["text"] for a in s["answers"]] for s in before]
    assert all(a["reward"] == float(len(a["text"])) for s in after for a in s["answers"])
    assert len({s["scored_by"] for s in before + after}) == 2 and summary["rounds"][0]["pairs"]["kept"] >= 2


def test_finished_rounds_scored_by_another_version_of_the_reward_are_refused_before_weights_load(
    finished, tmp_path, capsys, monkeypatch, no_weights_load
):
    from dpo.rounds.reward import FunctionReward

    out, _, argv = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    monkeypatch.setattr(FunctionReward, "identity", lambda self: "0" * 64)  # as if its source had been edited
    line = one_line_error(load_recipe("dpo_rounds").main, [*argv, "--output_dir", str(copy), "--rounds", "3"], capsys)
    assert "round(s) 1, 2 were scored by another version of the function rounds_test_rewards:length" in line, line
    assert not (copy / "round-3").exists()
