"""Resident memory on CPU: let go of the checkpoint file once the model is loaded.

transformers loads a `.safetensors` file through a memory map, and every weight it does not
convert stays a view into that map. With a 4-bit base that is the embedding (tied to the LM
head) and the norms: a few hundred KB of norms and, for SmolLM2-135M, a 113 MB embedding keep
the whole 513 MB file mapped, and every page of it that loading read (all of them: the linear
weights were read to be quantized) stays in the process's resident memory for the whole run.
`own_file_mapped_weights` copies those few tensors into memory of their own (113 MB there); the
map then has no user left and is unmapped, at no cost per step.

A base that is not converted (full or half precision on CPU) is the file: its weights stay mapped, as
they are. On a GPU the weights are copied to the device while loading, so nothing stays mapped; the
function finds nothing there, and nothing off Linux (it reads /proc/self/maps).
"""

from __future__ import annotations

import gc
from pathlib import Path

from torch import nn

MAPS = Path("/proc/self/maps")


def mapped_checkpoint_ranges() -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's memory maps of `.safetensors` files."""
    if not MAPS.exists():
        return []
    ranges = []
    for line in MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def own_file_mapped_weights(model: nn.Module) -> tuple[int, int]:
    """Give the CPU parameters and buffers of `model` that are views into a mapped checkpoint file copies
    of their own (same values, same Parameter objects: tied weights stay tied, an optimizer built later
    sees the same tensors), file by file, where that frees memory: when what still views a file is less
    than half its size (a 4-bit base: the embedding and norms). A base that was not converted (its weights
    are most of the file) is left mapped: a copy would hold the same bytes, and hold both while copying.
    Returns (tensors copied, bytes copied); (0, 0) when none is copied."""
    ranges = mapped_checkpoint_ranges()
    views: dict[tuple[int, int], list] = {}
    for tensor in [*model.parameters(), *model.buffers()]:  # each shared (tied) tensor once
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        for start, end in ranges:
            if start <= address < end:
                views.setdefault((start, end), []).append(tensor)
                break
    copied = size = 0
    for (start, end), tensors in views.items():
        viewed = sum(t.numel() * t.element_size() for t in tensors)
        if viewed < (end - start) / 2:
            for tensor in tensors:
                tensor.data = tensor.data.clone()
            copied, size = copied + len(tensors), size + viewed
    if copied:
        gc.collect()  # a map goes with the last tensor that viewed it
    return copied, size
