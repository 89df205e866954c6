"""Resident memory on CPU: let go of the checkpoint file once the model is loaded.

transformers loads a `.safetensors` file through a memory map, and every weight it does not
convert stays a view into that map. With a 4-bit base that is the embedding (tied to the LM
head) and the norms: a few hundred KB of norms and, for SmolLM2-135M, a 113 MB embedding keep
the whole 513 MB file mapped, and every page of it that loading read (all of them: the linear
weights were read to be quantized) stays in the process's resident memory for the whole run.
`own_file_mapped_weights` copies those few tensors into memory of their own; the map then has
no user left and is unmapped: 405 MB less resident, measured with the shipped SmolLM2 recipe
(benchmarks/bench_training.py), at no cost per step.

On a GPU the weights are copied to the device while loading, so nothing stays mapped; the
function finds nothing there, and nothing off Linux (it reads /proc/self/maps).
"""

from __future__ import annotations

import gc
from pathlib import Path

from torch import nn

MAPS = Path("/proc/self/maps")


def mapped_checkpoint_ranges(maps: Path = MAPS) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's memory maps of `.safetensors` files."""
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def own_file_mapped_weights(model: nn.Module) -> tuple[int, int]:
    """Give every CPU parameter and buffer of `model` that is a view into a mapped checkpoint file a
    copy of its own (same values, same Parameter objects: tied weights stay tied, an optimizer built
    later sees the same tensors). Returns (tensors copied, bytes copied); (0, 0) when none is mapped."""
    ranges = mapped_checkpoint_ranges()
    if not ranges:
        return 0, 0
    copied = size = 0
    for tensor in [*model.parameters(), *model.buffers()]:  # each shared (tied) tensor once
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()
            copied, size = copied + 1, size + tensor.numel() * tensor.element_size()
    if copied:
        gc.collect()  # the map goes with the last tensor that viewed it
    return copied, size
