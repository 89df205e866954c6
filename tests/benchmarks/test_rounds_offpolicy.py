"""benchmarks/rounds_offpolicy.py: the rare reward, the matched-KL reading, and the whole benchmark end to end at
its smallest size (1 round of 32 prompts, 2 seeds, every kind of offline pairs, a few optimizer steps)."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
from helpers import ROOT, load_script, message_lines

from dpo.errors import UserError
from dpo.folders import MARKER

BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH / "rounds_offpolicy.py", "bench_rounds_offpolicy")


def test_rare_praise_pays_only_for_a_long_review_of_praise():
    from dpo.rounds.sentiment import rare_praise

    assert rare_praise("p", " great plot, lovely music, superb cast.") == 1.5  # 3 phrases, all praise
    assert rare_praise("p", " great plot, lovely music.") == 0.5  # 2 phrases: the ground truth only
    assert rare_praise("p", " great plot, long music, superb cast.") == pytest.approx(2 / 6)  # a neutral adjective
    assert rare_praise("p", " great great great.") == 1.0  # ungrammatical: the ground truth's hack, no bonus
    # as the rounds' sampler decodes it (a space before punctuation): the same review, the same reward
    assert rare_praise("p", " great plot , lovely music , superb cast .") == 1.5


def test_offline_at_the_rounds_kl_reads_the_upper_envelope(bench):
    rounds = {"initial": {"reward": 0.0}, "rounds": [{"round": 1, "heldout": {"kl": 1.5, "reward": 0.4}}]}
    # a path that rises, falls back and rises again: the envelope skips the fall
    offline = {"path": [{"kl": 1.0, "reward": 0.3}, {"kl": 1.2, "reward": 0.1}, {"kl": 2.0, "reward": 0.5}]}
    [row] = bench.compare(rounds, offline)
    assert row["offline"] == pytest.approx(0.3 + 0.2 * 0.5 / 1.0)  # linear between (1.0, 0.3) and (2.0, 0.5)
    assert row["gap"] == pytest.approx(0.4 - 0.4) and not row["beyond_offline_kl"]


def test_t_interval_over_seeds(bench):
    t_interval = sys.modules["offpolicy_report"].t_interval  # the benchmark's report module, imported by it
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2), sd 1
    assert t_interval([1.0])[1] == -math.inf  # one seed: no interval


def test_label_pairs_drops_ties_and_stops_at_the_budget(bench):
    from dpo.rounds.reward import make_reward

    reward = make_reward("dpo.rounds.sentiment:ground_truth", ROOT)
    answers = [(" great plot.", " dull plot."), (" long plot.", " loud plot."), (" dull plot.", " lovely plot.")]
    rows = bench.label_pairs(["a", "b", "c"], answers, reward, 1)
    assert rows == [{"prompt": "a", "chosen": " great plot.", "rejected": " dull plot."}]
    rows = bench.label_pairs(["a", "b", "c"], answers, reward, 5)
    assert [r["prompt"] for r in rows] == ["a", "c"] and rows[1]["chosen"] == " lovely plot."  # b tied: dropped


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_with_matched_pair_budgets(bench, tmp_path, monkeypatch):
    out, md = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    argv = ["rounds_offpolicy.py", "--seeds", "42", "43", "--rewards", "rare praise", "--rounds", "1"]
    argv += ["--prompts_per_round", "32", "--eval_prompts", "16", "--offline_epochs", "3", "--eval_every", "1"]
    argv += ["--sft_steps", "10", "--sft_examples", "128", "--min_pairs", "4"]
    argv += ["--workdir", str(tmp_path / "work"), "--out", str(out), "--benchmarks_md", str(md)]
    monkeypatch.setattr(sys, "argv", argv)
    written, write_json = [], bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda data, path: written.append(path) or write_json(data, path))
    bench.main()
    data = json.loads((out / "rounds_offpolicy.json").read_text())
    assert len(data["runs"]) == 2 * len(bench.KINDS)  # 2 seeds x every kind, one reward
    # each finished seed into the workdir; the results (and the section) once, by the finished run: a run stopped
    # after a seed leaves the committed ones as they were
    assert written == [tmp_path / "work" / "rounds_offpolicy.json"] * 2 + [out / "rounds_offpolicy.json"]
    assert json.loads((tmp_path / "work" / "rounds_offpolicy.json").read_text())["runs"] == data["runs"]
    for run in data["runs"]:
        assert run["pairs"] == run["rounds_pairs"]  # the same number of labelled pairs on both sides
        # one scored point per optimizer step (eval_every 1): 3 epochs of the training pairs at 32 a step
        kept = run["pairs"] - math.ceil(0.1 * run["pairs"])  # the 10% held out as the rounds hold out (test_size)
        assert len(run["offline_path"]) <= 3 * math.ceil(run["pairs"] / 32) and len(run["offline_path"]) >= 3
        assert kept > 0 and run["compare"][-1]["round"] == 1
    assert 0.0 <= data["rarity"]["share"] <= 1.0 and data["rarity"]["samples"] == 16 * 8
    [row] = data["summary"][:1]
    assert row["seeds"] == 2 and row["reward"] == "rare praise"
    assert (out / "rounds_offpolicy.png").stat().st_size > 0
    text = md.read_text()
    assert "kept" in text and bench.HEADING in text  # its own section added, the other kept
    assert text.count("| rare praise | ") == len(bench.KINDS) + 2  # a summary row per kind, a row per seed


def test_seeds_run_apart_merge_into_one_result_only_with_the_same_settings(bench):
    def part(seed, reward, value, rounds=3):
        settings = {"seeds": [seed], "rewards": [reward], "kinds": ["k"], "rounds": rounds}
        runs = [{"seed": seed, "reward": reward, "kind": "k", "value": value}]
        return {"settings": settings, "recipe_overrides": [], "runs": runs, "kinds": {"k": ""}, "rarity": value}

    both = bench.merged([part(42, "a", 1), part(44, "a", 2), part(42, "b", 3), part(42, "a", 4)])
    assert both["settings"]["seeds"] == [42, 44] and both["settings"]["rewards"] == ["a", "b"]
    # the later run of seed 42, reward a replaces the first; seeds, then rewards, in order
    assert [(r["seed"], r["reward"], r["value"]) for r in both["runs"]] == [(42, "a", 4), (42, "b", 3), (44, "a", 2)]
    assert both["rarity"] == 4  # the last file's
    with pytest.raises(SystemExit, match="differ in \\['rounds'\\]"):
        bench.merged([part(42, "a", 1), part(44, "a", 2, rounds=2)])


def fake_sft(folder, *args):
    """Stands in for the SFT run (seconds, not minutes): the reuse check reads the marked folder, not the model."""
    (folder / "model.safetensors").write_bytes(b"weights")
    return []


def test_models_from_a_run_of_other_settings_is_refused_naming_the_setting(bench, tmp_path, monkeypatch, capsys):
    """Was: --models_from checked the models' files (their sha256) but not what they were trained with, so a run of
    other SFT settings reused them silently. The marker records the settings and their sha256 (train_reference)."""
    from dpo.offline import sentiment

    monkeypatch.setattr(sentiment, "_train_reference_into", fake_sft)

    def job(workdir, models_from, *recipe_argv):
        args = argparse.Namespace(
            rounds=1, prompts_per_round=32, eval_prompts=16, workdir=str(tmp_path / workdir), models_from=models_from
        )
        job = bench.Job(args, list(recipe_argv))
        job.train_models()
        return job

    earlier = tmp_path / "earlier"
    job("earlier", None, "--sft_steps", "10")
    reused = job("same", str(earlier), "--sft_steps", "10")
    assert (reused.pi_ref, reused.opposite) == (earlier / "pi_ref", earlier / "opposite")
    with pytest.raises(UserError) as err:
        job("other", str(earlier), "--sft_steps", "20")
    assert f"--models_from {earlier}: {earlier / 'pi_ref'} is not a model this benchmark trained" in str(err.value)
    assert "(trained with other settings: sft_steps 10 there, 20 here)" in str(err.value)
    # the same settings, the tone swapped: the opposite-tone model is not pi_ref, named by the setting that differs
    (earlier / "swapped").mkdir()
    for name, other in (("pi_ref", "opposite"), ("opposite", "pi_ref")):
        (earlier / name).rename(earlier / "swapped" / other)
    with pytest.raises(UserError, match=r"pi_ref is not a model .*\(trained with other settings: task_tone\)"):
        job("swapped", str(earlier / "swapped"), "--sft_steps", "10")

    # through the entry point: one line, exit 2; a marker from before settings were recorded is refused too
    marker = earlier / "swapped" / "pi_ref" / MARKER
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in record.items() if not k.startswith("settings")}))
    argv = ["rounds_offpolicy.py", "--rounds", "1", "--prompts_per_round", "32", "--eval_prompts", "16"]
    argv += ["--sft_steps", "10", "--models_from", str(earlier / "swapped"), "--workdir", str(tmp_path / "w")]
    argv += ["--out", str(tmp_path / "out"), "--benchmarks_md", str(tmp_path / "BENCHMARKS.md")]  # kept apart
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    [line] = message_lines(capsys.readouterr().err)
    assert line.startswith("error: --models_from") and f"{marker} records no training settings" in line, line


def test_a_partial_run_into_the_committed_results_is_refused_before_anything_runs(
    bench, tmp_path, monkeypatch, capsys
):
    """The docstring's quick look (--seeds 42 --rounds 1 ...) with the default --out and --benchmarks_md would
    have replaced the committed 3-seed results and section with its own once it finished."""
    argv = ["rounds_offpolicy.py", "--seeds", "42", "--rounds", "1", "--sft_steps", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--workdir", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and err[-1].startswith("error: --seeds [42], --rounds 1, --sft_steps 20: ")
    assert "not the committed benchmark's settings" in err[-1] and "--out and --benchmarks_md" in err[-1], err
    assert not (tmp_path / "work").exists()
