"""The controlled-sentiment demo: the task is what it says, and DPO measurably aligns the model.

Fast checks pin the synthetic task (deterministic, hand-computed rewards, grammar, tokenizer)
and the evaluation maths (an untrained adapter has KL exactly 0; log-probs ignore padding).
One shortened run of recipes/dpo_sentiment_tiny.py (SFT -> pairs -> 4-bit LoRA DPO -> eval)
checks that the policy's ground-truth reward beats pi_ref's by a margin, that the KL estimate
is positive and finite, and that the report is written.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import statistics

import pytest
import torch
from helpers import ROOT, cli, load_recipe

from dpo.offline import sentiment as S
from dpo.offline.sentiment_eval import evaluate_alignment, summary
from dpo.scratch.logps import completion_logps

# A shortened pipeline: the demo's DPO settings (sigmoid, beta 0.1, ~54 steps at 2e-4) on a
# pi_ref SFT-trained for 200 steps instead of 300, with fewer held-out prompts. ~25 s on 2 cores.
SHORT = ["--sft_examples", "2048", "--sft_steps", "200", "--heldout_pair_prompts", "128", "--eval_prompts", "256"]
# Policy reward minus pi_ref reward must exceed this (rewards of well-formed reviews lie in
# [-0.5, 0.5]). With SHORT, seeds 0-5 (--seed N --task_seed N) gave gains of 0.14 to 0.20.
MARGIN = 0.05


# ── the task ─────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "text, expected",
    [
        (" great plot.", 1 / 2),  # 1 positive of 2 words
        (" dull acting, awful music.", -2 / 4),  # 2 negative of 4 words
        (" superb acting, dull plot, loud music.", 0.0),  # 1 - 1 of 6 words
        (" lovely cast, charming music, weak ending.", 1 / 6),  # 2 - 1 of 6 words
        (" loud plot, modern visuals.", 0.0),  # neutral adjectives only
        (" great great great.", 1.0),  # reward hacking: all positive, no grammar
        (" film, of review:", 0.0),  # words, none with a sentiment
        ("", 0.0),  # no words at all
        (" GREAT Plot.", 1 / 2),  # case does not matter
    ],
)
def test_reward_by_hand(text, expected):
    assert S.reward(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, ok",
    [
        (" great plot.", True),
        (" superb acting, dull plot, loud music.", True),
        (" great plot", False),  # no full stop
        (" great great great.", False),  # adjective without an aspect
        (" , great plot.", False),  # starts with punctuation
        (" great opera.", False),  # a topic is not an aspect
        (" great plot. great plot.", False),  # two sentences
    ],
)
def test_well_formed(text, ok):
    assert S.well_formed(text) is ok


def test_task_is_deterministic_and_seeded():
    a, b, other = S.SentimentTask(seed=0), S.SentimentTask(seed=0), S.SentimentTask(seed=1)
    assert a.sft_rows(200, seed=3) == b.sft_rows(200, seed=3)
    assert a.prompts("train", 100, seed=3) == b.prompts("train", 100, seed=3)
    assert a.positivity == b.positivity and a.splits == b.splits
    assert a.sft_rows(200, seed=3) != other.sft_rows(200, seed=3)
    assert a.positivity != other.positivity
    assert a.sft_rows(200, seed=3) != a.sft_rows(200, seed=4)


def test_splits_and_prompts():
    task = S.SentimentTask(seed=0, heldout_topics=6)
    train, heldout = task.splits["train"], task.splits["heldout"]
    assert len(heldout) == 6 and not set(train) & set(heldout) and set(train) | set(heldout) == set(S.TOPICS)
    assert {p for p in task.prompts("heldout", 300)} == {S.prompt_for(t) for t in heldout}
    assert all(p.split()[2][:-1] in train for p in task.prompts("train", 300))
    with pytest.raises(S.UserError):
        S.SentimentTask(heldout_topics=0)


def test_corpus_grammar_and_tone():
    """Every SFT review is well formed, and a topic's mean reward follows its tone.

    An adjective is neutral with probability 0.2, else positive with probability p: each phrase
    (2 words) adds 0.8 * (2p - 1) to #pos - #neg, so E[reward] = 0.4 * (2p - 1) per topic.
    """
    task = S.SentimentTask(seed=0)
    rows = task.sft_rows(6000, seed=0)
    assert all(S.well_formed(r["completion"]) for r in rows)
    assert {len(r["completion"].split(",")) for r in rows} == {1, 2, 3, 4}
    by_topic: dict[str, list[float]] = {}
    for r in rows:
        by_topic.setdefault(r["prompt"].split()[2][:-1], []).append(S.reward(r["completion"]))
    for topic, rewards in by_topic.items():
        expected = 0.4 * (2 * task.positivity[topic] - 1)
        assert statistics.mean(rewards) == pytest.approx(expected, abs=0.06), topic  # ~250 reviews: s.e. ~0.02


def test_word_tokenizer_round_trip():
    tok = S.build_word_tokenizer()
    assert len(tok) == 66 and tok.pad_token is None and tok.eos_token == "<|endoftext|>"
    text = " superb acting, dull plot, loud music."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 9 and tok.unk_token_id not in ids  # one token per word and mark
    assert S.decode(tok, ids + [tok.eos_token_id]) == text
    assert tok("review of sequel:")["input_ids"] == tok.convert_tokens_to_ids(["review", "of", "sequel", ":"])


# ── the evaluation maths ─────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def tiny_policy():
    """An untrained sentiment-sized model with a fresh LoRA adapter (B = 0: policy == reference)."""
    from peft import LoraConfig, get_peft_model

    tok = S.build_word_tokenizer()
    tok.pad_token = tok.eos_token
    model = S.build_sentiment_model(tok, seed=0)
    return tok, get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], lora_dropout=0.0))


def test_kl_is_zero_for_an_untrained_adapter(tiny_policy):
    tok, policy = tiny_policy
    prompts = S.SentimentTask().prompts("heldout", 32)
    result = evaluate_alignment(policy, tok, prompts, max_new_tokens=8, seed=0)
    m = result["metrics"]
    assert m["kl"] == 0.0 and m["policy_reward"] == m["reference_reward"]
    assert [s["policy"] for s in result["samples"]] == [s["reference"] for s in result["samples"]]


def test_sampling_is_seeded_and_logps_ignore_padding(tiny_policy):
    tok, policy = tiny_policy
    prompts = ["review of film:", "review of opera:"] * 4
    p1, c1 = S.sample(policy, tok, prompts, 6, seed=1)
    assert (p1, c1) == S.sample(policy, tok, prompts, 6, seed=1)
    assert all(len(c) <= 6 for c in c1)
    assert all(tok.eos_token_id not in c[:-1] for c in c1)  # at most one EOS, and only at the end
    together = completion_logps(policy, p1, c1, tok.eos_token_id)
    alone = torch.cat([completion_logps(policy, [p], [c], tok.eos_token_id) for p, c in zip(p1, c1)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert (together < 0).all()


# ── the pipeline, shortened ──────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentiment")
    threads = torch.get_num_threads()
    try:
        metrics = load_recipe("dpo_sentiment_tiny").main([*SHORT, "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)  # the recipe runs on one thread (torch_threads); leave the suite as found
    return out, metrics


@pytest.mark.slow
def test_dpo_raises_the_true_reward(short_run):
    _, m = short_run
    assert m["policy_reward"] - m["reference_reward"] > MARGIN, m
    assert m["heldout_reward_accuracy"] > 0.5  # the implicit reward ranks unseen pairs better than chance


@pytest.mark.slow
def test_kl_is_positive_and_finite(short_run):
    _, m = short_run
    assert math.isfinite(m["kl"]) and m["kl"] > 0
    assert m["kl"] > 2 * m["kl_stderr"]  # positive beyond Monte-Carlo noise


@pytest.mark.slow
def test_report_is_written(short_run):
    out, m = short_run
    saved = json.loads((out / "metrics.json").read_text())
    for key in (
        "reference_reward",
        "policy_reward",
        "kl",
        "heldout_reward_accuracy",
        "reference_length",
        "policy_length",
    ):
        assert saved[key] == pytest.approx(m[key])
    report = (out / "report.md").read_text()
    assert f"{m['policy_reward']:.3f}" in report and f"{m['reference_reward']:.3f}" in report
    assert report.count("| review of ") == 8  # sample completions from both models
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "sft_reference" / "model.safetensors").is_file()  # pi_ref as a model folder
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_demo_summary_prints_before_and_after(short_run):

    _, m = short_run
    text = summary(m, 12.0)
    assert f"{m['reference_reward']:+.3f} ->" in text and f"{m['policy_reward']:+.3f}" in text
    assert m["report"] in text


def test_missing_reference_folder_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("dpo_sentiment_tiny").main(
            ["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "pi_ref folder" in capsys.readouterr().err


# ── the recipe's args phase and loading rules ──────────────────────────────────────────────────
# Without the checks these would run the pipeline; these settings keep such a run short.
TINY = cli(sft_examples=64, sft_steps=2, pair_prompts=16, heldout_pair_prompts=16, eval_prompts=8, max_steps=1)


def test_hub_token_on_the_command_line_is_refused_without_echoing_it(tmp_path, capfd):
    """Tokens come from HF_TOKEN: training_args.bin would pickle a --hub_token into every checkpoint."""
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("dpo_sentiment_tiny").main([*TINY, "--hub_token", "hf_x_secret", "--output_dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2
    assert "HF_TOKEN" in err
    assert "hf_x_secret" not in out + err
    assert not any(tmp_path.iterdir())  # stopped before phase 1 wrote anything


def test_a_reference_folder_without_safetensors_is_refused(tmp_path, capsys):
    """Weights load from safetensors only: a pickled pytorch_model.bin is never unpickled."""
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    (ref / "pytorch_model.bin").write_bytes(b"not a safe file")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("dpo_sentiment_tiny").main(
            [*TINY, "--model_name_or_path", str(ref), "--output_dir", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2
    assert "model.safetensors" in capsys.readouterr().err


SENTIMENT_CODE = (
    "recipes/dpo_sentiment_tiny.py",
    "dpo/offline/sentiment.py",
    "dpo/offline/sentiment_eval.py",
    "benchmarks/frontier_sentiment.py",
)


def _calls(path):
    return [n for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.Call)]


@pytest.mark.parametrize("path", SENTIMENT_CODE)
def test_model_weights_load_from_safetensors_only(path):
    loads = [
        c
        for c in _calls(path)
        if isinstance(c.func, ast.Attribute)
        and c.func.attr == "from_pretrained"
        and "Tokenizer" not in ast.unparse(c.func.value)
        and "Config" not in ast.unparse(c.func.value)
    ]
    for call in loads:
        kwargs = {k.arg: k.value for k in call.keywords}
        assert "use_safetensors" in kwargs and ast.literal_eval(kwargs["use_safetensors"]) is True, (
            f"{path}:{call.lineno}: from_pretrained without use_safetensors=True"
        )


def test_recipes_and_benchmarks_import_trl_through_dpo_compat():
    """TRL-version-sensitive imports live in dpo/compat.py (tests/test_library.py checks dpo/ itself)."""
    offenders = []
    for path in sorted([*(ROOT / "recipes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n == "trl" or n.startswith("trl.")
            ]
    assert offenders == []


@pytest.mark.slow
def test_a_rerun_that_fails_after_training_leaves_no_report_of_the_run_it_replaced(short_run, tmp_path, monkeypatch):
    """Was: metrics.json and report.md were written in place at the end and never removed, so a rerun with
    --overwrite_output_dir that failed after training (here: in the held-out evaluation) left the old run's
    numbers beside the new adapter."""
    out = tmp_path / "run"
    shutil.copytree(short_run[0], out)
    old = (out / "metrics.json").read_text()
    recipe = load_recipe("dpo_sentiment_tiny")

    def failed(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(recipe, "evaluate_alignment", failed)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="the evaluation failed"):
            recipe.main([*SHORT, "--beta", "0.2", "--overwrite_output_dir", "true", "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "run_complete.json").read_text())["run"]["beta"] == 0.2  # the new run is in place
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()  # and no report of the old
    assert old  # (there was one)
