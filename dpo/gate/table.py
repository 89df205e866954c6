"""The settings table: every numeric, list and free-text setting the recipes and commands accept, with
its bound and why the bound exists. dpo/gate/check.py applies it before any weights load.

A setting is named once, whatever dataclass or command it comes from (`seed` is the recipes' and
`python -m dpo.evaluate`'s alike). tests/gate/test_table.py enumerates every numeric field of TRL's
DPOConfig and SFTConfig, transformers' TrainingArguments, TRL's ModelConfig, the recipes' own
dataclasses and the commands' flags, and fails when one is in neither TABLE, DELEGATED nor UNCHECKED,
so a field added by a TRL or transformers upgrade cannot skip the gate. It then sets each tabled
setting just outside its bound and expects one `error:` line, exit 2, before weights load.
"""

from __future__ import annotations

from dpo.gate.autobatch import auto_batch_relations
from dpo.gate.keywords import accelerator_config_keys, checkpoint_keys, scheduler_keys, sft_dataset_keys
from dpo.gate.rules import Bound, Choice, Each, Keys, Named, at_least, fraction, non_negative, positive


# attn_implementation: the names transformers' from_pretrained accepts ("eager" and its attention registry:
# sdpa, flash_attention_2, ...) and its pattern for a hub kernel ("org/repo[@rev][:fn]"), both read from
# transformers when checked, so names an upgrade registers pass.
def attention_names() -> tuple[str, ...]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    keys = ALL_ATTENTION_FUNCTIONS.valid_keys()
    # less the ones this repository registers for its own use (dpo/train/attention.py, speed/packing.py)
    return ("eager", *(k for k in keys if not ALL_ATTENTION_FUNCTIONS[k].__module__.startswith("dpo.")))


def is_hub_kernel(name: str) -> bool:
    from transformers.integrations.hub_kernels import is_kernel

    return is_kernel(name)


def is_template_file(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().suffix in (".jinja", ".j2") and Path(name).expanduser().is_file()


SEED_RANGE = Bound(low=0, high=2**32 - 1, whole=True, why="numpy and Python's RNGs take seeds in [0, 2^32 - 1]")
UNSET = (None,)

TABLE = {
    # ── optimisation ────────────────────────────────────────────────────────────────────────────
    "learning_rate": positive("0 trains nothing, < 0 climbs the loss"),
    "adam_beta1": fraction(
        "Adam's first-moment decay: 1 freezes the moment at zero, so no update follows the gradient"
    ),
    "adam_beta2": fraction("Adam's second-moment decay: 1 freezes the variance estimate at zero (division by ~eps)"),
    "adam_epsilon": positive(
        "Adam divides by sqrt(v) + eps: 0 divides by zero where a gradient is 0, < 0 can flip a step"
    ),
    "weight_decay": non_negative("decoupled decay pulls weights to 0; < 0 pushes them away every step"),
    "max_grad_norm": non_negative("the clipping norm; 0 turns clipping off (NaN would silently turn it off too)"),
    "warmup_steps": non_negative("below 1: a fraction of the optimizer steps; from 1: a step count"),
    "num_train_epochs": positive("0 epochs trains nothing (and with max_steps -1 nothing at all)"),
    "max_steps": at_least(1, "transformers reads 0 as unset and would train every epoch", unset=(-1,)),
    "gradient_accumulation_steps": at_least(1, "micro-batches per optimizer step"),
    "per_device_train_batch_size": at_least(1, "pairs per micro-batch"),
    "per_device_eval_batch_size": at_least(1, "pairs per eval batch"),
    # per_device_train_batch_size: auto (dpo/gate/autobatch.py): its configured micro-batch, and its memory cap
    "auto_batch_base": at_least(1, "the micro-batch auto keeps without a CUDA device", unset=UNSET),
    "auto_batch_memory_gib": positive("the GPU memory auto may plan for: 0 fits no pair", unset=UNSET),
    "eval_accumulation_steps": at_least(1, "eval batches held before moving to the CPU", unset=UNSET),
    "seed": SEED_RANGE,
    "data_seed": Bound(low=0, high=2**32 - 1, whole=True, unset=UNSET, why=SEED_RANGE.why),
    "label_smoothing_factor": fraction("transformers' cross-entropy smoothing: 1 makes every target uniform"),
    "neftune_noise_alpha": non_negative("the scale of NEFTune's embedding noise", unset=UNSET),
    "router_aux_loss_coef": non_negative(
        "a mixture-of-experts load-balancing weight; < 0 rewards imbalance", unset=UNSET
    ),
    "torch_empty_cache_steps": at_least(1, "steps between emptying the CUDA cache", unset=UNSET),
    # ── the preference loss (its relations to loss_type live in the loss table, DELEGATED below) ───
    "loss_weights": Each(non_negative("a negative weight trains that loss backwards; NaN poisons every step")),
    "f_alpha_divergence_coef": Bound(why="the alpha-divergence exponent; NaN or inf poisons every score"),
    "discopop_tau": positive("DiscoPOP's temperature divides the log-ratio difference"),
    "ld_alpha": fraction("LD-DPO's weight on the tokens past the shorter answer", high_open=False, unset=UNSET),
    "ref_model_mixup_alpha": fraction("TR-DPO's soft-update weight of the policy into the reference", high_open=False),
    "ref_model_sync_steps": at_least(1, "steps between TR-DPO reference updates"),
    "precompute_ref_batch_size": at_least(
        1, "pairs per reference forward; < 1 runs no batch and caches every value as 0", unset=UNSET
    ),
    # ── lengths and data ────────────────────────────────────────────────────────────────────────
    "max_length": at_least(1, "every row would be dropped as too long", unset=UNSET),
    "pad_to_multiple_of": at_least(1, "padding granularity in tokens", unset=(None, "auto")),
    "test_size": fraction("the held-out fraction: 1 would leave nothing to train on"),
    "dataset_num_proc": at_least(1, "processes for dataset preprocessing", unset=UNSET),
    "dataloader_num_workers": non_negative("data-loading processes; 0 loads in the main process", whole=True),
    "dataloader_prefetch_factor": at_least(1, "batches each loading worker prepares ahead", unset=UNSET),
    "prompt_format": Choice(("chat", "text"), "chat: the tokenizer's chat template; text: strings as they are"),
    "degenerate_rows": Choice(("drop", "fail"), "what the data doctor does with empty/identical/duplicate rows"),
    "packing_attention": Choice(
        ("auto", "segments", "flex", "varlen"),
        "how packed pairs' attention keeps them apart (dpo/train/speed/packed_attention.py); the device and torch "
        "each needs are checked with packing (dpo/train/speed/packing.py check_packing)",
    ),
    "chat_template_path": Named(
        lambda: (),
        is_template_file,
        "an existing Jinja chat template file ending in .jinja or .j2",
        "chat rows are rendered with it, and the run's tokenizer saved with it (a hub id or tokenizer folder, which "
        "TRL's SFT trainer also takes, would need its special tokens added to the model)",
    ),
    # ── LoRA ─────────────────────────────────────────────────────────────────────────────────────
    "lora_r": Bound(
        low=1,
        high=2**16,
        whole=True,
        why="the adapter's rank: a rank above the narrower side of a layer adds parameters, not expressiveness, "
        "and no model's layers are that wide (the targeted layers bound it once the model's config is read)",
    ),
    "lora_alpha": Bound(
        low=0, low_open=True, whole=True, why="the LoRA update is scaled by lora_alpha / lora_r: 0 trains nothing"
    ),
    "lora_dropout": fraction("1 drops every input of the adapter"),
    # ── the model ────────────────────────────────────────────────────────────────────────────────
    "attn_implementation": Named(
        attention_names,
        is_hub_kernel,
        "or a hub kernel as org/repo[@revision][:function]",
        "the attention function transformers loads the model with; a name it does not know fails at load",
    ),
    # ── logging, evaluation, checkpoints, distributed ───────────────────────────────────────────
    "logging_steps": positive("below 1: a fraction of the optimizer steps"),
    "eval_steps": positive("below 1: a fraction of the optimizer steps; 0: logging_steps", unset=(None, 0.0)),
    "eval_delay": non_negative("steps or epochs before the first evaluation"),
    "save_steps": positive("below 1: a fraction of the optimizer steps"),
    "save_total_limit": at_least(1, "0 would rotate every checkpoint away", unset=UNSET),
    "ddp_timeout": at_least(1, "seconds a process waits for the others"),
    "ddp_bucket_cap_mb": at_least(1, "DDP's gradient bucket size", unset=UNSET),
    # ── the sentiment demo (recipes/dpo_sentiment_tiny.py) ─────────────────────────────────────────
    "task_seed": SEED_RANGE,
    "heldout_topics": Bound(low=0, high=23, whole=True, why="topics held out of 24: 24 would leave none to train on"),
    "sft_examples": at_least(1, "reviews the reference model is trained on"),
    "sft_steps": at_least(1, "0 SFT steps leaves the reference model random"),
    "sft_batch_size": at_least(1, "reviews per SFT step"),
    "sft_learning_rate": positive("0 trains nothing, < 0 climbs the loss"),
    "pair_prompts": at_least(1, "training prompts: 0 gives no preference pairs"),
    "heldout_pair_prompts": at_least(1, "held-out prompts for the implicit-reward accuracy"),
    "eval_prompts": at_least(1, "held-out prompts sampled from pi_ref and pi_theta"),
    "torch_threads": at_least(1, "CPU threads; unset: torch's own (every core)", unset=UNSET),
    # ── on-policy DPO in rounds (recipes/dpo_rounds.py, dpo/rounds/) ──────────────────────────────
    "rounds": at_least(1, "rounds of sample, score, pair, train: 0 runs nothing"),
    "prompts_per_round": non_negative("prompts sampled each round; 0 takes all of them", whole=True),
    "samples_per_prompt": at_least(2, "a pair needs two answers to the same prompt"),
    "temperature": positive("sampling divides the logits by it: 0 divides by zero (greedy: every sample the same)"),
    "top_p": Bound(
        low=0, high=1, low_open=True, why="nucleus sampling keeps this share of probability mass: 0 keeps nothing"
    ),
    "generation_batch_size": at_least(1, "sequences per generation batch"),
    "min_margin": non_negative("the reward gap a pair needs; < 0 would pair a worse answer as chosen"),
    "min_pairs": at_least(1, "a round with no pair trains nothing"),
    "task_prompts": at_least(1, "sentiment: training prompts to sample"),
    "pairing": Choice(("max_min", "max_random"), "best against worst, or best against a random lower-scored answer"),
    "reference": Choice(("initial", "previous"), "the starting model fixed, or the last round's policy frozen"),
    # ── the commands: python -m dpo.evaluate / dpo.export / dpo.doctor / dpo.tiny ───────────────
    "num_prompts": at_least(1, "held-out prompts to answer: 0 writes a report of nothing"),
    "max_new_tokens": at_least(1, "an answer of 0 tokens scores the prompt alone"),
    "batch_size": at_least(1, "prompts per generation batch"),
    "unused_days": non_negative("python -m dpo.cache remove: days since a cache was last used", unset=UNSET),
    "gguf_type": Choice(("f16", "q8_0"), "the GGUF weight types llama.cpp's converter writes and the export checks"),
}

# Mapping settings, each handed to a library function as keyword arguments: the keys it takes are read from
# that function (dpo/gate/keywords.py). Checked on the YAML's and the command line's values before the
# dataclasses parse them (accelerator_config is built into an object while parsing, and a wrong key was a
# TypeError traceback there), so a wrong key is named as the user wrote it, old names included.
_CHECKPOINT = Keys(
    checkpoint_keys,
    "torch.utils.checkpoint.checkpoint (and transformers' activation_checkpointing_enable)",
    "an unknown key failed after the weights loaded (ValueError: Unexpected keyword arguments)",
)
MAPPINGS = {
    "activation_checkpointing_kwargs": _CHECKPOINT,
    "gradient_checkpointing_kwargs": _CHECKPOINT,  # transformers' old name of the same setting
    "accelerator_config": Keys(
        accelerator_config_keys,
        "transformers' AcceleratorConfig",
        "an unknown key was a TypeError traceback while the arguments were parsed",
        file_ok=True,
    ),
    "dataset_kwargs": Keys(sft_dataset_keys, "TRL's SFTTrainer", "an unknown key was silently ignored"),
}
# Mapping settings checked elsewhere, or whose keys no function declares, each with where or why.
MAPPINGS_ELSEWHERE = {
    "lr_scheduler_kwargs": "a relation below (_scheduler): its keys are the chosen lr_scheduler_type's",
    "model_init_kwargs": "dpo/gate/integrations.py, with the model's config.json: from_pretrained takes its own "
    "keys and any attribute of the model's config",
    "deepspeed": "DeepSpeed's own JSON, checked by DeepSpeed as it starts; the package must be installed "
    "(refused before parsing when it is not)",
    "fsdp_config": "read by transformers key by key only when fsdp is set (its known keys are no function's "
    "parameters); the recipes run FSDP from accelerate_configs/fsdp.yaml",
    "liger_kernel_config": "read only with use_liger_kernel, by the liger-kernel package (not installed here)",
}

# Settings whose rules live in another declared table, named here so the enumeration test knows them.
DELEGATED = {
    "beta": "the loss table (dpo/scratch/loss_settings.py): > 0, finite",
    "label_smoothing": "the loss table: [0, 0.5) where the loss type uses it, refused where it is ignored",
}

# Settings and flags that name a file or folder, and the environment variables that name a folder: an empty or
# blank one is refused (dpo/folders.py empty_path_problem), as Path("") is the current folder: a cache, a run
# or a `remove --all` there would act on whatever folder the command was started from.
PATHS = (
    "output_dir",
    "reference_cache_dir",
    "cache_dir",
    "model_name_or_path",
    "sft_adapter_path",
    "resume_from_checkpoint",
    "dataset_name",
    "dataset",
    "chat_template_path",
    "deepspeed",
    "merged",
    "gguf",
    "histogram",
    "truthy_rows",
)
ENV_PATHS = ("DPO_REFERENCE_CACHE", "DPO_MODELS_CACHE")

# Numeric settings deliberately left alone, each with its reason.
UNCHECKED = {
    "local_rank": "set by the launcher (accelerate, torchrun), never by a user",
}


# ── relations between settings: (the settings involved, a check returning a problem or None) ───
# transformers' schedulers that cannot start without an argument in lr_scheduler_kwargs (one of each tuple)
SCHEDULER_NEEDS = {
    "cosine_with_min_lr": ("min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
    "warmup_stable_decay": ("num_decay_steps",),
}
# bounds of the numeric lr_scheduler_kwargs transformers' schedulers take; any other number must be finite
SCHEDULER_KWARGS = {
    "min_lr": non_negative("the learning rate's floor: NaN becomes 0 (every step at lr 0), < 0 climbs the loss"),
    "min_lr_rate": fraction("the floor as a share of learning_rate", high_open=False),
    "min_lr_ratio": fraction("the floor as a share of learning_rate", high_open=False),
    "num_decay_steps": at_least(1, "steps of the final decay"),
    "num_stable_steps": non_negative("steps at the full learning rate", whole=True),
    "num_cycles": positive("cosine cycles over the run"),
    "power": positive("the polynomial decay's exponent"),
    "lr_end": non_negative("the polynomial decay's final learning rate"),
}
FINITE = Bound(why="a scheduler argument: NaN or inf poisons the learning rate")


def _scheduler(get):
    kind = str(getattr(get("lr_scheduler_type"), "value", get("lr_scheduler_type")))
    kwargs = get("lr_scheduler_kwargs") or {}
    if not isinstance(kwargs, dict):
        return None  # transformers refuses a non-mapping while parsing
    problems = []
    if kind in SCHEDULER_NEEDS and not set(SCHEDULER_NEEDS[kind]) & set(kwargs):
        options = " or ".join(f"{{{name}: ...}}" for name in SCHEDULER_NEEDS[kind])
        problems.append(f"lr_scheduler_type {kind} needs lr_scheduler_kwargs {options} (transformers cannot build it)")
    takes = scheduler_keys(kind)
    for name in [n for n in kwargs if takes is not None and n not in takes]:
        named = ", ".join(sorted(takes)) or "none (transformers drops the mapping for it)"
        problems.append(
            f"lr_scheduler_kwargs.{name} is not a key lr_scheduler_type {kind} takes (its keys: {named}); "
            "it would be silently ignored or fail after the weights load"
        )
    for name, value in kwargs.items():
        rule = SCHEDULER_KWARGS.get(name, FINITE if isinstance(value, (int, float)) else None)
        if rule is not None and not rule.ok(value):
            problems.append(f"lr_scheduler_kwargs.{name} {rule.describe()}; got {value} ({rule.why})")
    return "; ".join(problems) or None


def _splits(get):
    train, test = get("dataset_train_split"), get("dataset_test_split")
    if test is not None and test == train:
        return (
            f"dataset_test_split is the training split ({train!r}): the held-out pairs would be the training pairs; "
            "name another split, or unset it to hold out test_size of the training rows"
        )
    return None


def _weights_total(get):
    weights = get("loss_weights")
    if weights and all(isinstance(w, (int, float)) and w == 0 for w in weights):
        return f"loss_weights are all 0 ({weights}): no loss would train anything"
    return None


def _prefetch(get):
    if get("dataloader_prefetch_factor") is not None and not get("dataloader_num_workers"):
        return "dataloader_prefetch_factor needs dataloader_num_workers >= 1 (prefetching is done by the workers)"
    return None


def _quantized_full(get):
    quantized = next((name for name in ("load_in_4bit", "load_in_8bit") if get(name)), None)
    if quantized and get("use_peft") is False and not get("sft_adapter_path"):
        return (
            f"use_peft false with {quantized} true: a quantized base cannot be trained itself, only adapters on it "
            f"(transformers refuses after the weights load); set use_peft: true (QLoRA), or {quantized}: false "
            "for a full fine-tune"
        )
    return None


def _cache_dir_unused(get):
    if get("reference_cache_dir") and get("reference_cache") is False:
        return (
            f"reference_cache_dir {get('reference_cache_dir')} is set but reference_cache is false: nothing would be "
            "read from or written to it; set reference_cache: true, or leave reference_cache_dir unset"
        )
    return None


def _packing_attention(get):
    choice = get("packing_attention")
    if choice in (None, "auto"):
        return None
    if not get("packing"):
        return (
            f"packing_attention {choice} is set but packing is false: no row is packed, so it would choose nothing; "
            "set packing: true, or leave packing_attention unset"
        )
    if get("attn_implementation") not in (None, "sdpa"):
        return (
            f"packing_attention {choice} replaces SDPA's attention, but attn_implementation is "
            f"{get('attn_implementation')} (packing uses that one's own handling of position ids); unset one of them"
        )
    return None


RELATIONS = [
    (("lr_scheduler_type", "lr_scheduler_kwargs"), _scheduler),
    (("dataset_test_split", "dataset_train_split"), _splits),
    (("loss_weights",), _weights_total),
    (("dataloader_prefetch_factor", "dataloader_num_workers"), _prefetch),
    (("use_peft", "load_in_4bit", "load_in_8bit", "sft_adapter_path"), _quantized_full),
    (("reference_cache_dir", "reference_cache"), _cache_dir_unused),
    (("packing_attention", "packing", "attn_implementation"), _packing_attention),
    (
        ("auto_batch_base", "auto_batch_memory_gib", "per_device_train_batch_size", "auto_find_batch_size"),
        auto_batch_relations,
    ),
]
