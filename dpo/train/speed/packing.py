"""Packed pairs (padding-free DPO): a batch's chosen and rejected sequences in one row, no padding.

TRL's collator pads every sequence of a batch (2 x pairs rows: chosen first, then rejected) to
the longest one. With `packing: true` the model never sees that padding: the recipe's trainer
concatenates the real tokens of all 2B sequences into a single row, with position ids that
restart at 0 at each sequence, runs the model once, and puts the per-token outputs back into the
padded [2B, L-1] layout TRL's loss reads (zeros where the padded path has padding). Everything
downstream (the loss, every metric, the reference cache, evaluation) is TRL's code, unchanged.

Why the results are the padded path's: every position attends only to earlier positions of its
own sequence, and rotary positions restart, so each token sees exactly what it sees when padded.
transformers 5 turns restarting position ids into that block-diagonal causal mask itself
(`masking_utils.find_packed_sequence_indices`); flash-attention 2/3 reads them as varlen
boundaries. On SDPA (the default, and all a CPU has), a dense T x T mask would make attention
cost grow with the square of the whole row, so `SEGMENTED_SDPA` runs PyTorch's SDPA kernel once
per sequence (causal, no mask): attention costs what it costs padded, the linear layers and the
LM head no longer pay for padding. The first target of each sequence is the sequence's own first
token, which the padded path never scores (the shift drops it), so its label is masked here too.

`packing_attention` picks how a packed row's attention keeps its sequences apart on SDPA models
(dpo/train/speed/packed_attention.py): `segments` (the above), `flex` (torch's flex attention with a
block mask, CUDA), `varlen` (torch's flash varlen attention over cumulative sequence lengths, CUDA,
torch >= 2.10, bf16/fp16), `auto` (the default: segments on a CPU; varlen, else flex, on CUDA).

`check_packing` refuses, before weights load, what this cannot serve: DeepSpeed and FSDP (the
forward below is patched on the unwrapped model; not tested sharded), TRL's own `padding_free`
(disabled in TRL 1.16: it warns and pads), and a `packing_attention` this torch or device cannot run.
`install_packing` runs a two-sequence probe through the loaded model (with the chosen kernel) and
refuses one whose attention ignores position ids.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dpo.compat import FUSED_PER_TOKEN_FIELDS, fused_lm_head_model
from dpo.errors import UserError
from dpo.train.speed import packed_attention
from dpo.train.speed.packed_attention import segment_starts, varlen_kwargs  # one reader of the boundaries

SEGMENTED_SDPA = "sdpa_segments"
# The probe's bound: how many times the measured floor (8 extra padding columns, or SDPA's math kernel)
# packing may move the hidden states (`probe`); float32's resolution stands in where the floor is 0.
# Measured on the tiny Phi model in fp32 (tests/train/speed/test_packing.py): padding 6.4e-8, the math
# kernel 1.5e-7 (AMD EPYC), packed 4.7e-8 (0.3x the floor), an attention that lets the sequences see each
# other 0.26 (2e5x).
PROBE_MULTIPLE = 8


def segmented_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' SDPA attention, once per packed sequence (causal, unmasked) when the row is packed.
    Shapes: query [1, heads, T, d], key/value [1, kv_heads, T, d] -> output [1, T, heads, d]."""
    packed = attention_mask is None and position_ids is not None and query.shape[0] == 1
    starts = segment_starts(position_ids) if packed else []
    if len(starts) <= 2:  # padded input, or one sequence: nothing to split
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    pieces = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(pieces, dim=1), None


def segmented_sdpa_mask(**kwargs):
    """SDPA's mask, except for one row without padding: there `segmented_sdpa` makes the segments the mask."""
    one_row = kwargs.get("attention_mask") is None and kwargs.get("batch_size") == 1
    return None if one_row else sdpa_mask(**kwargs)


AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)
AttentionMaskInterface.register(SEGMENTED_SDPA, segmented_sdpa_mask)


def check_packing(training_args) -> None:
    """Before any weights load: refuse what packed pairs cannot serve."""
    if getattr(training_args, "padding_free", False):
        raise UserError("padding_free: TRL 1.16 ignores it (it warns and pads); use packing: true instead")
    if not getattr(training_args, "packing", False):
        return
    if training_args.deepspeed or training_args.fsdp:
        launcher = "DeepSpeed" if training_args.deepspeed else "FSDP"
        raise UserError(f"packing: true is not supported under {launcher} (untested sharded); set packing: false")
    cuda = torch.cuda.is_available() and not getattr(training_args, "use_cpu", False)
    problem = packed_attention.attention_problem(getattr(training_args, "packing_attention", "auto"), cuda)
    if problem:
        raise UserError(problem)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
    """The real tokens of right-padded [N, L] rows as one [1, T] row, and how to put outputs back.

    Returns input_ids, position_ids, labels (each [1, T]; labels -100 at each sequence's first token),
    `index`/`valid` ([N, L-1]): padded next-token position (i, j) is packed position index[i, j], and
    `lengths` ([N]) of the sequences."""
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    flat_labels = labels[keep].clone()
    flat_labels[starts[lengths > 0]] = -100  # the padded path never predicts a sequence's first token
    total = int(lengths.sum())
    index = (starts[:, None] + positions[None, :-1]).clamp(max=max(total - 2, 0))
    return {
        "input_ids": input_ids[keep][None],
        "position_ids": positions.expand_as(input_ids)[keep][None],
        "labels": flat_labels[None],
        "index": index,
        "valid": positions[None, :-1] < (lengths[:, None] - 1),
        "lengths": lengths,
    }


def unpack(flat: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed per-token values [1, T-1] back in the padded layout [N, L-1], zero where padded."""
    if flat.numel() == 0:
        return flat.new_zeros(index.shape)
    return flat[0][index].masked_fill(~valid, 0)


def packed_forward(fused_forward, varlen: bool = False):
    """Wrap TRL's fused forward (trl.trainer.utils.add_fused_lm_head): padded calls with
    `fused_lm_head=True` run packed and return outputs in the padded layout; others pass through.
    `varlen`: also hand the attention the row's cumulative sequence lengths."""

    @functools.wraps(fused_forward)
    def forward(*args, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        if not fused_lm_head or args or attention_mask is None or labels is None or "position_ids" in kwargs:
            return fused_forward(
                *args, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                fused_lm_head=fused_lm_head, **kwargs,
            )  # fmt: skip
        row = pack(input_ids, attention_mask, labels)
        if varlen:
            kwargs.update(varlen_kwargs(row["lengths"]))
        out = fused_forward(
            input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"], fused_lm_head=True,
            **kwargs,
        )  # fmt: skip
        for name in FUSED_PER_TOKEN_FIELDS:
            if getattr(out, name, None) is not None:
                setattr(out, name, unpack(getattr(out, name), row["index"], row["valid"]))
        return out

    forward.unpacked = fused_forward
    return forward


def probe(model, varlen: bool = False) -> tuple[float, float]:
    """How far packing moves the backbone's last hidden states of two sequences (a long one, then a short
    one that a leak would drown), against the floor: the larger of how far extra padding moves them and how
    far SDPA's math kernel in place of the device's default does (in bf16 on a GPU two correct attention
    kernels differ by bf16's rounding, where padding alone may move nothing). All ||x - padded|| / ||padded||
    over the real tokens. `varlen`: the packed row's boundaries passed as training passes them (once per
    forward, `packed_forward`). Returns (packed, floor)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 24), generator=generator).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # the second sequence is 4 tokens, after 24 foreign ones in the packed row
    row = pack(ids, mask, ids)
    wider = torch.nn.functional.pad(mask, (0, 8))  # 8 more padding columns: other shapes, same values
    backbone = model.base_model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()].float()
            given = varlen_kwargs(row["lengths"]) if varlen else {}
            packed = backbone(input_ids=row["input_ids"], position_ids=row["position_ids"], **given).last_hidden_state[
                0
            ]
            ids_wider = torch.nn.functional.pad(ids, (0, 8))
            padded_wider = backbone(input_ids=ids_wider, attention_mask=wider).last_hidden_state[wider.bool()]
            with sdpa_kernel(SDPBackend.MATH):  # another correct attention kernel, as packing swaps kernels
                padded_math = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    finally:
        model.train(was_training)
    scale = padded.norm().clamp(min=1e-12)
    floor = max(float((x.float() - padded).norm() / scale) for x in (padded_wider, padded_math))
    return float((packed.float() - padded).norm() / scale), floor


def install_packing(trainer) -> str:
    """Pack every fused forward of the trainer's model (training, evaluation, reference scoring).
    SDPA becomes the kernel `packing_attention` picks (segments, flex or varlen); other attention
    implementations must honour position ids. A probe checks either. Returns the log line; raises
    UserError for a model that does not honour them."""
    base = fused_lm_head_model(trainer)
    if base is None:
        raise UserError("packing: true needs TRL's fused LM head on the model (dpo/compat.py); set packing: false")
    config = base.config
    implementation = config._attn_implementation
    if implementation == "sdpa":
        chosen = packed_attention.resolve(
            getattr(trainer.args, "packing_attention", "auto"), base.device.type == "cuda",
            base.get_input_embeddings().weight.dtype, getattr(config, "attention_dropout", 0.0) or 0.0,
        )  # fmt: skip
        implementation = {"segments": SEGMENTED_SDPA, "flex": packed_attention.FLEX}.get(
            chosen, packed_attention.VARLEN
        )
        base.set_attn_implementation(implementation)
    varlen = implementation == packed_attention.VARLEN
    base.forward = packed_forward(base.forward, varlen=varlen)
    drift, floor = probe(base, varlen)
    bound = PROBE_MULTIPLE * max(floor, torch.finfo(torch.float32).eps)
    if not drift <= bound:
        base.forward = base.forward.unpacked
        if implementation in (SEGMENTED_SDPA, packed_attention.FLEX, packed_attention.VARLEN):
            base.set_attn_implementation("sdpa")
        raise UserError(
            f"packing: true: {config.model_type} with attn_implementation {implementation} does not keep packed "
            f"sequences apart (hidden states moved {drift:.2g} relative, bound {bound:.2g}); set packing: false"
        )
    return f"packing: each batch's sequences run as one row without padding (attention {implementation})"
