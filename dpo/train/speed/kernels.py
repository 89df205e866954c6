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

bitsandbytes also, at import on every AVX512-BF16 CPU, asks the `kernels` package for an optional
fused kernel for that same inference path (`kernels-community/quantization-bitsandbytes`, code
fetched from the Hub at run time) and logs why it could not: without `kernels` "Failed to load CPU
gemm_4bit_forward from kernels-community"; with it (transformers >= 5.25 installs it) offline,
"Skipping publisher trust check for 'kernels-community/...'" from the `kernels` logger as well.
We switch that path off, so the lookup is useless and its lines only stand in front of every run
and every one-line error. `quiet_bitsandbytes_cpu_ops_import` (installed by `dpo/__init__.py`
before anything imports bitsandbytes) quiets it by where it happens, not by what it says: while
`bitsandbytes.backends.cpu.ops` is being imported, `kernels` cannot be imported (no Hub lookup)
and the loggers of that module and of `kernels` are silent; anything logged elsewhere, and
anything they log afterwards, still shows.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings

from torch import nn

SWITCH = "support_avx512bf16_for_cpu"  # bitsandbytes 0.50.2, nn/modules.py: Linear4bit

# bitsandbytes 0.50.2, backends/cpu/ops.py: its `has_avx512bf16()` branch runs once, at import.
CPU_OPS_MODULE = "bitsandbytes.backends.cpu.ops"
LOOKUP_PACKAGE = "kernels"  # what that branch imports to fetch its optional kernel
QUIET_LOGGERS = (CPU_OPS_MODULE, LOOKUP_PACKAGE)  # a logger's level also covers its children (kernels.*)
IMPORT_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"  # the line 0.50.2 logs there
_ABSENT = object()


@contextlib.contextmanager
def quiet_kernel_lookup():
    """While inside: `import kernels` fails (bitsandbytes then skips its Hub lookup) and the loggers in
    QUIET_LOGGERS, children included, drop every record. Both are restored on exit."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    hidden = sys.modules.get(LOOKUP_PACKAGE, _ABSENT)
    sys.modules[LOOKUP_PACKAGE] = None  # import system: "import of kernels halted" (an ImportError)
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)  # above every level logging has
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if hidden is _ABSENT:
            sys.modules.pop(LOOKUP_PACKAGE, None)
        else:
            sys.modules[LOOKUP_PACKAGE] = hidden


class _QuietCpuOpsImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for CPU_OPS_MODULE it takes the normal spec and runs the module's code
    inside `quiet_kernel_lookup`."""

    def find_spec(self, name, path=None, target=None):
        if name != CPU_OPS_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with quiet_kernel_lookup():
                run(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


def quiet_bitsandbytes_cpu_ops_import() -> bool:
    """Make the coming import of bitsandbytes' CPU ops quiet (see the module docstring). Returns False
    when it is too late (already imported in this process). Safe to call repeatedly."""
    if CPU_OPS_MODULE in sys.modules:
        return False
    if not any(isinstance(finder, _QuietCpuOpsImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietCpuOpsImport())
    return True


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
