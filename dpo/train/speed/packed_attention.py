"""Attention kernels for packed rows (dpo/train/speed/packing.py), chosen by `packing_attention`.

A packed row holds a batch's 2 x pairs sequences one after another; each token must attend only to earlier
tokens of its own sequence. Three ways to do that without a dense T x T mask:

    segments  PyTorch's SDPA once per sequence (packing.SEGMENTED_SDPA): any device, exact; on a GPU it is
              2 x pairs small kernel launches per layer (and one host sync per layer to read the boundaries).
    flex      torch's flex attention (torch.nn.attention.flex_attention) over the whole row, with a BlockMask
              built once per forward by transformers' mask factory from the restarting position ids (causal
              and same-sequence): one fused kernel per layer, compiled with torch.compile on CUDA. Blocks are
              128 x 128 tokens, and a head dimension that is not a power of two is padded to the next one
              inside the kernel (phi-2's 80 runs as 128; torch/_inductor/kernel/flex/common.py,
              QK_HEAD_DIM_ROUNDED, since pytorch#133495). CUDA only: on a CPU torch runs it eagerly, forward
              only ("FlexAttention does not support backward on CPU"), materializing the scores.
    varlen    torch's variable-length flash attention (torch.nn.attention.varlen.varlen_attn, torch >= 2.10):
              one kernel per layer over the cumulative sequence lengths that `packing.pack` computes once per
              forward. CUDA only (flash kernels), bf16/fp16 only (an fp32 query under autocast is cast to the
              autocast dtype, as SDPA is).
    auto      segments on a CPU (flex and varlen cannot train there); on CUDA varlen where torch has it and
              the weights are bf16/fp16, else flex. That varlen is the fastest on a GPU is expected (one flash
              kernel, no head-dimension padding, no compilation), not yet measured: the GPU profile
              (issue 38) runs packing: true with packing_attention segments, flex and varlen.

Padded calls (generation, the probe's padded reference) fall through to plain SDPA in every case.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, add_offsets_to_mask_function, sdpa_mask

from dpo.errors import UserError

FLEX = "packed_flex"
VARLEN = "packed_varlen"
HALF = (torch.bfloat16, torch.float16)


def has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def attention_problem(choice: str, cuda: bool) -> str | None:
    """Why `packing_attention: choice` cannot run here (torch's version, the device), or None."""
    if choice == "flex" and not has_flex():
        return f"packing_attention: flex needs torch >= 2.5 (flex attention); this is torch {torch.__version__}"
    if choice == "varlen" and not has_varlen():
        return f"packing_attention: varlen needs torch >= 2.10 (varlen_attn); this is torch {torch.__version__}"
    if choice in ("flex", "varlen") and not cuda:
        why = "has no backward on a CPU" if choice == "flex" else "runs flash-attention kernels, CUDA only"
        return f"packing_attention: {choice} needs a CUDA device (torch's {choice} attention {why}); use segments"
    return None


def resolve(choice: str, cuda: bool, dtype: torch.dtype, dropout: float) -> str:
    """The kernel for the loaded model: `auto` by device, weight dtype and attention dropout (which only
    segments applies); an explicit choice as given, or a UserError where the loaded model cannot run it."""
    if choice == "auto":
        if not cuda or dropout:
            return "segments"
        return "varlen" if has_varlen() and dtype in HALF else "flex" if has_flex() else "segments"
    if choice != "segments" and dropout:
        raise UserError(
            f"packing_attention: {choice} has no attention dropout and the model's attention_dropout is {dropout}; "
            "use packing_attention: segments"
        )
    if choice == "varlen" and dtype not in HALF:
        raise UserError(
            f"packing_attention: varlen runs flash kernels, bf16/fp16 only; the model loaded in {dtype}: "
            "set dtype: bfloat16, or use packing_attention: flex"
        )
    return choice


def _same_heads(query, key, value):
    """Key/value heads repeated to the query's (grouped-query attention): both kernels get equal head counts,
    which every torch version's varlen_attn and flex attention's compiled backward take."""
    groups = query.shape[1] // key.shape[1]
    return (key, value) if groups == 1 else (repeat_kv(key, groups), repeat_kv(value, groups))


def _one_row(kwargs) -> bool:
    """A mask call for one row without padding and without a cache (a packed row, or one sequence): not a
    generation step, whose one query attends to cached keys."""
    same = kwargs.get("q_length") == kwargs.get("kv_length")
    return kwargs.get("attention_mask") is None and kwargs.get("batch_size") == 1 and same


# ── flex ────────────────────────────────────────────────────────────────────────────────────────────────


def flex_mask(**kwargs):
    """One row without padding: a BlockMask of transformers' mask function, which for restarting position ids
    is causal within each packed sequence (masking_utils.find_packed_sequence_indices). Else SDPA's mask."""
    if not _one_row(kwargs):
        return sdpa_mask(**kwargs)
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(kwargs.get("device", "cpu"))
    mask_function = add_offsets_to_mask_function(
        kwargs["mask_function"], kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    )
    return create_block_mask(
        mask_function, B=1, H=None, Q_LEN=kwargs["q_length"], KV_LEN=kwargs["kv_length"], device=device,
        _compile=device.type == "cuda",
    )  # fmt: skip


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # fused kernels; eager flex attention materializes the scores


def packed_flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flex attention over a packed row given its BlockMask; SDPA for anything else.
    Shapes: query [1, heads, T, d], key/value [1, kv_heads, T, d] -> output [1, T, heads, d]."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    key, value = _same_heads(query, key, value)
    kernel = _compiled_flex() if query.device.type == "cuda" else flex_attention
    out = kernel(query, key, value, block_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# ── varlen ──────────────────────────────────────────────────────────────────────────────────────────────


def packed_sdpa_mask(**kwargs):
    """SDPA's mask, except for one row without padding: there the packed attention keeps sequences apart."""
    return None if _one_row(kwargs) else sdpa_mask(**kwargs)


def segment_starts(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the packed sequences of one row (where position ids restart at 0), plus its end: read on
    the host (a sync on a GPU): packing.packed_forward reads it once per forward for varlen; the CPU `segments`
    kernel (packing.segmented_sdpa) reads it in each layer."""
    row = position_ids[0]
    return [*(row == 0).nonzero().flatten().tolist(), row.numel()]


def varlen_kwargs(lengths: torch.Tensor) -> dict:
    """transformers' flash-varlen keywords for a packed row of sequences of these lengths, computed (and cast to
    int32) once per forward: the attention of every layer reads them as they are, no host sync, no cast per layer."""
    cumulative = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}


def boundaries(position_ids: torch.Tensor) -> dict:
    """`varlen_kwargs` of one packed row read from its position ids (`segment_starts`): for a forward called without
    them (a packed row given by hand); the recipe's forwards pass them, computed once (packing.packed_forward)."""
    starts = torch.tensor(segment_starts(position_ids), device=position_ids.device)
    return varlen_kwargs(starts.diff())


@functools.cache
def _causal_and_scale() -> tuple[dict, bool]:
    """varlen_attn's causal switch and whether it takes `scale`: torch 2.10 has is_causal and no scale, later
    versions window_size=(-1, 0) for causal and scale."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    return causal, "scale" in parameters


def varlen_kernel(query, key, value, cumulative, longest, scale):
    """torch's flash varlen attention, causal: query/key/value [T, heads, d] -> [T, heads, d]."""
    from torch.nn.attention.varlen import varlen_attn

    causal, takes_scale = _causal_and_scale()
    if takes_scale:
        causal = {**causal, "scale": scale}
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise UserError(f"packing_attention: varlen in torch {torch.__version__} takes no attention scale; use flex")
    return varlen_attn(query, key, value, cumulative, cumulative, longest, longest, **causal)


def packed_varlen(module, query, key, value, attention_mask, position_ids=None, scaling=None, dropout=0.0, **kwargs):
    """Flash varlen attention over a packed row (boundaries from `packing.pack`'s cu_seq_lens_q/max_length_q,
    or read from the position ids); SDPA for anything else. Shapes as `packed_flex`."""
    cumulative, longest = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("max_length_q", None)
    one_row = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]  # no cache
    packed = one_row and (cumulative is not None or position_ids is not None)
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if cumulative is None:
        given = boundaries(position_ids)
        cumulative, longest = given["cu_seq_lens_q"], given["max_length_q"]
    key, value = _same_heads(query, key, value)
    if query.dtype not in HALF and torch.is_autocast_enabled(query.device.type):
        half = torch.get_autocast_dtype(query.device.type)  # as SDPA runs under autocast
        query, key, value = query.to(half), key.to(half), value.to(half)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, d]
    return varlen_kernel(q, k, v, cumulative, longest, scaling)[None], None  # int32 already (varlen_kwargs)


AttentionInterface.register(FLEX, packed_flex)
AttentionMaskInterface.register(FLEX, flex_mask)
AttentionInterface.register(VARLEN, packed_varlen)
AttentionMaskInterface.register(VARLEN, packed_sdpa_mask)
