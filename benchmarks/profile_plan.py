"""What benchmarks/gpu_profile.py runs, as data: the configurations (name -> settings), the sizes, the scales' step
counts, the default cells of `make gpu`, and the run order (interleaved rounds, by tier)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

GiB = 2**30
T4_CAP_GIB = 15  # a T4's 16 GB less the CUDA context (bench_gpu.py's T4_CAP)
# `auto` with the YAML's pairs per optimizer step (bench_gpu.recipe_trainer's accumulation of 1 would leave it 2)
AUTO = {
    "per_device_train_batch_size": "auto",
    "gradient_accumulation_steps": yaml.safe_load((ROOT / "recipes" / "dpo_phi2.yaml").read_text())[
        "gradient_accumulation_steps"
    ],
}
# name -> how it is built. side: trl | recipe | generation; settings: on top of TRL's defaults / recipes/dpo_phi2.yaml
# (every run: max_length, max_steps, logging each step, no eval or checkpoints); cap_gib: a per-process memory cap
# (the T4 setting); tier: run order (lower first, so a budget cuts the last tiers); steps: "auto" cells time fewer,
# larger optimizer steps. Changes that no setting turns off are in NOT_SEPARABLE.


def t4_setting(what: str, tier: int = 3, **settings) -> dict:
    """A recipe configuration at the T4 setting: 2 pairs per micro-batch (pinned: a YAML with `auto` would choose its
    own on a GPU), one micro-batch per optimizer step (as the first GPU run measured), under the T4's 15 GiB, with
    `settings` changed."""
    flags = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, **settings}
    return dict(side="recipe", settings=flags, cap_gib=T4_CAP_GIB, tier=tier, what=what)


def trl(what: str, dtype: str = "float32") -> dict:
    """TRL + precompute_ref_log_probs at the T4 setting, its model loaded in `dtype`."""
    flags = {"precompute_ref_log_probs": True, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
    return dict(side="trl", settings=flags, dtype=dtype, cap_gib=T4_CAP_GIB, tier=1, what=what)


CONFIGS = {
    "trl_precompute": trl("TRL + precompute_ref_log_probs as `trl dpo` builds it (fp32 load, TRL's defaults)"),
    "trl_precompute_bf16": trl("the same, loaded in bf16 (`--dtype bfloat16`)", dtype="bfloat16"),
    "recipe": t4_setting("recipes/dpo_phi2.yaml as shipped (2 pairs per micro-batch)", tier=1),
    "recipe_auto_t4": dict(
        side="recipe",
        settings={**AUTO, "auto_batch_memory_gib": T4_CAP_GIB},
        cap_gib=T4_CAP_GIB,
        tier=2,
        steps="auto",
        what="+ per_device_train_batch_size: auto under the T4's 15 GiB",
    ),
    "recipe_auto": dict(
        side="recipe",
        settings=AUTO,
        tier=2,
        steps="auto",
        what="+ per_device_train_batch_size: auto, uncapped (the whole GPU)",
    ),
    "recipe_foreach_adamw": t4_setting("fused AdamW turned back: optim adamw_torch (foreach)", optim="adamw_torch"),
    "recipe_packing": t4_setting("+ packing: true (packing_attention auto)", tier=2, packing=True),
    "recipe_packing_segments": t4_setting("+ packing, SDPA per segment", packing=True, packing_attention="segments"),
    "recipe_packing_flex": t4_setting("+ packing, flex attention", packing=True, packing_attention="flex"),
    "recipe_packing_varlen": t4_setting("+ packing, varlen flash attention", packing=True, packing_attention="varlen"),
    "generation": dict(
        side="generation", settings={}, tier=2, what="rounds sampler: batched generate vs one prompt at a time"
    ),
}
NOT_SEPARABLE = {
    "non-finite guard at O(1) per step": "no setting: always installed (dpo/train/safety/guards.py)",
    "gelu_new as gelu_pytorch_tanh": "no setting: always swapped at load (dpo/train/model_checks.py model_init_kwargs)",
}
# Sizes: max_length and the lengths pairs are drawn at (phi2_random.synthetic_pairs: chosen about 1.1x, rejected
# about 0.75x the length). "truthy": pairs of a few hundred tokens, spread evenly over six lengths (assumed: no
# measured truthy-dpo length distribution is on file).
SIZES = {
    "1024": {"phi2": (1024, (1024,)), "tiny": (96, (96,))},
    "truthy": {"phi2": (1024, (192, 256, 320, 384, 448, 512)), "tiny": (96, (24, 40, 56))},
}
SCALES = {  # steps per run; `auto` cells (64 pairs per optimizer step, the YAML's) run fewer, larger steps.
    # est_s: a run's seconds before any was measured (H200, the first GPU run: build 3-9 s, a 2-pair step 0.5-0.8 s)
    "phi2": dict(runs=3, warmup=2, timed=16, profiled=2, pairs=48, est_s=30, auto_warmup=1, auto_timed=3)
    | dict(auto_profiled=1, auto_pairs=128, auto_est_s=50),
    "tiny": dict(runs=2, warmup=1, timed=2, profiled=1, pairs=8, est_s=15, auto_warmup=1, auto_timed=2)
    | dict(auto_profiled=1, auto_pairs=8, auto_est_s=15),
}
DEFAULT_CELLS = {  # what `make gpu` runs, by tier: 1 the T4 setting (the settling comparison, 15 runs, about 360 s
    # on an H200), 2 item 5 and packing as shipped (generation once, `auto`, packing at truthy lengths), 3 each
    # remaining change on its own; the budget cuts the last
    "phi2": "1024:trl_precompute,trl_precompute_bf16,recipe;truthy:trl_precompute,recipe;any:generation;"
    "1024:recipe_auto_t4,recipe_auto;truthy:recipe_packing,recipe_auto;1024:recipe_foreach_adamw;"
    "truthy:recipe_packing_segments,recipe_packing_flex,recipe_packing_varlen",
    "tiny": "1024:trl_precompute,recipe",
}


def cells_of(spec: str) -> list[tuple[str, str]]:
    """'1024:a,b;truthy:c' -> [(a, 1024), (b, 1024), (c, truthy)]; unknown names are refused."""
    cells = []
    for part in filter(None, spec.split(";")):
        size, _, names = part.partition(":")
        if size not in (*SIZES, "any"):
            raise UserError(f"unknown size {size!r} in --cells (known: {', '.join(SIZES)}, any)")
        for name in filter(None, names.split(",")):
            if name not in CONFIGS:
                raise UserError(f"unknown configuration {name!r} in --cells (known: {', '.join(CONFIGS)})")
            cells.append((name, size))
    return cells


def plan(cells: list[tuple[str, str]], runs: int) -> list[tuple[str, str, int]]:
    """The runs in the order they run: by tier, then round by round, every cell of the tier once per round."""
    order = []
    for tier in sorted({CONFIGS[c]["tier"] for c, _ in cells}):
        group = [cell for cell in cells if CONFIGS[cell[0]]["tier"] == tier]
        rounds = 1 if all(CONFIGS[c]["side"] == "generation" for c, _ in group) else runs
        for r in range(rounds):
            order += [(c, s, r) for c, s in group if CONFIGS[c]["side"] != "generation" or r == 0]
    return order
