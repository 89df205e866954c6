"""Pick numeric precision from the hardware, so one YAML works on an A100, a T4 and a laptop.

| hardware                       | bf16  | fp16  | model/compute dtype | why                                   |
|--------------------------------|-------|-------|---------------------|---------------------------------------|
| CUDA with native bf16 (>= sm80)| True  | False | bfloat16            | fast, fp32 range: no loss scaling      |
| CUDA without bf16 (T4, V100)   | False | True  | float16             | measured finite; 3.2x fp32 (below)     |
| CPU (and anything else)        | False | False | float32             | bf16 autocast on CPU is slow and lossy |

The fp16 row follows a GPU run (BENCHMARKS.md, GPU section; benchmarks/results/gpu/): the phi-2 recipe at
phi-2's size (random weights) trained 200 steps at 1024 tokens in fp16 with every loss finite, no step
skipped by the gradient scaler, and a loss curve within 3.3e-2 of fp32's over the first 30 steps, at 3.2x
fp32's tokens/s (a T4's fp16 tensor cores are about 8x its fp32). Its safety net, for what random weights
cannot show (phi-2's real activation outliers): the trainable LoRA weights stay fp32 for the gradient
scaler (dpo/compat.py), attention scores are never computed in fp16 (dpo/train/attention.py), and a
non-finite loss or a collapsing loss scale stops the run (dpo/train/safety/guards.py, exit 3) with the
way back to fp32 compute: `--fp16 false --dtype float32`.

The optimizer is AdamW with torch's fused kernel (`optim: adamw_torch_fused`, also transformers' and TRL's default)
on every device torch has that kernel for (CUDA and CPU among them): one kernel updates every LoRA tensor, where
`adamw_torch` runs a chain of foreach kernels on a GPU and a Python loop of 6 ops per tensor on a CPU. Elsewhere it
falls back to `adamw_torch`. Steps are counted against TRL's in tests/train/test_step_work.py.
Anything the user sets explicitly (YAML or CLI) wins over these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    bf16: bool
    fp16: bool
    dtype: str  # ModelConfig.dtype: the model's (and 4-bit compute) dtype
    use_cpu: bool
    reason: str

    @property
    def optim(self) -> str:
        """The AdamW the device has the fastest kernel for (module docstring)."""
        return adamw_for("cpu" if self.use_cpu else "cuda")

    def as_defaults(self) -> dict:
        """Parser defaults: DPOConfig.bf16/fp16/use_cpu/optim and ModelConfig.dtype."""
        return {
            "bf16": self.bf16,
            "fp16": self.fp16,
            "dtype": self.dtype,
            "use_cpu": self.use_cpu,
            "optim": self.optim,
        }


FUSED_ADAMW, FOREACH_ADAMW = "adamw_torch_fused", "adamw_torch"


def adamw_for(device_type: str) -> str:
    """adamw_torch_fused where torch has a fused AdamW kernel for `device_type`, else adamw_torch. torch's own list
    (what `torch.optim.AdamW(fused=True)` checks); read, not probed: a probe would allocate on the GPU in every
    process of a launch."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the list: CUDA and CPU have had the kernel since torch 2.4
        return FUSED_ADAMW if device_type in ("cuda", "cpu") else FOREACH_ADAMW
    return FUSED_ADAMW if device_type in _get_fused_kernels_supported_devices() else FOREACH_ADAMW


def detect_precision() -> Precision:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(True, False, "bfloat16", False, f"{name} supports bf16")
        return Precision(
            False,
            True,
            "float16",
            False,
            f"{name} has no native bf16: fp16 mixed precision, measured finite at phi-2 size with random weights "
            "(BENCHMARKS.md); for fp32 compute instead: --fp16 false --dtype float32",
        )
    return Precision(False, False, "float32", True, "no CUDA GPU: CPU in fp32")


def describe(bf16: bool, fp16: bool, dtype: str, optim: str | None = None) -> str:
    mixed = "bf16 mixed precision" if bf16 else "fp16 mixed precision" if fp16 else "no mixed precision"
    if optim is None:  # a caller that builds its own optimizer (the notebooks' plain TRL runs)
        return f"{mixed}, model dtype {dtype}"
    fused = " (torch's fused AdamW: one kernel updates every tensor)" if optim == FUSED_ADAMW else ""
    return f"{mixed}, model dtype {dtype}, optimizer {optim}{fused}"
