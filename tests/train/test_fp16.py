"""fp16 mixed precision that cannot crash or silently go NaN (dpo/compat.py, dpo/train/attention.py,
dpo/train/safety/guards.py), as far as a CPU can show it: the dtypes build_dpo_trainer leaves, phi-2's eager
attention overflowing in fp16 and the fp32-scores variant that replaces it, and the non-finite guard
stopping an fp16 run. On CPU accelerate runs fp16 without autocast and without a gradient scaler;
tests/test_gpu.py trains with both on a GPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import load_recipe, overflowing_qkv, recipe_trainer
from test_run_safety import PoisonAt, flags
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM
from transformers.models.phi.modeling_phi import eager_attention_forward

from dpo.compat import ModelConfig
from dpo.train.attention import EAGER_FP32_SCORES, attention_implementation, eager_fp32_scores
from dpo.train.config import RecipeDPOConfig
from dpo.train.model_checks import model_init_kwargs
from dpo.train.safety.guards import MIN_LOSS_SCALE, NonFiniteGuard, NonFiniteTraining


def trainable_dtypes(trainer) -> set:
    return {p.dtype for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "precision, dtype, expected",
    [
        pytest.param({"fp16": True}, "float16", torch.float32, id="fp16_float16"),  # TRL would leave bf16
        pytest.param({"fp16": True}, "float32", torch.float32, id="fp16_float32"),
        pytest.param({}, "float32", torch.float32, id="fp32"),  # fp32 compute (CPU; a T4 with --fp16 false)
        pytest.param({"bf16": True}, "bfloat16", torch.bfloat16, id="bf16"),  # keeps TRL's (QLoRA's) bf16
    ],
)
def test_trainable_lora_weights_are_float32_whenever_compute_is_fp16_or_fp32(
    precision, dtype, expected, tiny_model_dir, tmp_path
):
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run", dtype=dtype, **precision)
    assert trainer.args.fp16 == precision.get("fp16", False)
    assert trainable_dtypes(trainer) == {expected}


def test_an_fp16_float16_run_trains_with_float32_lora_weights(tiny_model_dir, tmp_path):
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run", dtype="float16", fp16=True, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(after[n], w) for n, w in before.items())  # it trained


class Heads(torch.nn.Module):
    num_key_value_groups = 1  # what eager_attention_forward reads from PhiAttention


def test_phi_eager_attention_overflows_in_fp16_and_the_fp32_scores_variant_does_not():
    q, k, v, mask = overflowing_qkv()
    scaling = 80**-0.5
    theirs, _ = eager_attention_forward(Heads().eval(), q, k, v, mask.half(), scaling=scaling)
    assert not torch.isfinite(theirs).all()  # transformers 5.23: inf scores, NaN softmax
    ours, _ = eager_fp32_scores(Heads().eval(), q, k, v, mask.half(), scaling=scaling)
    want, _ = eager_attention_forward(Heads().eval(), q.float(), k.float(), v.float(), mask, scaling=scaling)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    # the only difference from the fp32 computation is rounding the output to fp16: half an fp16 ulp
    assert (ours.float() - want).abs().max() <= (want.abs().max() * 2**-11).item()


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_sdpa_the_default_attention_stays_finite_on_the_same_fp16_inputs(backend):
    q, k, v, _ = overflowing_qkv()
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    with sdpa_kernel([backend]):  # FLASH_ATTENTION: PyTorch's CPU flash kernel
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() <= (want.abs().max() * 2**-10).item()  # one fp16 ulp of the output


def test_fp16_turns_an_eager_request_into_fp32_scores_and_leaves_sdpa(tiny_model_dir):
    def kwargs(attn, fp16):
        model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), attn_implementation=attn)
        return model_init_kwargs(model_args, RecipeDPOConfig(output_dir="unused", fp16=fp16, use_cpu=True))

    assert kwargs("eager", True)["attn_implementation"] == EAGER_FP32_SCORES
    assert kwargs("eager", False)["attn_implementation"] == "eager"
    assert kwargs(None, True)["attn_implementation"] is None  # transformers' default: sdpa
    assert attention_implementation("sdpa", True) == "sdpa"


def test_a_model_loaded_with_fp32_scores_computes_what_eager_does(tiny_model_dir):
    """The registered function and its mask (padding + causal) really are eager's: same logits in fp32."""
    ids = torch.tensor([[5, 9, 14, 3, 7, 2], [8, 4, 6, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    logits = {}
    for attn in ("eager", EAGER_FP32_SCORES):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
        assert model.config._attn_implementation == attn
        logits[attn] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[EAGER_FP32_SCORES][real], logits["eager"][real], rtol=0, atol=0)


def test_the_non_finite_guard_stops_an_fp16_run(tiny_model_dir, truthy_file, tmp_path, capsys):
    argv = flags(tiny_model_dir, truthy_file, tmp_path / "run", "--max_steps", "4", "--save_strategy", "no")
    with pytest.raises(SystemExit) as stopped:
        load_recipe("dpo_phi2").main([*argv, "--fp16", "true"], callbacks=[PoisonAt(2, "loss")])
    assert stopped.value.code == 3
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("stopped: "))
    assert "step 2: the loss is nan" in line
    # fp16 is a T4's default (dpo/train/hardware.py): the way back to fp32 compute comes first
    assert (
        "the default on a GPU without bf16, such as a T4): rerun in fp32 compute with --fp16 false --dtype float32"
        in line
    )


@pytest.mark.parametrize("scale, stops", [(MIN_LOSS_SCALE / 2, True), (2.0**16, False)])
def test_the_guard_stops_when_the_fp16_loss_scale_collapses(scale, stops, tiny_model_dir, tmp_path):
    """A real torch GradScaler (CPU has none from accelerate): a scale below 1 means every step overflows."""
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run", fp16=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard))
    guard.losses = torch.tensor(0.69)  # a finite loss for the step being checked
    if stops:
        with pytest.raises(NonFiniteTraining, match="fp16 loss scale"):
            guard.check(trainer.model, 1)
    else:
        guard.check(trainer.model, 1)
