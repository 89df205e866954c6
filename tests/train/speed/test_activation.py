"""dpo/train/speed/activation.py: phi-2's gelu_new loads as torch's one-kernel tanh GELU, the same formula.

Tolerances are measured noise floors, not chosen numbers: phi-2's own implementation (transformers'
NewGELUActivation, eight ops each rounded to the input's dtype) differs from its formula evaluated in float64 by
some amount in each dtype; the one-kernel GELU must be no further from that formula than phi-2's implementation
is. For the model, the floor is how far float32 rounding already moves the tiny phi's logits from float64's.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

from dpo.train.model_checks import load_model_config, model_init_kwargs
from dpo.train.speed.activation import one_kernel_activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torchs_tanh_gelu_is_phi2s_formula_within_phi2s_own_rounding(dtype):
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64).to(dtype)  # both tails and the curved middle
    formula = NewGELUActivation()(x.double())  # phi-2's formula on the same (rounded) inputs, in float64
    phi2 = NewGELUActivation()(x).double()
    one_kernel = torch.nn.functional.gelu(x, approximate="tanh").double()
    floor = (phi2 - formula).abs().max().item()  # phi-2's own rounding in this dtype
    assert floor > 0  # measured, so the bound below is not vacuous
    assert (one_kernel - formula).abs().max().item() <= floor
    assert (one_kernel - phi2).abs().max().item() <= 2 * floor  # each within the floor of the formula


def test_only_gelu_new_is_swapped():
    assert one_kernel_activation(SimpleNamespace(hidden_act="gelu_new")) == {"hidden_act": "gelu_pytorch_tanh"}
    assert one_kernel_activation(SimpleNamespace(activation_function="gelu_new")) == {
        "activation_function": "gelu_pytorch_tanh"  # GPT-2's name for the setting
    }
    for other in ("silu", "gelu", "gelu_pytorch_tanh", None):
        assert one_kernel_activation(SimpleNamespace(hidden_act=other)) == {}


def test_the_tiny_phi_loads_with_one_kernel_and_the_same_logits(tiny_model_dir):
    """The recipes' load (model_init_kwargs) swaps the tiny phi's gelu_new; its logits move by less than float32
    rounding already moves them from float64's (measured on this model: 1.8e-7 against a floor of 3.6e-7)."""
    assert load_model_config(str(tiny_model_dir)).hidden_act == "gelu_new"  # as phi-2's config.json
    model_args = SimpleNamespace(
        model_name_or_path=str(tiny_model_dir), model_revision="main", attn_implementation=None, dtype="float32"
    )
    kwargs = model_init_kwargs(model_args, SimpleNamespace(trust_remote_code=False, fp16=False))
    assert kwargs["hidden_act"] == "gelu_pytorch_tanh"
    phi2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    swapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    assert type(phi2.model.layers[0].mlp.activation_fn) is NewGELUActivation
    assert type(swapped.model.layers[0].mlp.activation_fn) is not NewGELUActivation
    exact = copy.deepcopy(phi2).double()
    ids = torch.randint(0, phi2.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, truth = swapped(ids).logits.double(), phi2(ids).logits.double(), exact(ids).logits
    floor = (theirs - truth).abs().max().item()
    assert floor > 0
    assert (ours - theirs).abs().max().item() <= floor
