"""The two-step pipeline end to end on the tiny offline Phi model, as a user runs it:

    recipes/sft_phi2.py -> recipes/dpo_phi2.py (from the SFT adapter) -> python -m dpo.evaluate -> python -m dpo.export

One short run of each (module fixtures, a few steps, short sequences) backs every check: the
reference is base + SFT adapter, the base and the SFT adapter are untouched, the policy starts
at the SFT adapter and moves, the evaluation agrees with TRL's own held-out metrics, the judge
counts wins, the merged model reproduces base + adapter, and TensorBoard gets the reward metrics.
"""

import contextlib
import hashlib
import io
import json
import shutil

import pytest
import torch
import yaml
from helpers import (
    cli,
    eval_batch_metrics,
    fake_checkpoint,
    load_recipe,
    one_line_error,
    qlora_quantization_config,
    reward_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

FAST = ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "64"]


class SnapshotTrainable(TrainerCallback):
    """Every trainable tensor as training starts."""

    def __init__(self):
        self.initial = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("adapter_*"))}


@pytest.fixture(scope="module")
def sft(tiny_model_dir, truthy_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    trainer = load_recipe("sft_phi2").main(
        ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file), "--output_dir", str(out)]
        + FAST
        + ["--max_steps", "3", "--learning_rate", "5e-2", "--test_size", "0.25", "--save_strategy", "no"]
    )
    return {"trainer": trainer, "dir": out, "digest": digest(out)}


@pytest.fixture(scope="module")
def dpo(sft, tiny_model_dir, truthy_file, tmp_path_factory):
    """DPO with the SFT adapter folder given as the model (recognised as an adapter), TensorBoard on."""
    out = tmp_path_factory.mktemp("dpo")
    snapshot = SnapshotTrainable()
    trainer = load_recipe("dpo_phi2").main(
        ["--model_name_or_path", str(sft["dir"]), "--dataset_name", str(truthy_file), "--output_dir", str(out)]
        + FAST
        + ["--max_steps", "3", "--learning_rate", "1e-2", "--test_size", "0.25", "--save_strategy", "no"]
        + ["--eval_strategy", "no", "--per_device_eval_batch_size", "16", "--report_to", "tensorboard"],
        callbacks=[snapshot],
    )
    return {"trainer": trainer, "dir": out, "snapshot": snapshot.initial}


def completion_logps(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


def fresh_4bit(model_dir, adapter=None):
    from peft import PeftModel

    from dpo.train.speed.kernels import use_portable_4bit_kernels

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=qlora_quantization_config(), dtype=torch.float32
    )
    use_portable_4bit_kernels(base)  # the kernel training used, on any CPU
    return PeftModel.from_pretrained(base, str(adapter)).eval() if adapter else base.eval()


# ── SFT ────────────────────────────────────────────────────────────────────────────────────────
def test_sft_loss_covers_the_answer_tokens_only(sft):
    """Labels are -100 (no loss) exactly on the prompt's tokens; the answer and its EOS are scored."""
    trainer = sft["trainer"]
    for row in trainer.train_dataset.select(range(4)):
        n = len(trainer.processing_class(row["prompt"])["input_ids"])
        labels = trainer.data_collator([row])["labels"][0].tolist()
        ids = row["input_ids"]
        assert row["prompt"].startswith("Instruct: ") and row["prompt"].endswith("\nOutput:")
        assert labels[:n] == [-100] * n
        assert labels[n:] == ids[n:] and len(ids) > n
        if len(ids) < 64:  # not cut by max_length
            assert ids[-1] == trainer.processing_class.eos_token_id, "the answer ends with EOS"


def test_sft_writes_the_dpo_recipes_outputs(sft):
    out = sft["dir"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "resolved_config.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert "train_loss" in metrics and "eval_loss" in metrics
    assert (out / "heldout_pairs.jsonl").read_text().count("\n") == 12  # 48 rows x test_size 0.25


# ── DPO from the SFT adapter ────────────────────────────────────────────────────────────────────
def test_adapter_folder_as_model_is_recognised(dpo, sft, tiny_model_dir):
    import yaml

    resolved = yaml.safe_load((dpo["dir"] / "resolved_config.yaml").read_text())
    assert resolved["model_name_or_path"] == str(tiny_model_dir)
    assert resolved["sft_adapter_path"] == str(sft["dir"])
    assert sorted(dpo["trainer"].model.peft_config) == ["default", "ref"]


def test_reference_log_probs_are_base_plus_sft_adapter(dpo, sft, tiny_model_dir):
    """Logged rewards = beta * (policy - reference): with base + SFT adapter as the reference they
    come out exactly; with the bare base (what a fresh LoRA run would use) they do not."""
    trainer = dpo["trainer"]
    batch, logged = eval_batch_metrics(trainer)
    ref_chosen, ref_rejected = completion_logps(fresh_4bit(tiny_model_dir, sft["dir"]), batch)
    beta = trainer.args.beta
    for key, ref in (("chosen", ref_chosen), ("rejected", ref_rejected)):
        expected = beta * (torch.tensor(logged[f"logps/{key}"]) - ref.mean())
        torch.testing.assert_close(torch.tensor(logged[f"rewards/{key}"]), expected, rtol=1e-5, atol=1e-5)
    base_chosen, _ = completion_logps(fresh_4bit(tiny_model_dir), batch)
    assert abs(base_chosen.mean() - ref_chosen.mean()) > 1e-2, "SFT did not move: the check above could not fail"


def test_base_and_sft_adapter_unchanged_after_training(dpo, sft, tiny_model_dir):
    assert digest(sft["dir"]) == sft["digest"], "the SFT adapter folder was modified"
    saved = load_file(sft["dir"] / "adapter_model.safetensors")
    params = dict(dpo["trainer"].model.named_parameters())
    refs = {n: p for n, p in params.items() if ".ref." in n}
    assert refs and not any(p.requires_grad for p in refs.values()), "the reference adapter must be frozen"
    for key, value in saved.items():
        name = key.replace(".weight", ".ref.weight")
        torch.testing.assert_close(refs[name].detach().float(), value.float(), rtol=0, atol=0)
    fresh = dict(fresh_4bit(tiny_model_dir).named_parameters())
    base = [(n, p) for n, p in dpo["trainer"].model.get_base_model().named_parameters() if "lora_" not in n]
    assert len(base) == len(fresh)
    for name, param in base:
        assert torch.equal(param.detach(), fresh[name.replace(".base_layer", "")].detach()), name


def test_policy_starts_as_the_sft_adapter_and_moves(dpo, sft):
    saved = load_file(sft["dir"] / "adapter_model.safetensors")
    initial = dpo["snapshot"]
    assert initial and all(".default." in n for n in initial), "only the policy adapter trains"
    assert len(initial) == len(saved)
    final = dict(dpo["trainer"].model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(initial[name].float(), value.float(), rtol=0, atol=0)
        assert not torch.equal(final[name].detach(), initial[name]), f"{name} did not move"


def test_the_generic_recipe_also_starts_from_the_sft_adapter(sft, tiny_model_dir, truthy_file, tmp_path):
    """recipes/dpo_any.py with --sft_adapter_path: the same start (the SFT weights), the same frozen reference."""
    snapshot = SnapshotTrainable()
    trainer = load_recipe("dpo_any").main(
        ["--model_name_or_path", str(tiny_model_dir), "--sft_adapter_path", str(sft["dir"])]
        + ["--dataset_name", str(truthy_file), "--output_dir", str(tmp_path / "any")]
        + FAST
        + ["--max_steps", "2", "--learning_rate", "1e-2", "--test_size", "0", "--save_strategy", "no"],
        callbacks=[snapshot],
    )
    assert sorted(trainer.model.peft_config) == ["default", "ref"]
    saved = load_file(sft["dir"] / "adapter_model.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(snapshot.initial[key.replace(".weight", ".default.weight")].float(), value.float())
    assert digest(sft["dir"]) == sft["digest"]


@pytest.mark.slow
def test_sft_resumes_its_last_checkpoint(tiny_model_dir, truthy_file, tmp_path):
    """The SFT recipe has the DPO recipes' run safety: a stopped run continues with `last`."""
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
    argv += ["--output_dir", str(tmp_path / "sft"), *FAST, "--test_size", "0", "--save_steps", "2"]
    load_recipe("sft_phi2").main([*argv, "--max_steps", "2"])
    trainer = load_recipe("sft_phi2").main(
        [*argv, "--max_steps", "4", "--resume_from_checkpoint", "last", "--resume_with_different_settings", "true"]
    )
    assert trainer.state.global_step == 4
    metrics = json.loads((tmp_path / "sft" / "final_metrics.json").read_text())
    assert metrics["train_resumed_at_step"] == 2


def test_sft_bad_row_is_one_line_before_weights_load(tiny_model_dir, tmp_path, capsys, no_weights_load):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Hi?", "chosen": "Hello."}\n')
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--output_dir", tmp_path / "o"]
    line = one_line_error(load_recipe("sft_phi2").main, argv, capsys)
    assert "bad.jsonl" in line and "rejected" in line


def test_wrong_base_model_is_a_clear_error_before_training(sft, truthy_file, tmp_path, capsys):
    from dpo.offline.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    other = tmp_path / "wider-phi"
    build_tiny_model(tokenizer, hidden_size=96).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(SystemExit) as exit_:
        load_recipe("dpo_phi2").main(
            cli(
                model_name_or_path=other,
                sft_adapter_path=sft["dir"],
                dataset_name=truthy_file,
            )
            + ["--output_dir", str(tmp_path / "out")]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written before the check"


def test_tensorboard_events_hold_the_reward_metrics(dpo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(dpo["dir"].glob("runs/*/events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/rewards/chosen"):
        assert key in tags, (key, tags)
    assert len(acc.Scalars("train/rewards/margins")) == 3  # logging_steps 1 (the recipe's YAML), 3 steps
    for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"):  # the held-out evaluation at the end
        assert key in tags, (key, tags)


# ── evaluate ───────────────────────────────────────────────────────────────────────────────────
def last_token_reward_model(folder, tokenizer, good_token: int):
    """A tiny sequence-classification model whose score is +1 if the text's last token is
    `good_token` and -1 otherwise: attention and MLP outputs are zeroed, so the last hidden state is
    that token's embedding, +pattern for the good token and -pattern for every other one."""
    from transformers import PhiForSequenceClassification

    from dpo.offline.tiny import tiny_phi_config

    config = tiny_phi_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = PhiForSequenceClassification(config)
    pattern = torch.tensor([1.0, -1.0] * (config.hidden_size // 2))  # mean 0, variance 1: LayerNorm keeps it
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.dense, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        model.model.embed_tokens.weight.copy_(-pattern.expand_as(model.model.embed_tokens.weight))
        model.model.embed_tokens.weight[good_token] = pattern
        model.score.weight.copy_(pattern[None] / config.hidden_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_judge_counts_wins_ties_and_losses(tmp_path):
    from dpo.evaluation.judge import load_reward_model, score, win_rates
    from dpo.offline.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    good = tokenizer(" Paris")["input_ids"][-1]
    folder = last_token_reward_model(tmp_path / "rm", tokenizer, good)
    judge, judge_tokenizer = load_reward_model(str(folder), "cpu")
    prompts = ["Instruct: capital of France?\nOutput:"] * 4
    better = [" Paris", " It is Paris", " Paris", " the capital is Paris"]
    worse = [" Lyon", " It is Nice", " dog", " the capital"]
    s_better, s_worse = score(judge, judge_tokenizer, prompts, better), score(judge, judge_tokenizer, prompts, worse)
    assert all(b > 0.5 for b in s_better) and all(w < -0.5 for w in s_worse)
    lengths = [1, 3, 1, 4]
    assert win_rates(s_better, s_worse, lengths, lengths)["win_rate"] == 1.0
    assert win_rates(s_worse, s_better, lengths, lengths)["win_rate"] == 0.0
    tie = win_rates(s_better, s_better, lengths, lengths)
    assert tie["win_rate"] == 0.5 and tie["ties"] == 4
    mixed = win_rates(s_better[:2] + s_worse[2:], s_worse, lengths, lengths)  # 2 wins, 2 ties
    assert mixed["win_rate"] == 0.75 and mixed["win_rate_low"] < 0.75 < mixed["win_rate_high"]


def test_length_controlled_win_rate_removes_a_length_only_advantage():
    from dpo.evaluation.judge import length_controlled_win_rate, wilson

    g = torch.Generator().manual_seed(0)
    diff = torch.randn(4000, generator=g) * 20 + 15  # the policy is usually longer
    wins = torch.bernoulli(torch.sigmoid(diff / 10), generator=g)  # and wins only because of it
    assert wins.mean() > 0.65
    assert abs(length_controlled_win_rate(wins, diff) - 0.5) < 0.05
    lo, hi = wilson(0.5, 100)  # textbook value: [0.4038, 0.5962]
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4


@pytest.fixture(scope="module")
def evaluation(dpo, tmp_path_factory):
    from dpo.evaluation.evaluate import main

    tokenizer = dpo["trainer"].processing_class
    rm = last_token_reward_model(tmp_path_factory.mktemp("rm"), tokenizer, tokenizer.eos_token_id)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        metrics = main([str(dpo["dir"]), "--reward_model", str(rm), "--num_prompts", "3", "--max_new_tokens", "8"])
    EVALUATE_OUTPUT.update(stdout=out.getvalue(), stderr=err.getvalue())
    return metrics


EVALUATE_OUTPUT = {}  # what the `evaluation` fixture's run printed


def test_evaluate_shows_progress_for_every_stage_and_dequantizes_on_a_cpu(evaluation):
    """Evaluating a handful of prompts took 25 minutes on a loaded 2-core machine with no bar for the generation:
    every stage now draws a bar with its ETA, and the 4-bit base is dequantized once (dpo/train/speed/dequant.py)."""
    bars = EVALUATE_OUTPUT["stderr"]
    for stage in (
        # one decode loop for all four generations (tests/evaluation/test_generation_work.py)
        "answers: greedy and sampled, policy and reference",
        # the held-out pairs and the sampled answers, a pass per model (tests/evaluation/test_scoring.py)
        "log-probs under policy: held-out pairs and sampled answers",
        "log-probs under reference: held-out pairs and sampled answers",
        "judge: sampled, policy",
        "judge: greedy, reference",
    ):
        assert f"{stage}: 100%" in bars, stage
    assert "4-bit base dequantized for inference:" in EVALUATE_OUTPUT["stdout"]


def test_evaluate_agrees_with_trl_on_the_heldout_pairs(evaluation, dpo):
    """Same pairs, same reference, one eval batch: accuracy and margin equal DPOTrainer's own
    end-of-training evaluation (final_metrics.json)."""
    trl = json.loads((dpo["dir"] / "final_metrics.json").read_text())
    assert evaluation["heldout_pairs"] == 12
    assert evaluation["reward_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-6)
    assert evaluation["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-4, abs=1e-5)
    low, high = evaluation["reward_margin_ci95"]
    assert low < evaluation["reward_margin"] < high


def test_evaluate_writes_the_side_by_side_report(evaluation, dpo):
    folder = dpo["dir"] / "eval"
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("greedy_policy", "greedy_reference", "sampled_policy", "sampled_reference", "sampled_policy_tokens"):
        assert key in rows[0]
    assert all(0 < r["greedy_policy_tokens"] <= 8 for r in rows)
    html = (folder / "report.html").read_text()
    assert html.count("<table class=pair>") == 3 and "pi_theta" in html
    md = (folder / "report.md").read_text()
    assert "implicit-reward accuracy" in md and "length-controlled win rate" in md
    judge = evaluation["judge"]["sampled"]
    assert judge["n"] == 3 and judge["win_rate_low"] <= judge["win_rate"] <= judge["win_rate_high"]
    # the judge's rule: +1 for an answer that ends in EOS; recount the wins from the answers' scores
    wins = [
        1.0 if p > r else 0.0 if p < r else 0.5
        for p, r in ((row["sampled_policy_score"], row["sampled_reference_score"]) for row in rows)
    ]
    assert judge["win_rate"] == sum(wins) / 3
    assert evaluation["kl"] == evaluation["kl"] and evaluation["sampled_length_ratio"] > 0


# ── export ─────────────────────────────────────────────────────────────────────────────────────
def test_export_merges_into_a_full_precision_base_that_loads_plainly(dpo, evaluation, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from dpo.evaluation.export import main

    target = tmp_path / "merged"
    result = main([str(dpo["dir"]), "--merged", str(target)])
    assert result["merge_check"]["max_abs_diff"] <= 1e-4
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(target).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = dpo["trainer"].processing_class("Instruct: Do you have feelings?\nOutput: No.", return_tensors="pt")
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(dpo["dir"])).eval()(**ids).logits
        got = merged(**ids).logits
        bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # dpo.evaluation.export's float32 tolerance
    assert (want - bare).abs().max() > 1e-2, "the adapter is ~zero: the equality above could not fail"

    card = (target / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front  # a local folder with no Hub id: the Hub takes only ids there
    assert f"A merged model for a local model (`{tiny_model_dir}`)" in card
    for needle in ("library_name: transformers", "Direct Preference Optimization", "beta 0.1", "## Reproduce"):
        assert needle in card, needle
    assert "recipes/dpo_phi2.py --config resolved_config.yaml" in card
    assert "learning_rate: 0.01" in card and "judge win rate" in card  # settings and evaluation


def test_export_refuses_before_loading_anything(dpo, tmp_path, capsys, monkeypatch):
    from dpo.evaluation.export import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for argv, message in (
        ([str(dpo["dir"]), "--merged", str(tmp_path / "full")], "not empty"),
        ([str(dpo["dir"])], "nothing to do"),
        ([str(tmp_path), "--merged", str(tmp_path / "m")], "no adapter_config.json"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        main([str(dpo["dir"]), "--push_to_hub", "someone/model"])
    assert "HF_TOKEN" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def run_copy(dpo, folder):
    shutil.copytree(dpo["dir"], folder, ignore=shutil.ignore_patterns("eval", "runs"))
    return folder


def test_evaluate_and_export_refuse_an_unfinished_run(dpo, tmp_path, capsys, no_weights_load):
    """A folder without run_complete.json (killed, e.g. while its final files were moved in) is refused
    with why and how to finish it; a checkpoint given instead of its run folder is named as one."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    (run / "run_complete.json").unlink()
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run, *extra], capsys)
        assert f"{run} has no run_complete.json: the run did not finish" in line, line
        assert "no complete checkpoint to continue from" in line, line
    fake_checkpoint(run / "checkpoint-2")
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run, *extra], capsys)
        assert "--resume_from_checkpoint last (it continues from checkpoint-2)" in line, line
        line = one_line_error(main, [run / "checkpoint-2", *extra], capsys)
        assert "is a checkpoint" in line and f"finished run folder ({run}" in line, line
    assert not (tmp_path / "merged").exists() and not (run / "eval").exists()


def test_evaluate_and_export_refuse_a_run_folder_without_tokenizer_files(dpo, tmp_path, capsys, no_weights_load):
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (run / name).unlink(missing_ok=True)
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run, *extra], capsys)
        assert f"{run} has no tokenizer files" in line, line


def replace_adapter_weights(folder):
    """The SFT adapter retrained in place: same shapes, other values (every lora_B moved by 0.05)."""
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: v + 0.05 if "lora_B" in k else v for k, v in weights.items()}, folder / "adapter_model.safetensors")


def test_resuming_after_the_sft_adapter_was_replaced_in_place_is_refused(
    sft, tiny_model_dir, truthy_file, tmp_path, capsys, request
):
    """The checkpoint records the adapter's sha256, not its path: the same folder with other weights is
    another reference. Refused in one line before weights load, with the reference cache (which would
    otherwise stop after loading, blaming its own files) and without it (which would resume silently)."""
    adapter = tmp_path / "sft"
    shutil.copytree(sft["dir"], adapter)
    out = tmp_path / "dpo"
    argv = ["--model_name_or_path", tiny_model_dir, "--sft_adapter_path", adapter, "--dataset_name", truthy_file]
    argv += ["--output_dir", out, *FAST, "--max_steps", "2", "--save_steps", "2", "--test_size", "0"]
    argv = [str(a) for a in argv]
    load_recipe("dpo_phi2").main(argv)
    resume = [*argv, "--resume_from_checkpoint", "last"]
    load_recipe("dpo_phi2").main(resume)  # the same adapter: resumes (the last step: final files only)
    replace_adapter_weights(adapter)
    rehash(adapter, "adapter_model.safetensors")  # retrained in place: a finished run of other weights
    request.getfixturevalue("no_weights_load")
    for cache in ("true", "false"):
        line = one_line_error(load_recipe("dpo_phi2").main, [*resume, "--reference_cache", cache], capsys)
        assert "checkpoint-2 was trained from the SFT adapter with sha256" in line, line
        assert f"but the SFT adapter {adapter} has sha256" in line and "Put the original adapter back" in line


def test_sft_adapter_path_must_be_an_adapter(tiny_model_dir, sft):
    from dpo.errors import UserError
    from dpo.train.adapters import resolve_start

    with pytest.raises(UserError, match="no adapter_config.json"):
        resolve_start("microsoft/phi-2", str(tiny_model_dir))  # a full model, not an adapter
    assert resolve_start(str(tiny_model_dir), None) == (str(tiny_model_dir), None, None)  # a model stays a model
    base, adapter, config = resolve_start("some/other-base", str(sft["dir"]))
    assert (base, adapter, config["base_model_name_or_path"]) == (
        "some/other-base",
        str(sft["dir"]),
        str(tiny_model_dir),
    )


def test_a_truncated_adapter_is_one_line_in_evaluate_export_and_dpo_from_sft(
    dpo, sft, truthy_file, tiny_model_dir, tmp_path, capsys, no_weights_load
):
    """An interrupted copy of adapter_model.safetensors (the run's own, or the SFT adapter DPO starts
    from) is named before anything loads, instead of safetensors' "incomplete metadata" traceback."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run, *extra], capsys)
        assert f"{weights} is truncated or corrupt" in line, line
    adapter = tmp_path / "sft"
    shutil.copytree(sft["dir"], adapter)
    cut = adapter / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    flags = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=tmp_path / "o")
    line = one_line_error(load_recipe("dpo_phi2").main, [*flags, "--sft_adapter_path", adapter], capsys)
    assert f"{cut} is truncated or corrupt" in line, line


# ── the run folder's files are the ones the run wrote (run_complete.json's sha256, dpo/train/safety/runs.py) ──
def rehash(run, *names):
    """Record `names`' current sha256 in run_complete.json, as if the run had written them so."""
    marker = json.loads((run / "run_complete.json").read_text())
    marker["sha256"].update({n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in names})
    (run / "run_complete.json").write_text(json.dumps(marker))


def test_an_adapter_replaced_after_the_run_is_refused_by_evaluate_and_export(dpo, tmp_path, capsys, no_weights_load):
    """A checkpoint's adapter (or any other weights) copied over the finished run's: export used to report
    that the logits match and evaluate scored the wrong adapter."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    replace_adapter_weights(run)
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [run, *extra], capsys)
        assert f"{run / 'adapter_model.safetensors'} has sha256" in line, line
        assert "the run folder changed after the run finished" in line, line
    assert not (tmp_path / "merged").exists() and not (run / "eval").exists()


def test_dpo_from_an_sft_run_whose_adapter_was_replaced_is_refused(
    sft, tiny_model_dir, truthy_file, tmp_path, capsys, no_weights_load
):
    """A checkpoint's adapter (here: other weights of the same shapes) copied over a finished SFT run's: evaluate
    and export refused that folder, but DPO started from it silently. An SFT run stopped before it finished is
    refused too (its final adapter may be missing or an earlier run's)."""
    from dpo.train.adapters import check_sft_run

    adapter = tmp_path / "sft"
    shutil.copytree(sft["dir"], adapter)
    replace_adapter_weights(adapter)
    flags = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=tmp_path / "o")
    line = one_line_error(load_recipe("dpo_phi2").main, [*flags, "--sft_adapter_path", adapter], capsys)
    assert f"{adapter / 'adapter_model.safetensors'} has sha256" in line, line
    assert "the run folder changed after the run finished" in line and "DPO starting from this SFT adapter" in line
    (adapter / "run_complete.json").unlink()  # as if killed before its final files were in place
    (adapter / "checkpoint-500").mkdir()  # a TRL run's own checkpoint: unmarked, says nothing of this folder
    check_sft_run(adapter)  # a plain TRL SFT output: nothing recorded, nothing refused
    fake_checkpoint(adapter / "checkpoint-1")  # one these recipes marked: their run, unfinished
    line = one_line_error(load_recipe("dpo_phi2").main, [*flags, "--sft_adapter_path", adapter], capsys)
    assert "has no run_complete.json: the run did not finish" in line, line
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_a_configured_sft_adapter_changed_since_the_run(dpo, sft, tmp_path, capsys, no_weights_load):
    """A run without its own ref/ copy (written before runs kept one) takes pi_ref from resolved_config.yaml's
    sft_adapter_path, a path outside the run folder: was used whatever it held since; now its weights must have
    the sha256 the run recorded (run_complete.json's run.sft_adapter_sha256)."""
    from dpo.evaluation.evaluate import main as evaluate

    run, adapter = run_copy(dpo, tmp_path / "run"), tmp_path / "sft"
    shutil.copytree(sft["dir"], adapter)
    shutil.rmtree(run / "ref")  # as a run from before the copy was kept
    marker = json.loads((run / "run_complete.json").read_text())
    marker["sha256"] = {k: v for k, v in marker["sha256"].items() if not k.startswith("ref/")}
    marker["files"] = [f for f in marker["files"] if f != "ref"]
    (run / "run_complete.json").write_text(json.dumps(marker))
    resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert resolved["sft_adapter_path"] and marker["run"]["sft_adapter_sha256"]
    resolved["sft_adapter_path"] = str(adapter)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(resolved))
    rehash(run, "resolved_config.yaml")
    replace_adapter_weights(adapter)  # retrained at that path since
    line = one_line_error(evaluate, [run], capsys)
    assert f"was trained against the SFT adapter {adapter} with sha256 {marker['run']['sft_adapter_sha256']}" in line
    assert "retrained or replaced since" in line, line
    assert not (run / "eval").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "heldout_pairs.jsonl",
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",\n',
            ":2: not valid JSON",
        ),
        ("heldout_pairs.jsonl", '{"prompt": "a", "chosen": "b"}\n', ":1: the row has no 'rejected' entry"),
        ("resolved_config.yaml", "beta: [0.1\n", "is not valid YAML (line 2, column 1)"),
        ("resolved_config.yaml", "- beta\n", "holds a list, not a mapping of settings"),
    ],
)
def test_a_malformed_heldout_or_config_file_is_one_line(
    dpo, tmp_path, capsys, no_weights_load, name, content, message
):
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    (run / name).write_text(content)
    line = one_line_error(evaluate, [run], capsys)
    assert f"{run / name}{message}" in line or f"{run / name} {message}" in line, line
    if name == "resolved_config.yaml":
        line = one_line_error(export, [run, "--merged", tmp_path / "merged"], capsys)
        assert f"{run / name} {message}" in line, line


def test_evaluate_and_export_after_the_base_model_was_moved(dpo, tmp_path, capsys, no_weights_load):
    """The run names its base by path; moved away, that is one line naming it and where the run said it was."""
    import yaml

    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    run = run_copy(dpo, tmp_path / "run")
    gone = tmp_path / "models" / "tiny-phi"  # where the base was when the run trained
    resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({**resolved, "model_name_or_path": str(gone)}))
    adapter = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": str(gone)}))
    rehash(run, "resolved_config.yaml", "adapter_config.json")
    for main, extra, source in (
        (evaluate, [], "model_name_or_path in resolved_config.yaml"),
        (export, ["--merged", tmp_path / "merged"], "base_model_name_or_path in adapter_config.json"),
    ):
        line = one_line_error(main, [run, *extra], capsys)
        assert f"the run's base model folder {gone} ({source}) is not there" in line, line


def test_export_merged_onto_a_file_is_one_line(dpo, tmp_path, capsys, no_weights_load):
    from dpo.evaluation.export import main as export

    taken = tmp_path / "merged"
    taken.write_text("mine")
    line = one_line_error(export, [dpo["dir"], "--merged", taken], capsys)
    assert f"--merged {taken} is a file, not a folder" in line, line
    line = one_line_error(export, [dpo["dir"], "--merged", taken / "m"], capsys)  # was a FileExistsError traceback
    assert f"--merged {taken / 'm'} lies under {taken}, a file" in line, line
    assert taken.read_text() == "mine"


# ── reward models: a trained sequence-classification head, in safetensors (dpo/evaluation/judge.py) ──
def test_a_reward_model_without_a_classification_head_or_safetensors_is_refused_before_loading(
    dpo, tiny_model_dir, tmp_path, capsys, no_weights_load
):
    """A causal LM as judge used to get a random `score` head (transformers: `score.weight MISSING`) and its win
    rates were written; a pickle-only reward model was a traceback."""
    from dpo.evaluation.evaluate import main as evaluate

    line = one_line_error(evaluate, [dpo["dir"], "--reward_model", tiny_model_dir], capsys)
    assert f"--reward_model {tiny_model_dir} is not a reward model" in line and "PhiForCausalLM" in line, line
    tokenizer = dpo["trainer"].processing_class
    pickled = last_token_reward_model(tmp_path / "pickled", tokenizer, tokenizer.eos_token_id)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # the bytes do not matter: never read
    line = one_line_error(evaluate, [dpo["dir"], "--reward_model", pickled], capsys)
    assert "has only pickled weights (pytorch_model.bin)" in line and "AutoModelForSequenceClassification" in line
    two = last_token_reward_model(tmp_path / "two", tokenizer, tokenizer.eos_token_id)
    config = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**config, "id2label": {"0": "neg", "1": "pos"}}))
    line = one_line_error(evaluate, [dpo["dir"], "--reward_model", two], capsys)
    assert "gives 2 scores per text" in line, line


def test_a_reward_model_that_is_a_file_or_whose_head_does_not_fit_its_config_is_one_line(
    dpo, tmp_path, capsys, no_weights_load
):
    """The probe's cases in `python -m dpo.evaluate RUN --reward_model X`: an existing .jsonl file (was "model folder
    not found"), and config.json saying num_labels 1 over score.weight [2, H] (was transformers' mismatch table and
    a RuntimeError after the policy had loaded). Both: one line, before any weights load."""
    from dpo.evaluation.evaluate import main as evaluate

    pairs = dpo["dir"] / "heldout_pairs.jsonl"
    line = one_line_error(evaluate, [dpo["dir"], "--reward_model", pairs], capsys)
    assert f"--reward_model {pairs} is a file, not a model folder" in line, line
    folder = reward_model(tmp_path / "rm", num_labels=2, config_labels=1)
    line = one_line_error(evaluate, [dpo["dir"], "--reward_model", folder], capsys)
    assert f"--reward_model {folder}: score.weight is [2, 64] in model.safetensors" in line, line


def test_a_reward_model_whose_weights_lack_the_head_is_refused(tiny_model_dir, tmp_path):
    """A config that claims a classification head over weights without one (a causal LM's, relabelled)."""
    from dpo.errors import UserError
    from dpo.evaluation.judge import load_reward_model

    folder = tmp_path / "relabelled"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    relabelled = {**config, "architectures": ["PhiForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    (folder / "config.json").write_text(json.dumps(relabelled))
    with pytest.raises(UserError, match=r"weights lack score\.weight .*not a trained reward model"):
        load_reward_model(str(folder), "cpu")
