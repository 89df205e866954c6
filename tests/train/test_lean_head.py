"""dpo.compat.lean_cpu_lm_head: TRL's fused LM head on CPU scores only completion tokens, in narrow
tiles, and gives the same per-token log-probs and gradients as TRL's own CPU path."""

import pytest
import torch
import trl.trainer.utils as trl_utils
from helpers import load_recipe
from trl.trainer.utils import add_fused_lm_head

from dpo.compat import CPU_VOCAB_TILE, lean_cpu_lm_head
from dpo.offline.tiny import build_tiny_model, build_tokenizer


def scored(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    out.log_probs.sum().backward()
    return out.log_probs.detach(), model.model.embed_tokens.weight.grad.clone()


def test_same_log_probs_and_gradients_with_less_work(monkeypatch):
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 100)  # narrower than the vocab: several tiles
    model = build_tiny_model(build_tokenizer(), seed=0)
    add_fused_lm_head(model)
    ids = torch.randint(0, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    labels[2:, 20:] = -100  # padding
    theirs = scored(model, ids, labels)

    rows = []
    original = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(len(h)) or original(h, *a)
    )
    tiles = {"use_triton": trl_utils._use_triton, "chunk": trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE}
    with lean_cpu_lm_head():
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_VOCAB_TILE
        ours = scored(model, ids, labels)
    assert rows == [int((labels != -100)[:, 1:].sum())]  # completion positions only (after the shift)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)
    assert (ours[0][:, :9] == 0).all() and (ours[0] != 0).any()
    # outside the context TRL is its own again: the agreement tests compare with unpatched TRL
    assert {"use_triton": trl_utils._use_triton, "chunk": trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE} == tiles


@pytest.mark.slow
def test_recipe_trainer_leaves_trl_unchanged(tiny_model_dir, truthy_file, tmp_path):
    """Building and stepping the recipe trainer patches TRL only inside its own steps."""
    before = (trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    trainer = load_recipe("dpo_phi2").main(
        ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(truthy_file)]
        + ["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--gradient_accumulation_steps", "1"]
    )
    assert trainer.state.global_step == 1
    assert (trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE) == before
