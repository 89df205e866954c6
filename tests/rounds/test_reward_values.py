"""The rounds' reward as user code kept apart from the run (dpo/rounds/reward.py): what a reward function may
return (any real number, also a numpy scalar or a 0-d array or tensor, as a plain float), and what ends the run
in one line naming the function, the answer and the value or the exception: values that are no reward or too
large for the run's arithmetic, exceptions, sys.exit, a module that fails to import (its traceback saved in the
run folder). Ctrl-C inside it is a stop, not its error."""

import math
import sys

import numpy
import pytest
import torch

from dpo.errors import UserError
from dpo.evaluation.judge import mean_interval
from dpo.rounds.loop import sample_stats
from dpo.rounds.reward import REWARD_BOUND, TRACEBACK_FILE, make_reward, reward_value

REWARDS = """
import sys


def zero_d_tensor(prompt, completion):
    import torch

    return torch.tensor(float(len(completion)), requires_grad=True) * 1


def numpy_number(prompt, completion):
    import numpy

    return numpy.int64(len(completion))


def zero_d_array(prompt, completion):
    import numpy

    return numpy.array(len(completion) / 2)


def returns(prompt, completion):
    return VALUE


def raises(prompt, completion):
    raise ValueError(f"no rule for {completion!r}")


def exits(prompt, completion):
    sys.exit(0)


def ctrl_c(prompt, completion):
    raise KeyboardInterrupt
"""

BROKEN = {
    "a syntax error": ("def score(prompt, completion)\n    return 1\n", "SyntaxError"),
    "an exception at import": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "sys.exit at import": ("import sys\nsys.exit(0)\n", "sys.exit(0)"),
    "a missing dependency": ("import not_installed_anywhere_xyz\n", "ModuleNotFoundError"),
}


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    """The module above as `user_rewards` (fresh for each test), and the run folder tracebacks go to."""
    (tmp_path / "user_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_rewards", raising=False)
    return tmp_path / "run"


def where(i: int) -> str:
    return f"round 2's prompt {i // 2 + 1}, answer {i % 2 + 1}"


@pytest.mark.parametrize("name", ["zero_d_tensor", "numpy_number", "zero_d_array"])
def test_a_0d_tensor_a_numpy_number_or_a_0d_array_is_taken_as_a_plain_float(rewards, name):
    """Was: a 0-d tensor was told it "must return a finite number"."""
    scores = make_reward(f"user_rewards:{name}", rewards)(["p", "p"], ["abcd", "de"])
    expected = [2.0, 1.0] if name == "zero_d_array" else [4.0, 2.0]
    assert scores == expected and all(type(s) is float for s in scores)  # plain floats, as samples.jsonl holds


@pytest.mark.parametrize(
    "value, shown, problem",
    [
        ("1.7e308", "1.7e+308", "beyond +-1e+100"),  # finite, yet the mean became inf and the interval NaN
        ("-1.7e308", "-1.7e+308", "beyond +-1e+100"),
        ("10**400", "10000000000", "too large for a float64"),  # was: an OverflowError traceback
        ("1e101", "1e+101", "beyond +-1e+100"),
        ("float('nan')", "nan", "not finite"),
        ("float('-inf')", "-inf", "not finite"),
        ("True", "True", "a boolean"),
        ("'3.5'", "'3.5'", "str, not a real number"),
        ("__import__('torch').tensor([1.0, 2.0])", "tensor([1., 2.])", "shape (2,), not one number"),
        ("__import__('numpy').bool_(True)", "True", "a boolean"),
        ("1j", "1j", "complex, not a real number"),
    ],
)
def test_a_value_that_is_no_reward_is_one_line_naming_function_answer_and_value(rewards, value, shown, problem):
    (rewards.parent / "user_rewards.py").write_text(REWARDS.replace("VALUE", value))
    with pytest.raises(UserError) as err:
        make_reward("user_rewards:returns", rewards)(["p", "q"], ["abc", "de"], label=where)
    line = str(err.value)
    assert "\n" not in line and line.startswith("reward user_rewards:returns returned ")
    assert shown in line and problem in line and "round 2's prompt 1, answer 1" in line, line
    assert len(line) < 600  # 10**400's 401 digits are cut


def test_the_bound_keeps_every_number_made_from_rewards_finite():
    """REWARD_BOUND's reason, checked: rewards at +-the bound give finite means, best-of-K, margins and
    95% intervals (whose variance sums squared differences) over many answers; one step beyond the float64
    range is what the bound refuses."""
    assert reward_value(REWARD_BOUND) == (REWARD_BOUND, None) and reward_value(-REWARD_BOUND)[1] is None
    values = [REWARD_BOUND, -REWARD_BOUND] * 5_000
    samples = [{"answers": [{"reward": v} for v in values[i : i + 4]]} for i in range(0, len(values), 4)]
    stats = sample_stats(samples)
    assert all(math.isfinite(stats[k]) for k in ("mean_reward", "best_of_k"))
    assert all(math.isfinite(x) for x in mean_interval(values)) and math.isfinite(REWARD_BOUND - -REWARD_BOUND)
    assert not all(math.isfinite(x) for x in mean_interval([1.7e308, -1.7e308] * 2))  # what 1.7e308 did


@pytest.mark.parametrize(
    "name, said", [("raises", "raised ValueError: no rule for 'de'"), ("exits", "called sys.exit(0)")]
)
def test_an_exception_or_sys_exit_in_the_reward_is_one_line_with_its_traceback_saved(rewards, name, said):
    """Was: a traceback, exit 1; sys.exit(0) ended the run with exit 0, nothing trained and no message."""
    reward = make_reward(f"user_rewards:{name}", rewards)
    with pytest.raises(UserError) as err:
        reward(["p", "q"], ["de", "fg"], label=where)
    line, saved = str(err.value), rewards / TRACEBACK_FILE
    assert "\n" not in line and f"reward user_rewards:{name}" in line and "round 2's prompt 1, answer 1" in line
    assert said in line and str(saved) in line, line
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and f"in {name}" in text and "user_rewards.py" in text


def test_ctrl_c_inside_the_reward_stops_the_run_and_is_not_called_its_error(rewards):
    with pytest.raises(KeyboardInterrupt):
        make_reward("user_rewards:ctrl_c", rewards)(["p"], ["de"])
    assert not (rewards / TRACEBACK_FILE).exists()


@pytest.mark.parametrize("case", BROKEN)
def test_a_reward_module_that_fails_to_import_is_one_line_with_its_traceback_saved(tmp_path, monkeypatch, case):
    """Was: a SyntaxError traceback (any error at import but a missing module itself)."""
    source, said = BROKEN[case]
    (tmp_path / "broken_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_reward", raising=False)
    with pytest.raises(UserError) as err:
        make_reward("broken_reward:score", tmp_path / "run")
    line = str(err.value)
    assert "\n" not in line and line.startswith("reward broken_reward:score: importing broken_reward ")
    assert said in line and str(tmp_path / "run" / TRACEBACK_FILE) in line, line
    assert "broken_reward.py" in (tmp_path / "run" / TRACEBACK_FILE).read_text()


def test_a_reward_module_that_is_not_there_is_still_named_as_not_on_the_path(tmp_path):
    with pytest.raises(UserError, match="cannot import no_such_reward_module_xyz .*PYTHONPATH"):
        make_reward("no_such_reward_module_xyz:score", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing to trace back: the module is not there


def save_reward_model(folder, seed: int) -> None:
    """A tiny sequence-classification reward model (random weights from `seed`) with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from dpo.offline.tiny import build_tokenizer, tiny_phi_config

    tokenizer = build_tokenizer()
    config = tiny_phi_config(len(tokenizer), num_labels=1, pad_token_id=tokenizer.eos_token_id)
    config.architectures = ["PhiForSequenceClassification"]
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_reward_model_scoring_nan_is_one_line_naming_the_model_and_the_answer(tmp_path):
    from dpo.rounds.reward import ModelReward

    save_reward_model(tmp_path / "rm", seed=0)
    reward = ModelReward(str(tmp_path / "rm"))
    assert all(math.isfinite(s) for s in reward(["p", "q"], ["ab", "cd"]))
    with torch.no_grad():
        reward.model.score.weight.fill_(float("nan"))  # damaged weights
    with pytest.raises(UserError) as err:
        reward(["p", "q"], ["ab", "cd"], label=where)
    line = str(err.value)
    assert f"reward model {tmp_path / 'rm'} scored round 2's prompt 1, answer 1 nan" in line and "\n" not in line


def test_numpy_scalars_pass_through_reward_value_unchanged_in_value():
    assert reward_value(numpy.float32(0.25)) == (0.25, None) and reward_value(numpy.array(-3)) == (-3.0, None)
    assert reward_value(torch.tensor(1.5, dtype=torch.bfloat16)) == (1.5, None)


def test_a_reward_models_identity_is_its_weights(tmp_path):
    """What samples record as having scored them: other weights under the same folder name are another identity."""
    from dpo.rounds.reward import ModelReward

    save_reward_model(tmp_path / "rm", seed=0)
    first = ModelReward(str(tmp_path / "rm")).identity()
    assert ModelReward(str(tmp_path / "rm")).identity() == first
    save_reward_model(tmp_path / "rm", seed=1)  # retrained in place
    assert ModelReward(str(tmp_path / "rm")).identity() != first
