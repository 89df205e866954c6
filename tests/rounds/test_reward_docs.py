"""docs/rewards.md, the reward functions' contract: its worked example runs through the recipe's own reward loader
with both kinds of prompt, and a reward module in the current folder is imported from there (it needed
PYTHONPATH=. before: `python recipes/dpo_rounds.py` puts recipes/ on the path, not the folder typed in)."""

import re
import sys

import pytest
from helpers import ROOT

from dpo.errors import UserError
from dpo.rounds.reward import make_reward

DOC = ROOT / "docs" / "rewards.md"


def example() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


@pytest.fixture
def in_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "brevity_reward", raising=False)
    yield tmp_path
    sys.modules.pop("brevity_reward", None)


def test_the_worked_example_scores_text_and_chat_prompts_from_the_current_folder(in_a_fresh_folder, capsys):
    (in_a_fresh_folder / "brevity_reward.py").write_text(example())
    reward = make_reward("brevity_reward:score", in_a_fresh_folder / "run")
    assert "brevity_reward imported from the current folder" in capsys.readouterr().out
    chat = [{"role": "user", "content": "Is the Moon made of cheese?"}]
    # ended and short: 1.0; not ended: 0.0; ended but 15 words, 3 past twice the question's 6: 1.0 - 0.3
    long_answer = "No, it is rock: mostly silicate minerals and metals, with a small iron core, really."
    scores = reward([chat, "Is the Moon made of cheese?", chat], ["No, it is rock.", "No", long_answer])
    assert scores == pytest.approx([1.0, 0.0, 0.7])
    assert reward.identity() == make_reward("brevity_reward:score", in_a_fresh_folder / "run").identity()


def test_a_module_neither_on_the_path_nor_here_names_both_places(in_a_fresh_folder):
    with pytest.raises(UserError, match=r"neither on the Python path nor a file nowhere_reward\.py in the current"):
        make_reward("nowhere_reward:score", in_a_fresh_folder / "run")


def test_a_module_here_that_fails_to_import_is_not_said_imported(in_a_fresh_folder, capsys):
    """Was: "imported from the current folder", then the import's failure. Its traceback is saved whole."""
    (in_a_fresh_folder / "brevity_reward.py").write_text("def score(prompt, completion:\n")
    with pytest.raises(UserError, match="its traceback is in") as error:
        make_reward("brevity_reward:score", in_a_fresh_folder / "run")
    assert "imported from the current folder" not in capsys.readouterr().out
    saved = in_a_fresh_folder / "run" / str(error.value).rsplit("its traceback is in ", 1)[1].split("/")[-1]
    assert "SyntaxError" in saved.read_text()
