"""dpo/train/speed/dequant.py: on a CPU, evaluation and sampling use the 4-bit base dequantized once, and get what
the 4-bit layers compute: logits of the policy (adapter on) and of the reference (adapters off) agree with the
4-bit model within float32 summation-order noise, on the recipes' own 4-bit set-up (NF4, double quantization)."""

import torch
from helpers import load_qlora

from dpo.train.speed.dequant import dense_bytes, dequantized_4bit_layers, four_bit_layers
from dpo.train.speed.kernels import use_portable_4bit_kernels

IDS = torch.arange(48).reshape(3, 16) % 300
# Relative to max(1, max |logit|): the same weights in float32, only where the dequantization happens differs
# (inside the 4-bit kernel's call, or once before): 0.0 measured on an AMD EPYC (the same dequantize and matmul);
# 1e-4, the export's float32 merge bound (dpo/evaluation/export.py TOLERANCE), leaves room for a kernel that sums
# in another order. A weight off by one bf16 rounding (2^-8 relative)
# moves these logits by ~1e-3 of their scale, ten times this bound.
BOUND = 1e-4


def qlora(model_dir):
    model = load_qlora(model_dir, init_lora_weights=False)
    use_portable_4bit_kernels(model)
    return model.eval()


@torch.no_grad()
def logits(model):
    policy = model(input_ids=IDS).logits
    with model.disable_adapter():
        reference = model(input_ids=IDS).logits
    return policy, reference


def test_the_dense_model_computes_what_the_4bit_one_does(tiny_model_dir):
    model = qlora(tiny_model_dir)
    n_4bit = len(four_bit_layers(model))
    before = logits(model)
    n, why = dequantized_4bit_layers(model, available=2**40)
    assert n == n_4bit > 0 and four_bit_layers(model) == [], why
    after = logits(model)
    for old, new in zip(before, after):
        assert (new - old).abs().max() <= BOUND * max(1.0, old.abs().max().item())
    assert not torch.equal(before[0], before[1])  # the adapter is on in one and off in the other: both are checked


def test_a_weight_rounded_once_more_is_caught(tiny_model_dir):
    """The bound is tight enough to see a dequantization that is off by one bf16 rounding (a real error: a
    half-precision compute dtype where the run used float32)."""
    model = qlora(tiny_model_dir)
    before = logits(model)[0]
    dequantized_4bit_layers(model, available=2**40)
    for module in model.modules():
        frozen = isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
        if frozen:
            module.weight.data = module.weight.data.bfloat16().float()
    after = logits(model)[0]
    assert (after - before).abs().max() > BOUND * max(1.0, before.abs().max().item())


def test_nothing_is_dequantized_where_the_dense_copy_would_not_fit(tiny_model_dir):
    model = qlora(tiny_model_dir)
    need = dense_bytes(four_bit_layers(model))
    n, why = dequantized_4bit_layers(model, available=2 * need - 1)
    assert n == 0 and "half the free memory" in why and len(four_bit_layers(model)) > 0
    assert dequantized_4bit_layers(model, available=2 * need)[0] > 0


def test_dense_bytes_counts_float32_elements(tiny_model_dir):
    model = qlora(tiny_model_dir)
    layers = four_bit_layers(model)
    assert dense_bytes(layers) == sum(4 * layer.in_features * layer.out_features for _, _, layer in layers)
