"""dpo/train/speed/packing.py: packed pairs give the padded path's loss, metrics and gradients (TRL's own
padded DPOTrainer step is the reference), train with the reference cache, length grouping,
evaluation and resume, and refuse by name what they cannot serve."""

from types import SimpleNamespace

import pytest
import torch
from helpers import grads, recipe_trainer, rel_err
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from dpo.errors import UserError
from dpo.train.speed import packing
from dpo.train.speed.packing import check_packing, install_packing, pack, unpack

# How many times the reordering floor packed and padded may differ. The floor is the larger of two
# summation-order changes of the padded step itself: the batch reversed, and padded to a multiple of
# 64 (other GEMM and attention shapes, as packing makes). Measured on an AMD EPYC (AVX512-BF16):
# floor 4.9e-7 (gradients), packed 1.8e-7 = 0.4x; 8 leaves room for another CPU's kernels and is
# still far below a real error (test_the_bound_catches_attention_across_pairs: ~1e-1).
FLOOR_MULTIPLE = 8


def whole_row(module, q, k, v, attention_mask, position_ids=None, **kwargs):
    """A packed row as one causal sequence: what a model without packed-sequence masks would run."""
    return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)


WHOLE_ROW = "whole_row_test"
AttentionInterface.register(WHOLE_ROW, whole_row)
AttentionMaskInterface.register(WHOLE_ROW, lambda **kwargs: None)


def step(trainer, reverse=False, backward=True):
    """One training step's loss, LoRA gradients and per-pair policy log-probs on the first 4 pairs, with
    the adapters moved off zero (seeded) so that policy and reference differ. `backward=False`: no
    gradients (None), for kernels without a backward on a CPU (test_packed_attention.py)."""
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows[::-1] if reverse else rows)
    generator = torch.Generator().manual_seed(1)
    for name, param in sorted(trainer.model.named_parameters()):
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    with trainer._lm_head(), torch.set_grad_enabled(backward):
        loss = trainer.compute_loss(trainer.model, batch)
        if backward:
            loss.backward()
    g = grads(trainer.model) if backward else None
    flat = torch.cat([g[n].flatten() for n in sorted(g)]) if backward else None
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), flat, metrics


@pytest.fixture(scope="module")
def steps(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    padded = recipe_trainer(tiny_model_dir, tmp / "padded")
    out = {"padded": step(padded), "reversed": step(padded, reverse=True)}
    padded.data_collator.pad_to_multiple_of = 64
    out["pad64"] = step(padded)
    packed = recipe_trainer(tiny_model_dir, tmp / "packed", packing=True)
    out["packed"] = step(packed)
    out["trainer"] = packed
    return out


def distances(run, base) -> dict[str, float]:
    loss, flat, metrics = run
    d = {"loss": abs(loss - base[0]) / abs(base[0])}
    if flat is not None:
        d["gradients"] = rel_err(flat, base[1])
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        d[key] = abs(metrics[key] - base[2][key]) / abs(base[2][key])
    return d


def floor(steps) -> float:
    """The larger reordering distance over every compared number; float32's resolution where none moved."""
    return max(
        2**-23,
        *distances(steps["reversed"], steps["padded"]).values(),
        *distances(steps["pad64"], steps["padded"]).values(),
    )


def test_packed_step_gives_the_padded_loss_metrics_and_gradients(steps):
    found, bound = distances(steps["packed"], steps["padded"]), FLOOR_MULTIPLE * floor(steps)
    assert steps["padded"][1].norm() > 0 and abs(steps["padded"][2]["rewards/margins"]) > 1e-3  # could fail
    assert max(found.values()) <= bound, (found, bound)


def test_the_bound_catches_attention_across_pairs(steps, monkeypatch):
    """The same packed step with each row's attention run over the whole row (sequences see each other)."""
    monkeypatch.setattr(packing, "segment_starts", lambda position_ids: [0, position_ids.shape[1]])
    found = distances(step(steps["trainer"]), steps["padded"])
    assert found["gradients"] > 100 * FLOOR_MULTIPLE * floor(steps), found


def test_pack_and_unpack_by_hand():
    """Rows [5 6 7 | pad] and [8 9 | pad pad]: one row 5 6 7 8 9, positions 0 1 2 0 1; the label of 8 (a
    sequence's first token) is masked; per-token values come back at (row, position) with zeros where padded."""
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    row = pack(ids, mask, ids.masked_fill(mask == 0, -100))
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert row["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    flat = torch.tensor([[10.0, 20.0, 30.0, 40.0]])  # next-token values at packed positions 0..3
    assert unpack(flat, row["index"], row["valid"]).tolist() == [[10.0, 20.0, 0.0], [40.0, 0.0, 0.0]]


def test_trains_with_cache_grouping_evaluation_and_resume(tiny_model_dir, tmp_path, capsys):
    """6 steps with packing, reference cache, length grouping and evaluation match the padded run's
    per-step losses and held-out metrics within FLOOR_MULTIPLE x the run's own reordering floor (the
    padded run padded to a multiple of 64); stopped at step 3 and resumed, the last steps agree too."""
    settings = dict(
        max_steps=6, save_strategy="steps", save_steps=3, train_sampling_strategy="group_by_length",
        eval_strategy="steps", eval_steps=3,
    )  # fmt: skip
    cache = tmp_path / "cache"
    padded = recipe_trainer(tiny_model_dir, tmp_path / "padded", cache, **settings)
    padded64 = recipe_trainer(tiny_model_dir, tmp_path / "padded64", cache, **settings)
    padded64.data_collator.pad_to_multiple_of = 64
    packed = recipe_trainer(tiny_model_dir, tmp_path / "packed", cache, packing=True, **settings)
    assert "packing: each batch's sequences run as one row" in capsys.readouterr().out
    for trainer in (padded, padded64, packed):
        trainer.train()
    checkpoint = str(tmp_path / "packed" / "checkpoint-3")
    resumed = recipe_trainer(
        tiny_model_dir, tmp_path / "packed", cache, packing=True, resume_from_checkpoint=checkpoint, **settings
    )
    resumed.train(resume_from_checkpoint=checkpoint)

    def logged(trainer, key, steps=range(1, 7)):
        return torch.tensor([h[key] for h in trainer.state.log_history if key in h and h["step"] in steps])

    keys = ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins")
    run_floor = max(2**-23, *(rel_err(logged(padded64, k), logged(padded, k)) for k in keys))
    assert len(logged(packed, "loss")) == 6 and len(logged(packed, "eval_loss")) == 2
    assert logged(padded, "loss")[-1] < logged(padded, "loss")[0] - 1e-3  # it trained: not trivially ln 2
    for key in keys:
        assert rel_err(logged(packed, key), logged(padded, key)) <= FLOOR_MULTIPLE * run_floor, key
        last = range(4, 7)
        assert rel_err(logged(resumed, key, last), logged(packed, key, last)) <= FLOOR_MULTIPLE * run_floor, key


def test_refuses_what_it_cannot_serve():
    plain = dict(packing=True, deepspeed=None, fsdp=None, padding_free=False)
    for change, named in (({"deepspeed": "ds.json"}, "DeepSpeed"), ({"fsdp": "full_shard"}, "FSDP")):
        with pytest.raises(UserError, match=f"packing: true is not supported under {named}"):
            check_packing(SimpleNamespace(**{**plain, **change}))
    with pytest.raises(UserError, match="padding_free: TRL 1.16 ignores it .* use packing: true"):
        check_packing(SimpleNamespace(**{**plain, "packing": False, "padding_free": True}))
    check_packing(SimpleNamespace(**plain))  # one process: accepted


def test_refuses_a_model_whose_attention_ignores_position_ids(tiny_model_dir, tmp_path):
    """An attention that runs a packed row as one causal sequence (as a model without packed-sequence
    masks would): the probe refuses it by model type and attention name, and the model is left unpacked."""

    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run")
    base = trainer.model.get_base_model()
    base.set_attn_implementation(WHOLE_ROW)
    unpacked = base.forward
    with pytest.raises(UserError, match="packing: true: phi with attn_implementation whole_row_test does not keep"):
        install_packing(trainer)
    assert base.forward == unpacked


def test_real_model_with_grouped_query_attention_keeps_packed_sequences_apart(smollm2_dir, tmp_path, capsys):
    """SmolLM2-135M (Llama: rotary positions, 9 query heads on 3 key/value heads), 4-bit: the probe of
    install_packing passes on the real weights, and a leak across sequences would not."""
    trainer = recipe_trainer(smollm2_dir, tmp_path / "run", packing=True)
    assert "packing: each batch's sequences run as one row without padding (attention sdpa_segments)" in (
        capsys.readouterr().out
    )
    base = trainer.model.get_base_model()
    drift, floor = packing.probe(base)
    assert drift <= packing.PROBE_MULTIPLE * max(floor, 2**-23)
    base.set_attn_implementation(WHOLE_ROW)
    # a leak moved the tiny model's hidden states 4e6x its floor; 1000x leaves room for other weights and CPUs
    assert packing.probe(base)[0] > 1000 * packing.PROBE_MULTIPLE * max(floor, 2**-23)
