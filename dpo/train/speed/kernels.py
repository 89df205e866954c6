"""One 4-bit kernel on every CPU: bitsandbytes' AVX512-BF16 inference repacking turned off.

bitsandbytes 0.50 chooses its CPU path for a 4-bit layer by a CPU feature. On a CPU with
AVX512-BF16 (`lscpu | grep avx512_bf16`), the first time a `Linear4bit` runs in eval mode
without grad it repacks its weight into an inference-only layout (`packing_format_for_cpu`)
and from then on computes through a bf16 kernel (`F.gemv_4bit`); it never converts back.
Two consequences:
  - a training step after any evaluation (`eval_on_start`, `eval_steps` before a save, a
    generation) takes that path and fails: "a view of a leaf Variable that requires grad is
    being used in an in-place operation";
  - before that, the bf16 kernel moves results by about 4e-5 relative, so evaluation,
    generation and every seeded number would depend on the CPU model.

The switch is the module attribute `support_avx512bf16_for_cpu`, set in `Linear4bit.__init__`
from `bitsandbytes.functional.has_avx512bf16()`. `use_portable_4bit_kernels` turns it off on
every 4-bit layer (unpacking any weight already packed), so training, evaluation and
generation run the same dequantize-then-matmul kernel on every x86 CPU. On a GPU the switch
is never consulted. Call it right after a 4-bit model is loaded; `build_dpo_trainer` does.
Where the model runs before our code sees it (TRL's `precompute_ref_log_probs` scores the
reference inside `DPOTrainer.__init__`), build it inside `portable_4bit_layers()`: its layers
start with the switch off.

bitsandbytes also logs, at import on every AVX512-BF16 CPU, that it could not load an optional
fused kernel from the `kernels` package (which would fetch code from the Hub at run time).
That path is the inference kernel we switch off, so the note only tells users to install
something they must not need; `quiet_bitsandbytes_import_note` drops that one record, and
`dpo/__init__.py` installs it before anything imports bitsandbytes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from torch import nn

SWITCH = "support_avx512bf16_for_cpu"  # bitsandbytes 0.50.2, nn/modules.py: Linear4bit

# bitsandbytes 0.50.2, backends/cpu/ops.py, the `has_avx512bf16()` branch: logged once at import.
IMPORT_NOTE_LOGGER = "bitsandbytes.backends.cpu.ops"
IMPORT_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropImportNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(IMPORT_NOTE)


def quiet_bitsandbytes_import_note() -> None:
    """Drop bitsandbytes' import-time note about the optional `kernels` package, and nothing else
    it logs. Safe to call before bitsandbytes is imported (loggers exist by name) and repeatedly."""
    logger = logging.getLogger(IMPORT_NOTE_LOGGER)
    if not any(isinstance(f, _DropImportNote) for f in logger.filters):
        logger.addFilter(_DropImportNote())


def cpu_has_avx512bf16() -> bool:
    """What bitsandbytes decides by: does this CPU have AVX512-BF16?"""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@contextlib.contextmanager
def portable_4bit_layers():
    """Inside this context, every `Linear4bit` is built with the switch off, as on a CPU without
    AVX512-BF16 (bitsandbytes reads `has_avx512bf16` in `Linear4bit.__init__`, through the name
    `bitsandbytes.nn.modules.has_avx512bf16`). Restored on exit, so nothing outside changes."""
    import bitsandbytes.nn.modules as modules

    original = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: False
    try:
        yield
    finally:
        modules.has_avx512bf16 = original


def use_portable_4bit_kernels(model: nn.Module) -> int:
    """Put every bitsandbytes `Linear4bit` in `model` on the portable CPU kernel.

    Call it before the model first runs: a weight that was already repacked is unpacked, but
    bitsandbytes rounded its block scales to bf16 on the way (warned). Returns how many 4-bit
    layers there are (0 for a model without any). Raises if the
    installed bitsandbytes no longer has the switch, so an upgrade cannot silently bring the
    CPU-dependent path back (see the module docstring; the pin lives in requirements.txt).
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    repacked = 0
    for layer in layers:
        if not hasattr(layer, SWITCH):
            raise RuntimeError(
                f"bitsandbytes {bnb.__version__}: Linear4bit has no `{SWITCH}`; dpo/train/speed/kernels.py "
                "was written for 0.50.2 and must be updated before 4-bit runs are portable"
            )
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # packed by an earlier eval
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            repacked += 1
        setattr(layer, SWITCH, False)
    if repacked:
        warnings.warn(
            f"{repacked} 4-bit layers had been repacked by bitsandbytes for AVX512-BF16 inference; unpacked them, "
            "but their block scales were rounded to bf16. Call use_portable_4bit_kernels right after loading.",
            stacklevel=2,
        )
    return len(layers)
