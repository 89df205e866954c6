"""dpo/evaluation/judge.py's reward-model checks, before any weights load: a file given as the model, and a
config whose score head does not fit the saved weights (read from the safetensors headers); the rounds recipe's
reward model (dpo/rounds/reward.py) goes through the same checks under its own setting name, `reward`."""

import pytest
from helpers import reward_model

from dpo.errors import UserError
from dpo.evaluation.judge import check_reward_model


def test_a_config_whose_head_does_not_fit_the_weights_is_one_line_before_loading(tmp_path, no_weights_load):
    """The probe's case: config.json says num_labels 1, the weights hold score.weight [2, 64]. Was transformers'
    mismatch table and a RuntimeError inside from_pretrained (in evaluate, after the policy had loaded)."""
    folder = reward_model(tmp_path / "rm", num_labels=2, config_labels=1)
    with pytest.raises(UserError) as error:
        check_reward_model(str(folder))
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(
        f"--reward_model {folder}: score.weight is [2, 64] in model.safetensors, but its config.json (num_labels 1) "
        "makes it [1, 64]"
    ), message


def test_a_reward_model_whose_shapes_fit_passes_the_check(tmp_path, no_weights_load):
    """No false alarm: a one-score model as saved."""
    check_reward_model(str(reward_model(tmp_path / "rm", num_labels=1)))


def test_a_file_given_as_the_reward_model_is_named_as_a_file(tmp_path, no_weights_load):
    """Was "model folder not found" about a file that is there."""
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(UserError, match=rf"^--reward_model {rows} is a file, not a model folder: pass "):
        check_reward_model(str(rows))


def test_the_rounds_reward_model_checks_name_its_own_setting(tmp_path, no_weights_load):
    """dpo/rounds/reward.py shares the checks; its messages name `reward` (the rounds recipe has no --reward_model)."""
    from dpo.rounds.reward import ModelReward

    folder = reward_model(tmp_path / "rm", num_labels=2, config_labels=1)
    with pytest.raises(UserError, match=rf"^reward {folder}: score\.weight is \[2, 64\]") as error:
        ModelReward(str(folder))
    assert "--reward_model" not in str(error.value)
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("{}\n")
    with pytest.raises(UserError, match=rf"^reward {rows} is a file, not a model folder"):
        ModelReward(str(rows))


def test_a_mismatch_found_only_while_loading_is_one_line(tmp_path, monkeypatch, caplog):
    """A hub model's headers are not read before loading: transformers' own size-mismatch RuntimeError, raised by
    the real from_pretrained here (the header check switched off), becomes one line naming the tensor."""
    from transformers.utils import logging as hf_logging

    import dpo.evaluation.judge as judge

    folder = reward_model(tmp_path / "rm", num_labels=2, config_labels=1)
    monkeypatch.setattr(judge, "check_weight_shapes", lambda *args: None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # as outside the tests (conftest.py sets "error"): the report would show
    try:
        with pytest.raises(UserError) as error:
            judge.load_reward_model(str(folder), "cpu")
    finally:
        hf_logging.set_verbosity(verbosity)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--reward_model {folder}: its weights do not fit its config")
    assert "score.weight is [2, 64] in the weights, its config makes it [1, 64]" in message, message
    assert "LOAD REPORT" not in caplog.text  # transformers' table is not printed
