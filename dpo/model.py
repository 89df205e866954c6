"""Model-side checks and loading helpers shared by the recipes.

Everything here runs before any weights are loaded, so a mistake costs seconds, not a
download of 5 GB: the model id must resolve, and every LoRA target must name a module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dpo.attention import attention_implementation
from dpo.compat import without_zero3_init
from dpo.errors import UserError, hub_error
from dpo.log import log


def _looks_local(name: str) -> bool:
    """A path, not a hub id: starts like a path, has more than one '/', or exists on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _fetch_error(kind: str, name: str, err: Exception, flag: str) -> UserError:
    return hub_error(
        kind,
        name,
        err,
        f"If the Hub is unreachable or the repo is private, download it where you have access "
        f"(`hf download {name} --local-dir ./{Path(name).name}`; private repos read HF_TOKEN) "
        f"and pass the folder: {flag} ./{Path(name).name}",
    )


def load_model_config(name: str, revision: str = "main", trust_remote_code: bool = False):
    """AutoConfig for a hub id or a local folder, with one clear error if it can't be had."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"model folder not found: {name}")
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _fetch_error("model", name, err, "--model_name_or_path") from None


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: loading runs code


def check_safetensors(name: str, revision: str = "main") -> None:
    """The model's weights must be safetensors: a local folder (or, when the Hub answers, a repo) holding
    only pickled weights (pytorch_model.bin) is refused before anything loads, with how to convert it."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = [f.name for f in path.iterdir() if f.is_file()]
    else:
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(name, revision=revision)
        except Exception:  # offline, private, rate-limited: from_pretrained will say what is wrong
            return
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = sorted(f for f in files if f.endswith(PICKLED_WEIGHTS))
    if not pickled:
        raise UserError(f"model {name} has no weights: no *.safetensors file")
    raise UserError(
        f"model {name} has only pickled weights ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}); "
        "safetensors are required (unpickling a file can run code). If you trust the file, convert it once: "
        f'python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{name}', use_safetensors=False).save_pretrained('{path.name}-safetensors')\" "
        f"and pass --model_name_or_path {path.name}-safetensors"
    )


def load_tokenizer(name: str, revision: str = "main", trust_remote_code: bool = False):
    """The model's tokenizer; pads with EOS when it has no pad token (phi-2 has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _fetch_error("tokenizer", name, err, "--model_name_or_path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def linear_module_names(config, trust_remote_code: bool = False) -> tuple[list[str], str | None]:
    """Dotted names of every nn.Linear in the architecture, and the name of the output layer
    (lm_head), from a model built on the meta device (no weights, no memory)."""
    with torch.device("meta"), without_zero3_init():  # names only: no ZeRO-3 partitioning
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output_layer = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    head = next((name for name, module in model.named_modules() if module is output_layer), None)
    return names, head


def check_lora_targets(config, target_modules, trust_remote_code: bool = False) -> list[str]:
    """Fail if any LoRA target matches no linear layer; return the matched module names.

    PEFT accepts a list of targets when at least one matches and silently ignores the rest,
    so a stale name (phi-2's old `Wqkv`, `out_proj`) trains nothing in those layers.
    A target matches a module whose dotted name equals it or ends with `.<target>`, as in PEFT.
    """
    names, head = linear_module_names(config, trust_remote_code)
    if target_modules in (None, "all-linear", ["all-linear"]):
        return [n for n in names if n != head]  # PEFT's all-linear leaves the output layer alone
    # a bare string is one module name (dpo.compat.lora_config hands PEFT a list, not a regex)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    matches = {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}
    unmatched = [t for t, found in matches.items() if not found]
    if unmatched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(
            f"LoRA target(s) {unmatched} match no linear layer of {config.model_type} "
            f"and would train nothing. Linear layers in this model: {leaf_names}"
        )
    return [n for n in names if any(n in found for found in matches.values())]


def check_model_and_load_tokenizer(model_args, training_args):
    """The model phase of a recipe, before any weights load: the model id resolves, its weights
    are safetensors, every LoRA target names a layer (logged), and the tokenizer loads. Returns the tokenizer."""
    remote_code = training_args.trust_remote_code  # off unless you set it: remote code runs on your machine
    config = load_model_config(model_args.model_name_or_path, model_args.model_revision, remote_code)
    check_safetensors(model_args.model_name_or_path, model_args.model_revision)
    if model_args.use_peft:
        targets = check_lora_targets(config, model_args.lora_target_modules, remote_code)
        kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
        log(f"LoRA on {len(targets)} linear layers ({kinds})")
    return load_tokenizer(model_args.model_name_or_path, model_args.model_revision, remote_code)


def model_init_kwargs(model_args, training_args) -> dict:
    """What DPOTrainer passes to from_pretrained when the model is given by name."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        # fp16: no eager attention that overflows (dpo/attention.py)
        "attn_implementation": attention_implementation(model_args.attn_implementation, training_args.fp16),
        "dtype": model_args.dtype,
        "use_safetensors": True,  # never unpickle downloaded weights
    }


def is_sharded(training_args) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where parameters are flattened and sharded."""
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def match_quant_storage(model_args, training_args) -> str | None:
    """Under FSDP/ZeRO-3, the dtype to store packed 4-bit weights in (the model's); None: leave it.

    Sharding flattens all parameters of a unit into one tensor of one dtype; 4-bit weights
    stored as uint8 (bitsandbytes' default) beside bf16 LoRA weights cannot be flattened
    together. Storing them as bfloat16 (same bits, different label) fixes that.
    """
    if not model_args.load_in_4bit or model_args.bnb_4bit_quant_storage or not is_sharded(training_args):
        return None
    return model_args.dtype if model_args.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
