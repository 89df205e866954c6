"""phi-2's `gelu_new` as torch's tanh GELU: the same formula in one kernel instead of eight.

transformers' `gelu_new` (NewGELUActivation, phi-2's and GPT-2's MLP activation) computes
0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))) as eight elementwise ops (pow, mul, add, mul, tanh,
add, mul, mul): eight kernels per MLP layer on a GPU, each reading and writing the whole activation, and under
bf16/fp16 each result rounded to that dtype. `gelu_pytorch_tanh` (torch.nn.functional.gelu(x, approximate="tanh"))
is that formula in one kernel, computed in fp32 and rounded once. The models' configs name their activation, so
the swap is a from_pretrained override, made where the recipes load models (dpo/train/model_checks.py
model_init_kwargs) and only for a config that names gelu_new. Parity with phi-2's formula:
tests/train/speed/test_activation.py.
"""

from __future__ import annotations

ONE_KERNEL = {"gelu_new": "gelu_pytorch_tanh"}
ACTIVATION_KEYS = ("hidden_act", "activation_function")  # Phi and most models; GPT-2


def one_kernel_activation(config) -> dict:
    """from_pretrained's config overrides that swap gelu_new for the same formula in one kernel; {} for a config
    whose activation is anything else."""
    return {key: ONE_KERNEL[name] for key in ACTIVATION_KEYS if (name := getattr(config, key, None)) in ONE_KERNEL}
