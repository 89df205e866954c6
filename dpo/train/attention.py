"""Attention that cannot overflow in fp16 (phi-2's model card: "known for having an attention
overflow issue (with FP16)").

transformers 5.23's PhiAttention hands q, k and v to the configured attention function as they are.
Its eager function (`modeling_phi.eager_attention_forward`) multiplies q @ k^T in the input dtype and
scales afterwards, so under fp16 a raw score above 65504 becomes inf and the softmax NaN
(transformers 4.x's PhiAttention upcast q and k to fp32 first; 5.x dropped that). PyTorch's
scaled_dot_product_attention, transformers' default ("sdpa"), stays finite: its math backend
computes half inputs in fp32 and its fused kernels keep the scores in fp32 accumulators
(tests/train/test_fp16.py checks the CPU backends, tests/test_gpu.py the CUDA one).

So under fp16 mixed precision an "eager" request runs EAGER_FP32_SCORES: the same eager function on
q, k, v upcast to fp32, the output cast back. The default (sdpa) is left alone.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.phi.modeling_phi import eager_attention_forward

EAGER_FP32_SCORES = "eager_fp32_scores"


def eager_fp32_scores(module, query, key, value, attention_mask, **kwargs):
    """transformers' eager attention with q @ k^T, the softmax and the weighted sum in fp32."""
    mask = attention_mask.float() if attention_mask is not None else None
    out, weights = eager_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(query.dtype), weights


# transformers' registries are global: a model loaded with attn_implementation=EAGER_FP32_SCORES
# finds the function, and its mask is eager's additive mask.
AttentionInterface.register(EAGER_FP32_SCORES, eager_fp32_scores)
AttentionMaskInterface.register(EAGER_FP32_SCORES, eager_mask)


def attention_implementation(requested: str | None, fp16: bool) -> str | None:
    """What to load the model with: EAGER_FP32_SCORES for "eager" under fp16, else `requested`
    (None: transformers' default, sdpa)."""
    return EAGER_FP32_SCORES if fp16 and requested == "eager" else requested
