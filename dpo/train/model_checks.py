"""Model-side checks and loading helpers shared by the recipes.

Everything here runs before any weights are loaded, so a mistake costs seconds, not a
download of 5 GB: the model id must resolve, and every LoRA target must name a module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dpo.errors import UserError, hub_error
from dpo.files import confined
from dpo.gate.integrations import check_model_integrations
from dpo.hub import OFFLINE_MODEL_COMMAND, local_reason, offline_if_unreachable, offline_mode, offline_why
from dpo.log import log
from dpo.train.attention import attention_implementation
from dpo.train.safety.checkpoints import check_room_for_run, safetensors_problem
from dpo.train.speed.activation import one_kernel_activation


def without_zero3_init():
    """A context in which transformers' `from_config` builds a model plainly even under DeepSpeed
    ZeRO-3. There it would wrap construction in `deepspeed.zero.Init` and then initialise weights by
    gathering them, which fails on the meta device ("Cannot copy out of meta tensor"): we build
    meta models only to read module names. Uses transformers' private flag that marks zero.Init
    as already active (transformers 5.23)."""
    from transformers.modeling_utils import set_zero3_state

    return set_zero3_state()


def _looks_local(name: str) -> bool:
    """A path, not a hub id (dpo/hub.py: starts like a path, names a file, lies in a folder that is here, ...)."""
    return local_reason(name) is not None


MODEL_FLAG = "--model_name_or_path"


def _fetch_error(kind: str, name: str, err: Exception, flag: str) -> UserError:
    """Why `name` could not be loaded; for a hub id, how to use a downloaded copy (a local folder gets no hub
    hint). Offline (HF_HUB_OFFLINE, or the Hub did not answer) and not in the cache: the ways to work offline.
    `flag`: the setting the user gave `name` under (a reward model's is not the policy's --model_name_or_path);
    the SmolLM2 folder built without the Hub is offered for the policy only (it is no reward model)."""
    download = f"`hf download {name} --local-dir ./{Path(name).name}`"
    if _looks_local(name):
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return UserError(f"could not load the {kind} in folder {name}: {reason}")
    if offline_mode():
        smollm2 = (
            f"; or build SmolLM2-135M-Instruct without the Hub ({OFFLINE_MODEL_COMMAND}) and pass {flag} ./models/smollm2"
            if flag == MODEL_FLAG
            else ""
        )
        return UserError(
            f"could not load {kind} '{name}': {offline_why()}, and the Hugging Face cache has no copy of it\n"
            f"  Offline, pass a model folder: download it where you have access ({download}) and pass "
            f"{flag} ./{Path(name).name}{smollm2}. With a copy in the cache, HF_HUB_OFFLINE=1 skips the network"
        )
    return hub_error(
        kind,
        name,
        err,
        f"If the Hub is unreachable or the repo is private, download it where you have access "
        f"({download}; private repos read HF_TOKEN) and pass the folder: {flag} ./{Path(name).name}",
    )


def missing_model_folder(name: str) -> UserError:
    """A path-looking model name that is not there: a missing path, never a hub id to try."""
    return UserError(
        f"model folder not found: {name}: no such file or folder (read as a local path: {local_reason(name)}); "
        "pass an existing model folder, or a hub id (org/name)"
    )


def load_model_config(name: str, revision: str = "main", trust_remote_code: bool = False, flag: str = MODEL_FLAG):
    """AutoConfig for a hub id or a local folder, with one clear error if it can't be had. Before a hub id is
    fetched, the Hub is asked once (dpo/hub.py): when it does not answer, this fails in seconds, not 30-53."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise missing_model_folder(name)
    if _looks_local(name):
        check_config_json(Path(name).expanduser())
    else:
        offline_if_unreachable()
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _fetch_error("model", name, err, flag) from None


def check_config_json(folder: Path) -> None:
    """A local model folder has a config.json that is a JSON object: else it is not a model folder."""
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(
            f"{folder} is not a model folder: it has no config.json (a model folder holds config.json, "
            "the tokenizer files and *.safetensors weights, as save_pretrained writes them)"
        )
    try:
        data = json.loads(config.read_bytes())
    except UnicodeDecodeError as err:
        raise UserError(f"{config} is not valid JSON: byte {err.start} is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{config} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            f"{folder} is not a usable model folder"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{config} holds a JSON {type(data).__name__}, not a model configuration (an object)")


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: loading runs code
# What from_pretrained(..., use_safetensors=True) reads from a folder or repo: one file, or an index of shards.
# Any other *.safetensors beside them (a stray copy, an adapter) is not loaded.
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_safetensors(
    name: str, revision: str = "main", flag: str = "--model_name_or_path", auto_class: str = "AutoModelForCausalLM"
) -> None:
    """The model's weights must be safetensors under the name transformers loads: a local folder (or, when
    the Hub answers, a repo) holding only pickled weights (pytorch_model.bin), even beside a stray
    *.safetensors, is refused before anything loads, with how to convert it."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = [f.name for f in path.iterdir() if f.is_file()]
    else:
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(name, revision=revision)
        except Exception:  # offline, private, rate-limited: from_pretrained will say what is wrong
            return
    if any(f in SAFE_WEIGHTS for f in files):
        if path.is_dir():
            check_weight_files(path)
        return
    pickled = sorted(f for f in files if f.endswith(PICKLED_WEIGHTS))
    stray = sorted(f for f in files if f.endswith(".safetensors"))
    beside = f" ({', '.join(stray[:3])} beside them is not {SAFE_WEIGHTS[0]}, which is what loads)" if stray else ""
    if not pickled:
        raise UserError(
            f"model {name} has no weights: no {SAFE_WEIGHTS[0]} (or {SAFE_WEIGHTS[1]})"
            + (
                f"; {', '.join(stray[:3])} is not loaded under that name: rename the whole model's file"
                if stray
                else ""
            )
        )
    raise UserError(
        f"model {name} has only pickled weights ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''})"
        f"{beside}; safetensors are required (unpickling a file can run code). If you trust the file, convert it "
        f'once: python -c "from transformers import {auto_class} as M; '
        f"M.from_pretrained('{name}', use_safetensors=False).save_pretrained('{path.name}-safetensors')\" "
        f"and pass {flag} {path.name}-safetensors"
    )


def check_run_base(name: str, source: str) -> None:
    """The base model a finished run names (`source`: which file and key say so), before any weights load:
    a local folder must still be there (evaluate and export used to fail deep inside from_pretrained when
    it had been moved), with a config and whole safetensors."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(
            f"the run's base model folder {name} ({source}) is not there: it was moved or deleted after the run. "
            "Put it back at that path (a symbolic link to it will do)"
        )
    load_model_config(name)
    check_safetensors(name)


# Files any transformers tokenizer is built from (fast: tokenizer.json; slow: a vocabulary, BPE merges or
# a sentencepiece model). A folder with none of them still "loads": as an empty-vocabulary GPT-2 tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
SAMPLE_TEXT = "Hello, world."  # any real tokenizer gives this at least one token (an unknown-token one at worst)


def check_weight_files(folder: Path) -> None:
    """Every *.safetensors file of a local model folder is whole, and every shard its index names is
    there: an interrupted download or copy is named here, before anything loads, instead of failing
    inside from_pretrained with safetensors' "incomplete metadata"."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is truncated or corrupt (no readable weight_map): download it again") from None
        missing = sorted(s for s in shards if not confined(folder, s, index).is_file())  # shards inside the folder
        if missing:
            raise UserError(
                f"{folder} is missing {len(missing)} of the {len(shards)} weight shards that {index.name} lists "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): download them again"
            )
    for weights in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise UserError(
                f"{weights} is truncated or corrupt ({problem}): download or copy it again "
                "(an interrupted download or copy leaves such a file)"
            )


def load_tokenizer(name: str, revision: str = "main", trust_remote_code: bool = False, flag: str = MODEL_FLAG):
    """The model's tokenizer; pads with EOS when it has no pad token (phi-2 has none). Refused, naming
    the folder, when a local folder holds no tokenizer files or the tokenizer turns text into 0 tokens:
    every row would train (or be scored) as nothing."""
    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): transformers would build an "
            "empty tokenizer and every text would become 0 tokens. Save the tokenizer of the model it came from "
            f"into it (tokenizer.save_pretrained('{name}'))"
        )
    if not _looks_local(name):
        offline_if_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _fetch_error("tokenizer", name, err, flag) from None
    if not tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"the tokenizer of {name} encodes {SAMPLE_TEXT!r} to 0 tokens ({type(tokenizer).__name__}, "
            f"{len(tokenizer)} entries): every text would become 0 tokens. Check its tokenizer files"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(config, trust_remote_code: bool = False):
    """The architecture built on the meta device: names and shapes, no weights, no memory."""
    with torch.device("meta"), without_zero3_init():  # shapes only: no ZeRO-3 partitioning
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_features(module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA treats as linear, else None: nn.Linear, and
    transformers' Conv1D (GPT-2's c_attn / c_fc / c_proj: a linear layer with its weight stored
    transposed, (in, out)), as PEFT's "all-linear" and its LoRA layers do."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return None


def linear_module_names(config, trust_remote_code: bool = False) -> tuple[list[str], str | None]:
    """Dotted names of every linear layer (`linear_features`) in the architecture, and the name of
    the output layer (lm_head), from a model built on the meta device (no weights, no memory)."""
    model = meta_model(config, trust_remote_code)
    output_layer = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if linear_features(module) is not None]
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


def trainable_parameter_count(config, model_args, targets: list[str], trust_remote_code: bool = False) -> int:
    """How many parameters training will update, from shapes alone: LoRA's A (r x in) and B (out x r)
    on each targeted linear layer (+ DoRA's magnitude, out), full copies of `lora_modules_to_save`;
    without PEFT, every parameter of the model."""
    model = meta_model(config, trust_remote_code)
    if not model_args.use_peft:
        return sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    count = 0
    for name in targets:
        in_features, out_features = linear_features(modules[name])
        count += model_args.lora_r * (in_features + out_features)
        count += out_features if model_args.use_dora else 0
    for keep in model_args.lora_modules_to_save or []:
        kept = [m for n, m in modules.items() if n == keep or n.endswith("." + keep)]
        count += sum(p.numel() for m in kept for p in m.parameters())
    return count


def check_lora_rank(config, model_args, targets: list[str], trust_remote_code: bool = False) -> None:
    """lora_r at most the narrower side (min of in and out features) of every targeted layer: LoRA's update
    B @ A has rank min(r, in, out), so a larger r adds parameters (and disk: r * (in + out) each) and nothing else."""
    modules = dict(meta_model(config, trust_remote_code).named_modules())
    narrowest = min((min(linear_features(modules[n])), n) for n in targets) if targets else None
    if narrowest and model_args.lora_r > narrowest[0]:
        raise UserError(
            f"lora_r {model_args.lora_r} exceeds the narrower side of the targeted layer {narrowest[1]} "
            f"({narrowest[0]} features): LoRA's update has rank at most {narrowest[0]} there, so the extra rank "
            f"only adds parameters; set lora_r to {narrowest[0]} or less"
        )


def require_model(name) -> None:
    """model_name_or_path set (a YAML `model_name_or_path: null` reached the recipes as None)."""
    if not name:
        raise UserError(
            "model_name_or_path is not set: name the model to train (a hub id or a model folder), in the YAML "
            "or as --model_name_or_path"
        )


def check_model_and_load_tokenizer(model_args, training_args):
    """The model phase of a recipe, before any weights load: the model id resolves, its weights
    are safetensors (whole, not truncated), every LoRA target names a layer (logged), the tokenizer
    loads, and output_dir's disk has room for a checkpoint and the final files. Returns the tokenizer."""
    require_model(model_args.model_name_or_path)
    remote_code = training_args.trust_remote_code  # off unless you set it: remote code runs on your machine
    config = load_model_config(model_args.model_name_or_path, model_args.model_revision, remote_code)
    check_safetensors(model_args.model_name_or_path, model_args.model_revision)
    targets = []
    if model_args.use_peft:
        targets = check_lora_targets(config, model_args.lora_target_modules, remote_code)
        check_lora_rank(config, model_args, targets, remote_code)
        kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
        log(f"LoRA on {len(targets)} linear layers ({kinds})")
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, remote_code)
    check_model_integrations(training_args, config, tokenizer)  # pad_token, max_length vs positions (dpo/gate/)
    trainable = trainable_parameter_count(config, model_args, targets, remote_code)
    check_room_for_run(training_args, trainable, tokenizer)
    return tokenizer


def model_init_kwargs(model_args, training_args) -> dict:
    """What DPOTrainer passes to from_pretrained when the model is given by name (also how an SFT adapter's base
    and the SFT recipe's model load): the model's gelu_new, if it has one, as torch's one-kernel tanh GELU
    (dpo/train/speed/activation.py)."""
    config = load_model_config(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    return {
        **one_kernel_activation(config),
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        # fp16: no eager attention that overflows (dpo/train/attention.py)
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
