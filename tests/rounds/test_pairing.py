"""Pairing rules of dpo/rounds/pairing.py: ties, margins, K = 2, never a text with itself."""

import random

import pytest

from dpo.rounds.pairing import make_pairs, pick_pair, training_rows


def row(prompt, *scored):
    return {"prompt": prompt, "answers": [{"text": t, "reward": r} for t, r in scored]}


def test_max_min_pairs_the_best_against_the_worst():
    best, worst, why = pick_pair(["a", "b", "c", "d"], [0.2, 0.9, -0.5, 0.1], "max_min", 0.0, random.Random(0))
    assert (best, worst, why) == (1, 2, None)


def test_k2_gives_the_same_pair_under_both_rules():
    for rule in ("max_min", "max_random"):
        assert pick_pair(["x", "y"], [0.1, 0.3], rule, 0.0, random.Random(0)) == (1, 0, None)


def test_max_random_takes_a_lower_scored_answer_never_the_best_or_a_tied_best():
    texts, rewards = ["a", "b", "c", "d", "e"], [0.5, 0.5, 0.1, -0.2, 0.3]
    picked = {pick_pair(texts, rewards, "max_random", 0.0, random.Random(s))[1] for s in range(200)}
    assert picked == {2, 3, 4}  # all the lower ones turn up, neither 0.5
    assert {pick_pair(texts, rewards, "max_random", 0.0, random.Random(s))[0] for s in range(20)} == {0}


def test_all_tied_rewards_give_no_pair_and_are_counted():
    pairs, counts = make_pairs([row("p", ("a", 0.2), ("b", 0.2), ("c", 0.2))], "max_min", 0.0, seed=0)
    assert pairs == [] and counts == {"kept": 0, "dropped": 1, "tie": 1, "near_tie": 0, "same_text": 0}


def test_a_margin_below_min_margin_gives_no_pair():
    samples = [row("p", ("a", 0.5), ("b", 0.25)), row("q", ("a", 0.9), ("b", 0.1))]  # margins 0.25 (exact), 0.8
    pairs, counts = make_pairs(samples, "max_min", 0.3, seed=0)
    assert [p["prompt"] for p in pairs] == ["q"] and counts["near_tie"] == 1 and counts["kept"] == 1
    pairs, counts = make_pairs(samples, "max_min", 0.25, seed=0)  # the margin itself is enough
    assert counts["kept"] == 2


def test_a_text_is_never_paired_with_itself():
    """Two samples can be the same string; with a reward model that scores a text by its position in a batch
    (or any non-deterministic reward) they could score apart: still no pair of one text with itself."""
    pairs, counts = make_pairs([row("p", ("same", 0.9), ("same", 0.1))], "max_min", 0.0, seed=0)
    assert pairs == [] and counts["same_text"] == 1
    pairs, _ = make_pairs([row("p", ("a", 0.9), ("a", 0.1), ("b", 0.0))], "max_min", 0.0, seed=0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]  # worst lower answer is another text


def test_pairs_carry_their_rewards_and_chat_prompts_become_messages():
    pairs, _ = make_pairs([row([{"role": "user", "content": "hi"}], ("good", 1.0), ("bad", -1.0))], "max_min", 0.0, 0)
    assert pairs[0]["chosen_reward"] == 1.0 and pairs[0]["rejected_reward"] == -1.0
    (rows,) = training_rows(pairs)
    assert rows["chosen"] == [{"role": "assistant", "content": "good"}]
    assert rows["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_an_unknown_rule_is_an_error():
    with pytest.raises(ValueError):
        pick_pair(["a", "b"], [1.0, 0.0], "max_max", 0.0, random.Random(0))
