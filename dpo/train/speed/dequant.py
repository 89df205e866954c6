"""Inference on a CPU with the 4-bit base dequantized once, not at every forward.

bitsandbytes' portable CPU kernel (the one every CPU runs here, dpo/train/speed/kernels.py) computes a 4-bit
layer as "dequantize the whole weight, then matmul", at every call. Training needs the 4-bit storage (the
memory it saves is the point of QLoRA), but evaluation and sampling on a CPU call the model once per generated
token: 128 new tokens dequantize every weight of the model 128 times over. `dequantized_4bit_layers` replaces
each 4-bit layer by a plain `nn.Linear` holding the very weight that kernel would compute with (the same
`dequantize_4bit`, in the layer's compute dtype), so the results are those of the 4-bit model up to summation
order, and each token costs only its matmuls. LoRA adapters wrap the layer and stay as they are (disabling
them still gives pi_ref). Only on a CPU, and only where the dense copy fits the memory the machine has free.
"""

from __future__ import annotations

import torch
from torch import nn

# The dense copy may take at most this share of the memory available now: the 4-bit model, the activations
# and the KV cache need the rest.
MEMORY_SHARE = 0.5


def four_bit_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, layer) of every bitsandbytes Linear4bit in `model`."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear4bit)
    ]


def dense_bytes(layers) -> int:
    """Bytes the dequantized weights take (4 per element in float32, 2 in a half type)."""
    total = 0
    for _, _, layer in layers:
        dtype = layer.compute_dtype or torch.float32
        total += layer.weight.quant_state.shape.numel() * torch.tensor([], dtype=dtype).element_size()
    return total


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 where it cannot be read: then nothing is dequantized)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def dense_layer(layer) -> nn.Linear:
    """The nn.Linear that computes what `layer` (a CPU Linear4bit) computes."""
    from bitsandbytes.functional import dequantize_4bit

    dtype = layer.compute_dtype or torch.float32
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return dense


def dequantized_4bit_layers(model: nn.Module, available: int | None = None) -> tuple[int, str]:
    """Replace the 4-bit layers of a CPU model for inference (it can no longer train); returns (layers
    replaced, why or why not) for the log."""
    layers = four_bit_layers(model)
    if not layers:
        return 0, "no 4-bit layers"
    if next(model.parameters()).device.type != "cpu":
        return 0, "not on a CPU (the GPU kernels dequantize tile by tile)"
    need = dense_bytes(layers)
    available = available_bytes() if available is None else available
    if need > MEMORY_SHARE * available:
        return 0, f"the dense weights ({need / 2**30:.1f} GiB) would pass half the free memory"
    for parent, name, layer in layers:
        setattr(parent, name, dense_layer(layer))
    return len(layers), f"{need / 2**20:.0f} MB dense, dequantized once instead of at every forward"
