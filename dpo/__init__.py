"""dpo-recipes: the library behind the recipes, notebooks and benchmarks."""

from dpo.train.speed.kernels import quiet_bitsandbytes_cpu_ops_import

# Before anything imports bitsandbytes: its AVX512-BF16 import-time kernel lookup is noise here
# (dpo/train/speed/kernels.py).
quiet_bitsandbytes_cpu_ops_import()

# Every entry point checks the launcher's environment variables first (registered in dpo.errors.ENTRY_SCOPES):
# importing any dpo module registers it.
import dpo.gate.launch  # noqa: E402,F401
