"""Starting DPO from an SFT adapter: find it, check it fits the base, load base + adapter once.

The DPO paper takes the SFT model as pi_ref. With LoRA, the SFT model is the 4-bit base plus
the SFT adapter, so DPO from an SFT adapter means:

    policy    = base + adapter "default", initialised from the SFT adapter's weights, trained
    reference = base + adapter "ref", a frozen copy of the SFT adapter (TRL makes it)

and one 4-bit base in memory under both. An adapter is a folder (or hub repo) with
adapter_config.json and adapter_model.safetensors; it is accepted as `--sft_adapter_path`, or
as `--model_name_or_path` (then its base comes from adapter_config.json).

Everything except `load_with_adapter` runs before any weights load: a base that does not fit
the adapter (other architecture or sizes) is one clear error, not a shape mismatch mid-load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dpo.errors import UserError
from dpo.gate.output_dir import ADAPTER_CONFIG, read_adapter_config_file
from dpo.log import log

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adapter_file(name: str, filename: str) -> Path | None:
    """`filename` of adapter `name` (a folder, or a hub repo: downloaded), or None if it has none."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None  # a path that does not exist, or not a hub id
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, filename))
    except Exception:  # not on the Hub, no such file, offline, private: not an adapter we can read
        return None


def read_adapter_config(name: str) -> dict | None:
    """The adapter's adapter_config.json as a dict, or None when `name` is not a PEFT adapter."""
    path = _adapter_file(name, ADAPTER_CONFIG)
    return None if path is None else read_adapter_config_file(path)


def resolve_start(model_name_or_path: str, sft_adapter_path: str | None):
    """(base model, SFT adapter or None, its adapter_config) for a DPO or evaluation run.

    `--sft_adapter_path A` keeps `model_name_or_path` as the base. An adapter folder given as
    `model_name_or_path` is recognised as one (adapter_config.json, no config.json): its base is
    the one adapter_config.json names.
    """
    if sft_adapter_path:
        config = read_adapter_config(sft_adapter_path)
        if config is None:
            raise UserError(
                f"--sft_adapter_path {sft_adapter_path}: no {ADAPTER_CONFIG} there; expected a PEFT adapter "
                "folder (such as recipes/sft_phi2.py's output_dir) or a hub repo holding one"
            )
        return model_name_or_path, sft_adapter_path, config
    folder = Path(model_name_or_path).expanduser()
    if folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        config = read_adapter_config(model_name_or_path)
        base = config.get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; pass the base as "
                f"--model_name_or_path and the adapter as --sft_adapter_path {model_name_or_path}"
            )
        log(f"{model_name_or_path} is a PEFT adapter: base {base}, adapter = the SFT starting point")
        return base, model_name_or_path, config
    return model_name_or_path, None, None


def _linear_shapes(model_config, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{dotted module name: (in_features, out_features)} of every linear layer (nn.Linear and GPT-2's
    Conv1D: model_checks.linear_features), built on the meta device."""
    from dpo.train.model_checks import linear_features

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return {n: shape for n, m in model.named_modules() if (shape := linear_features(m)) is not None}


def adapter_weights(adapter: str) -> Path:
    """The adapter's adapter_model.safetensors (downloaded for a hub id); UserError if it has none."""
    from dpo.train.safety.checkpoints import safetensors_problem

    weights = _adapter_file(adapter, ADAPTER_WEIGHTS)
    if weights is None:
        raise UserError(f"{adapter}: no {ADAPTER_WEIGHTS} (adapters load from safetensors only)")
    if problem := safetensors_problem(weights):  # an interrupted copy or download: named, not a SafetensorError
        raise UserError(f"{weights} is truncated or corrupt ({problem}): copy or download the adapter again")
    return weights


def check_adapter_fits(adapter: str, adapter_config: dict, model_config, base_name: str) -> None:
    """Fail before any weights load if the adapter was not trained on a model shaped like this base.

    Reads only the safetensors header of the adapter: every LoRA pair must sit on a linear layer
    of the base with matching in/out sizes. A differing recorded base name with matching shapes
    is logged, not refused (a local copy of the same model has another name).
    """
    from safetensors import safe_open

    weights = adapter_weights(adapter)
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter}: a {adapter_config.get('peft_type')} adapter; only LoRA adapters are supported")
    shapes = _linear_shapes(model_config)
    recorded = adapter_config.get("base_model_name_or_path")
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            size = f.get_slice(key).get_shape()
            want = shapes.get(module)
            got_ok = want is not None and (size[1] == want[0] if ".lora_A." in key else size[0] == want[1])
            if not got_ok:
                found = "no such linear layer" if want is None else f"in/out features {want}"
                raise UserError(
                    f"the SFT adapter {adapter} does not fit the base model '{base_name}': its layer {module} "
                    f"has shape {list(size)} for {key.split('.')[-2]}, the base has {found}. The adapter was "
                    f"trained on '{recorded}'; pass that model as --model_name_or_path"
                )
    if recorded and recorded != base_name:
        log(f"note: the SFT adapter was trained on '{recorded}'; using '{base_name}', which has the same layer shapes")


def load_with_adapter(base_name: str, base_kwargs: dict, adapter: str, trainable: bool, adapter_name="default"):
    """Load `base_name` with `base_kwargs` as TRL loads a model given by name, and put `adapter` on it."""
    from dpo.compat import create_model_from_path
    from dpo.train.model_checks import check_weight_files
    from dpo.train.speed.kernels import portable_4bit_layers, use_portable_4bit_kernels

    if Path(base_name).is_dir():  # a local base: every weight file whole before anything loads
        check_weight_files(Path(base_name))
    adapter_weights(adapter)  # the adapter's too
    with portable_4bit_layers():  # one 4-bit kernel on every CPU (dpo/train/speed/kernels.py)
        base = create_model_from_path(base_name, **base_kwargs)
    use_portable_4bit_kernels(base)  # checks the switch; no-op without 4-bit layers
    return put_adapter(base, adapter, adapter_name, trainable)


def put_adapter(model, adapter: str, adapter_name: str = "default", trainable: bool = False):
    """`model` with the LoRA adapter `adapter` on it, from adapter_model.safetensors only (PEFT
    would fall back to a pickled adapter_model.bin). A PeftModel gets it as one more adapter."""
    from peft import PeftModel

    adapter_weights(adapter)  # safetensors only (and whole)
    if isinstance(model, PeftModel):
        model.load_adapter(adapter, adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, adapter, adapter_name=adapter_name, is_trainable=trainable)


def policy_from_sft_adapter(base_name: str, training_args, quantization_config, sft_adapter: str):
    """The DPO policy: base (4-bit if `quantization_config`) + the SFT adapter, trainable, as "default".

    Loaded with `training_args.model_init_kwargs`, as DPOTrainer would load `base_name` itself;
    TRL then adds the frozen "ref" copy (dpo/compat.py: REFERENCE_ADAPTER).
    """
    kwargs = dict(training_args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if training_args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # as DPOTrainer does: one full copy per process
    return load_with_adapter(base_name, kwargs, sft_adapter, trainable=True)


def start_point(model_args, training_args, sft_adapter_path: str | None) -> tuple[str, str | None]:
    """The model phase for DPO from SFT, before any weights load: (base model, SFT adapter or None).

    Resolves an adapter given either way and checks that it fits the base; the adapter's own
    LoRA settings (rank, targets) then apply, not the recipe's lora_* keys.
    """
    from dpo.train.model_checks import load_model_config, require_model
    from dpo.train.safety.identity import check_adapter_base

    require_model(model_args.model_name_or_path)
    base, adapter, config = resolve_start(model_args.model_name_or_path, sft_adapter_path)
    if adapter is None:
        return base, None
    model_config = load_model_config(base, model_args.model_revision, training_args.trust_remote_code)
    check_adapter_fits(adapter, config, model_config, base)
    check_adapter_base(adapter, base, model_args.model_revision)  # the weights it was trained on, not the name only
    check_sft_run(adapter)  # a run folder of these recipes: finished, and its files the ones that run wrote
    log(
        f"starting from the SFT adapter {adapter} (r={config.get('r')}, targets {config.get('target_modules')}): "
        "policy initialised from it, reference = base + SFT adapter (frozen), one base in memory"
    )
    return base, adapter


def as_reference(model):
    """Context in which `model` (a PeftModel) computes pi_ref: TRL's frozen "ref" copy of the SFT
    adapter when the run started from one, else the base with adapters disabled."""
    from dpo.compat import REFERENCE_ADAPTER, use_adapter

    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)


def check_sft_run(adapter: str | Path) -> None:
    """An SFT adapter that is a run folder of these recipes (its run_complete.json, or a checkpoint they marked),
    before DPO starts from it: the run finished, and every file it hashed has the bytes it wrote
    (verify_finished_run: a checkpoint's adapter copied over the final one is named). A plain adapter folder, or a
    TRL run's output with its own (unmarked) checkpoint-<step> folders, records nothing to check."""
    from dpo.train.safety.checkpoints import MARKER, checkpoints_in
    from dpo.train.safety.runs import RUN_MARKER, require_finished_run, verify_finished_run

    folder, command = Path(adapter).expanduser(), "DPO starting from this SFT adapter"
    if (folder / RUN_MARKER).is_file() or any((c / MARKER).is_file() for c in checkpoints_in(folder)):
        require_finished_run(folder, command)
        verify_finished_run(folder, command)
