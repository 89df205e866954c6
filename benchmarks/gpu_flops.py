"""How benchmarks/bench_gpu.py counts FLOPs, the peaks it divides them by, and its time estimate.

Model FLOPs of one QLoRA DPO training token (non-padding tokens only; padding is computed but useless),
with N the parameters of every matmul (the 4-bit base counted at full size, the LM head included,
the embedding lookup not), n_lora the LoRA parameters, L layers, d the hidden size, s the sequence length:

    policy forward     2N + 2 n_lora + 4 L d s     (4 L d s: q @ k^T and the weighted sum over s keys)
    policy backward    2N + 4 n_lora + 8 L d s     input gradients only: the base and the LM head are
                                                   frozen, so the usual "backward = 2x forward" (which
                                                   adds weight gradients) would overstate it; LoRA's own
                                                   weight gradients are the 2 n_lora extra
    reference forward  2N + 4 L d s                only when computed inline (not cached / precomputed)

Activation checkpointing repeats the forward in the backward pass: hardware work, not model work,
so it is left out of MFU (it is in the time estimate below). The LM head is counted on every token
although TRL's fused head scores completion tokens only on CUDA (an overcount of at most 5% at phi-2
size: the head is 131M of 2.65B matmul parameters). MFU = model FLOPs / seconds / the GPU's dense peak.
"""

from __future__ import annotations

# Dense peaks, no sparsity, from the vendors' datasheets (TFLOP/s): tensor-core bf16 and fp16, and plain
# fp32 (PyTorch's default: TF32 off for matmuls; bench_gpu.py records the flag). SXM parts for H100/H200.
PEAKS_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "T4": {"bf16": None, "fp16": 65.0, "fp32": 8.1},
}


def peak_flops(device_name: str | None, compute: str) -> float | None:
    """The dense peak (FLOP/s) of `compute` ("bf16", "fp16" or "fp32") on the named GPU; None if unknown."""
    for key, peaks in PEAKS_TFLOPS.items():
        if device_name and key in device_name.upper():
            return peaks[compute] * 1e12 if peaks[compute] else None
    return None


def model_shape(config, lora_r: int, lora_modules: list[str]) -> dict:
    """Matmul parameters, LoRA parameters, layers and hidden size of a Phi config with LoRA on `lora_modules`."""
    d, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "dense": (d, d), "fc1": (d, ffn), "fc2": (ffn, d)}
    per_layer = sum(i * o for i, o in shapes.values())
    lora = sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in lora_modules)
    n = layers * per_layer + d * config.vocab_size
    return {"n": n, "n_lora": layers * lora, "layers": layers, "hidden": d, "vocab": config.vocab_size}


def flops_per_token(shape: dict, seq_len: int, reference_inline: bool) -> float:
    """Model FLOPs of one training token (module docstring)."""
    n, n_lora, attention = shape["n"], shape["n_lora"], 4 * shape["layers"] * shape["hidden"] * seq_len
    forward, backward = 2 * n + 2 * n_lora + attention, 2 * n + 4 * n_lora + 2 * attention
    return forward + backward + (2 * n + attention if reference_inline else 0)


# What a phi-2-size run is assumed to reach on an H100/H200, for the time estimate only (measured numbers
# replace these in the results): 35% of the dense bf16/fp16 peak (4-bit dequantisation, LoRA's thin matmuls,
# layer norms and Python between layers cost the rest) and 70% of plain fp32.
ASSUMED_RATE = {"bf16": 0.35 * 989e12, "fp16": 0.35 * 989e12, "fp32": 0.70 * 67e12}
LOAD_S = 10.0  # one trainer build: read 5.6 GB of fp16 safetensors from the page cache, quantize on the GPU, PEFT


def step_seconds(shape: dict, tokens: int, seq_len: int, compute: str, reference_inline: bool) -> float:
    """Estimated seconds of one optimizer step: model FLOPs plus the checkpointed re-forward, at ASSUMED_RATE."""
    recompute = 2 * shape["n"] + 4 * shape["layers"] * shape["hidden"] * seq_len
    return tokens * (flops_per_token(shape, seq_len, reference_inline) + recompute) / ASSUMED_RATE[compute]


def reference_seconds(shape: dict, tokens: int, seq_len: int, compute: str) -> float:
    """Estimated seconds of scoring `tokens` under the reference (the cache build, TRL's precompute)."""
    return tokens * (2 * shape["n"] + 4 * shape["layers"] * shape["hidden"] * seq_len) / ASSUMED_RATE[compute]
