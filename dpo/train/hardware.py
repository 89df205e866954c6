"""Pick numeric precision from the hardware, so one YAML works on an A100, a T4 and a laptop.

| hardware                       | bf16  | fp16  | model/compute dtype | why                                   |
|--------------------------------|-------|-------|---------------------|---------------------------------------|
| CUDA with native bf16 (>= sm80)| True  | False | bfloat16            | fast, fp32 range: no loss scaling      |
| CUDA without bf16 (T4, V100)   | False | False | float32             | fp16 DPO log-probs overflow -> NaN     |
| CPU (and anything else)        | False | False | float32             | bf16 autocast on CPU is slow and lossy |

The fp16 row is deliberate: summed sequence log-probs reach -1e3 and their differences feed
exp/logsigmoid; users report NaN or zero DPO losses under fp16 autocast. fp32 compute on a T4
is slower but correct; the 4-bit base still keeps phi-2's weights at about 1.7 GB.
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

    def as_defaults(self) -> dict:
        """Parser defaults: DPOConfig.bf16/fp16/use_cpu and ModelConfig.dtype."""
        return {"bf16": self.bf16, "fp16": self.fp16, "dtype": self.dtype, "use_cpu": self.use_cpu}


def detect_precision() -> Precision:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(True, False, "bfloat16", False, f"{name} supports bf16")
        return Precision(False, False, "float32", False, f"{name} has no native bf16; fp16 risks NaN DPO losses")
    return Precision(False, False, "float32", True, "no CUDA GPU: CPU in fp32")


def describe(bf16: bool, fp16: bool, dtype: str) -> str:
    mixed = "bf16 mixed precision" if bf16 else "fp16 mixed precision" if fp16 else "no mixed precision"
    return f"{mixed}, model dtype {dtype}"
