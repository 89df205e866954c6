"""benchmarks/frontier_record.py: the offline frontier records what it was measured from (pi_ref's settings, its
held-out scoring) and the benchmarks that place rounds on it refuse rounds that started elsewhere, or a CSV that
is not the one recorded. The committed configs start where the frontier does."""

from __future__ import annotations

import runpy
import sys

import pytest
from helpers import ROOT

from dpo.errors import UserError
from dpo.folders import MODEL_KIND, write_marked_folder
from dpo.offline.sentiment import SentimentTask, _sha256, reference_settings
from dpo.rounds.sentiment import task_of
from dpo.train.config import load_recipe_args

sys.path.insert(0, str(ROOT / "benchmarks"))
from frontier_record import RECORD, check_same_start, read_record, write_record  # noqa: E402
from frontier_sentiment import DEFAULT_RECIPE_OVERRIDES, EVAL_PROMPTS, RECIPE  # noqa: E402


def pi_ref(folder, settings: dict):
    """A folder marked as train_reference marks the pi_ref it trains (its settings and their sha256)."""
    write_marked_folder(folder, lambda f: (f / "model.safetensors").write_bytes(b"w"), MODEL_KIND,
                        settings=settings, settings_sha256=_sha256(settings))  # fmt: skip
    return folder


def test_the_rounds_benchmarks_pi_ref_is_the_frontiers(tmp_path):
    """The settings that decide pi_ref (and the held-out prompts) from the frontier's recipe and overrides, and from
    recipes/dpo_rounds_sentiment.yaml that rounds_sentiment.py and rounds_sweep.py run: the same identity, and the
    same held-out scoring (prompts, answer length)."""
    script_arguments = runpy.run_path(str(RECIPE))["ScriptArguments"]
    demo, demo_training, _ = load_recipe_args(
        script_arguments, RECIPE, ["--output_dir", str(tmp_path / "f"), *DEFAULT_RECIPE_OVERRIDES]
    )
    rounds_recipe = runpy.run_path(str(ROOT / "recipes" / "dpo_rounds.py"))
    rounds, rounds_training, _ = load_recipe_args(
        rounds_recipe["ScriptArguments"],
        ROOT / "recipes" / "dpo_rounds.py",
        ["--config", str(ROOT / "recipes" / "dpo_rounds_sentiment.yaml"), "--output_dir", str(tmp_path / "r")],
        output_kind="rounds",
    )
    task = SentimentTask(seed=demo.task_seed, heldout_topics=demo.heldout_topics)
    frontier = reference_settings(task, demo, demo_training)
    assert frontier == reference_settings(task_of(rounds), rounds, rounds_training)
    assert rounds.max_new_tokens == demo.max_new_tokens and rounds.eval_prompts == EVAL_PROMPTS


def test_a_frontier_is_checked_against_the_rounds_that_use_it(tmp_path, capsys):
    settings = {"task_seed": 0, "sft_steps": 100, "seed": 42}
    csv_path = tmp_path / "frontier.csv"
    csv_path.write_text("loss_type,beta,step,policy_reward,kl\nsigmoid,0.1,0,0.02,0.0\n")
    assert read_record(csv_path) is None  # a CSV from before records: used, said
    assert f"has no {RECORD}" in capsys.readouterr().out

    record = write_record(csv_path, pi_ref(tmp_path / "frontier_ref", settings), 256, 16)
    assert read_record(csv_path) == record
    check_same_start(record, csv_path, pi_ref(tmp_path / "same" / "sft_reference", settings), 256, 16)  # passes
    for other, prompts, tokens, named in (
        ({**settings, "sft_steps": 50}, 256, 16, "pi_ref_settings_sha256"),
        (settings, 64, 16, "eval_prompts: 256 (frontier) vs 64 (rounds)"),
        (settings, 256, 32, "max_new_tokens: 16 (frontier) vs 32 (rounds)"),
    ):
        folder = pi_ref(tmp_path / f"other-{prompts}-{tokens}-{len(str(other))}" / "sft_reference", other)
        with pytest.raises(UserError, match="did not start where") as error:
            check_same_start(record, csv_path, folder, prompts, tokens)
        assert named in str(error.value) and "nothing was written" in str(error.value)

    csv_path.write_text(csv_path.read_text() + "sigmoid,0.1,9,0.05,0.1\n")  # rewritten after its record
    with pytest.raises(UserError, match="is not the frontier .* records"):
        read_record(csv_path)


@pytest.mark.parametrize("script", ["rounds_sentiment", "rounds_sweep"])
def test_the_rounds_benchmarks_refuse_a_frontier_edited_after_its_record_before_any_run(
    script, tmp_path, monkeypatch, capsys
):
    from helpers import load_script

    out = tmp_path / "results"
    out.mkdir()
    (out / "frontier.csv").write_text("loss_type,beta,step,policy_reward,kl\nsigmoid,0.1,0,0.02,0.0\n")
    write_record(out / "frontier.csv", pi_ref(tmp_path / "ref", {"seed": 42}), 256, 16)
    (out / "frontier.csv").write_text("loss_type,beta,step,policy_reward,kl\nsigmoid,0.1,0,0.09,0.0\n")
    module = load_script(ROOT / "benchmarks" / f"{script}.py")
    monkeypatch.setattr(module, "run", lambda *a: pytest.fail("a rounds run started"), raising=False)
    monkeypatch.setattr(module, "run_config", lambda *a: pytest.fail("a rounds run started"), raising=False)
    monkeypatch.setattr(sys, "argv", [script, "--workdir", str(tmp_path / "work"), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and "is not the frontier" in err[-1], err
