"""Evaluate's log-probabilities (dpo/evaluation/scoring.py): a prompt fed once, its answers over its KV cache. They
must equal what the model gives each row fed whole (dpo.scratch.logps.completion_logps, the plain forward that
evaluate ran before), and the work is counted: one forward over each distinct prompt, one over its answers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Bound on |shared-prompt - whole-row| relative to the row's log-probability (a sum of 1-60 token log-probs; every
# row's sum is below -1 here, checked: never near zero). The two differ only in float32 summation order: attention over a cache against
# over the whole row, and the token sum split in two. Measured on these rows: 1.9e-7 relative on the tiny model,
# 2.4e-6 on SmolLM2-135M (the same rows fed alone against in one padded batch: 7.6e-6 and 1.5e-5 absolute). The
# bound, 2^-16 = 1.5e-5, is 6x the larger; scoring one token too few or too many moves a row by a whole token's
# log-probability (1e-2 relative or more), which it catches.
RELATIVE_BOUND = 2.0**-16


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model with a LoRA adapter that changes its outputs, as evaluate holds pi_theta (a PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config, adapter_name="policy").eval()


def rows_sharing_prompts(vocab: int) -> list[tuple[list[int], list[int]]]:
    """Three prompts of different lengths, each with answers of 1, 13 and 60 tokens (as chosen, rejected and a
    sampled answer share a held-out prompt), an empty answer, and a row whose prompt is empty."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    rows = [(prompt, ids(n)) for prompt in (ids(40), ids(7), ids(120)) for n in (1, 13, 60)]
    return rows + [(rows[0][0], []), ([], ids(9))]


@pytest.mark.parametrize("batch_size", [8, 2], ids=["a prompt's answers in one forward", "two at a time"])
def test_shared_prompt_log_probs_equal_the_whole_row_forward(policy, batch_size):
    from dpo.evaluation.scoring import logps_sharing_prompts
    from dpo.scratch.logps import completion_logps

    rows = rows_sharing_prompts(policy.config.vocab_size)
    ours = logps_sharing_prompts(policy, rows, batch_size=batch_size)
    whole = torch.cat([completion_logps(policy, [p], [a], pad_id=0) for p, a in rows])
    assert ours[-2] == 0.0 and whole[-2] == 0.0  # an empty answer: nothing scored
    scored = torch.cat([torch.arange(len(rows) - 2), torch.tensor([len(rows) - 1])])
    assert (whole[scored] < -1.0).all()  # far from zero, so a relative bound means something
    relative = ((ours[scored] - whole[scored]).abs() / whole[scored].abs()).max().item()
    assert relative <= RELATIVE_BOUND, f"{relative:.2e} relative: {ours.tolist()} against {whole.tolist()}"


@pytest.mark.parametrize("batch_size", [8, 2])
def test_each_distinct_prompt_is_fed_once_and_its_answers_together(policy, batch_size):
    from dpo.evaluation.scoring import logps_sharing_prompts

    shapes, kept = [], []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        kept.append(kwargs.get("logits_to_keep"))

    rows = rows_sharing_prompts(policy.config.vocab_size)
    handle = policy.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        logps_sharing_prompts(policy, rows, batch_size=batch_size)
    finally:
        handle.remove()
    # per prompt: one forward over it alone (the vocabulary at its last position only), then its answers side by
    # side (padded to the longest), `batch_size` at a time; the empty answer adds no row; the row with no prompt is
    # fed as it is
    answers = [(3, 60)] if batch_size == 8 else [(2, 13), (1, 60)]
    want = [shape for length in (40, 7, 120) for shape in [(1, length), *answers]]
    assert shapes == want + [(1, 9)], shapes
    assert [k for k, shape in zip(kept, shapes) if shape[0] == 1 and shape[1] in (40, 7, 120)] == [1, 1, 1]


def test_a_cache_that_cannot_be_repeated_falls_back_to_whole_rows(policy, monkeypatch):
    """A model whose cache has no batch_repeat_interleave (remote code with a cache of its own) gets each row fed
    whole, the forward this replaced: the same values within the bound."""
    import transformers

    from dpo.evaluation.scoring import logps_sharing_prompts
    from dpo.scratch.logps import completion_logps

    owner = next(c for c in transformers.DynamicCache.__mro__ if "batch_repeat_interleave" in vars(c))
    monkeypatch.delattr(owner, "batch_repeat_interleave")
    rows = rows_sharing_prompts(policy.config.vocab_size)[:3]
    ours = logps_sharing_prompts(policy, rows)
    whole = torch.cat([completion_logps(policy, [p], [a], pad_id=0) for p, a in rows])
    assert ((ours - whole).abs() / whole.abs()).max().item() <= RELATIVE_BOUND
