"""dpo-recipes: the library behind the recipes, notebooks and benchmarks."""

from dpo.kernels import quiet_bitsandbytes_import_note

# Before anything imports bitsandbytes: its AVX512-BF16 import note is noise here (dpo/kernels.py).
quiet_bitsandbytes_import_note()
