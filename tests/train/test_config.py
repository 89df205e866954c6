"""The recipe YAML through the real TrlParser; hardware precision; accelerate configs."""

import json
import re

import pytest
import torch
from helpers import ROOT, load_recipe

from dpo.compat import ModelConfig
from dpo.train.config import RecipeDPOConfig, RecipeSFTConfig, parse_recipe_args

PHI2_YAML = ROOT / "recipes" / "dpo_phi2.yaml"


def parse(argv=()):
    recipe = load_recipe("dpo_phi2")
    return parse_recipe_args((recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), PHI2_YAML, list(argv))


def test_phi2_yaml_parses_with_the_documented_settings():
    script, training, model, precision = parse()
    assert model.model_name_or_path == "microsoft/phi-2"
    assert script.dataset_name == "jondurbin/truthy-dpo-v0.1"
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
    assert model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert training.beta == 0.1 and training.loss_type == ["sigmoid"]
    # the DPO paper's batch: 2 pairs x 32 accumulation
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 64
    # the YAML uses transformers 5's name; TRL 1.16 reads the old one, which must follow it
    assert training.activation_checkpointing and training.gradient_checkpointing
    assert not training.trust_remote_code
    assert training.output_dir == "outputs/dpo_phi2"


def test_yaml_opens_with_the_command_that_runs_it():
    first_lines = PHI2_YAML.read_text().splitlines()[:6]
    assert any("accelerate launch recipes/dpo_phi2.py" in line for line in first_lines)


def test_cli_overrides_yaml_and_other_config(tmp_path):
    _, training, _, _ = parse(["--beta", "0.2"])
    assert training.beta == 0.2
    other = tmp_path / "other.yaml"
    other.write_text(PHI2_YAML.read_text().replace("beta: 0.1", "beta: 0.3"))
    _, training, _, _ = parse(["--config", str(other)])
    assert training.beta == 0.3
    _, training, _, _ = parse(["--config", str(other), "--beta", "0.4"])
    assert training.beta == 0.4


def test_precision_follows_hardware_on_cpu():
    _, training, model, precision = parse()
    assert not torch.cuda.is_available()  # conftest hides GPUs
    assert (training.bf16, training.fp16, model.dtype, training.use_cpu) == (False, False, "float32", True)
    assert "CPU" in precision.reason


@pytest.mark.parametrize("yaml_name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_gets_torchs_fused_adamw_and_an_explicit_optim_wins(yaml_name):
    """No shipped YAML pins the optimizer: dpo/train/hardware.py picks torch's fused AdamW, which torch 2.13 has for
    the CPU as for CUDA (one kernel per step instead of 6 ops per LoRA tensor); an optim the user sets wins."""
    from dpo.train.hardware import FUSED_ADAMW, adamw_for

    assert adamw_for("cpu") == adamw_for("cuda") == FUSED_ADAMW
    yaml = ROOT / "recipes" / yaml_name
    script = re.search(r"recipes/(\w+)\.py", yaml.read_text()).group(1)  # the recipe its header runs
    types = (load_recipe(script).ScriptArguments, RecipeSFTConfig if script == "sft_phi2" else RecipeDPOConfig)
    assert parse_recipe_args((*types, ModelConfig), yaml, [])[1].optim == FUSED_ADAMW
    assert parse_recipe_args((*types, ModelConfig), yaml, ["--optim", "adamw_torch"])[1].optim == "adamw_torch"


@pytest.mark.parametrize("bf16_ok, expected", [(True, (True, False, "bfloat16")), (False, (False, True, "float16"))])
def test_precision_on_gpus_with_and_without_bf16(monkeypatch, bf16_ok, expected):
    """A100-class GPUs get bf16; a T4 (no native bf16) gets fp16 mixed precision, measured finite on a GPU
    at phi-2 size (BENCHMARKS.md), and its reason says how to get fp32 compute instead."""
    from dpo.train.hardware import detect_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_ok)
    p = detect_precision()
    assert (p.bf16, p.fp16, p.dtype) == expected and not p.use_cpu
    assert p.as_defaults()["optim"] == "adamw_torch_fused"
    if not bf16_ok:
        assert "random weights" in p.reason and "--fp16 false --dtype float32" in p.reason


def test_lora_targets_match_the_real_phi2_architecture():
    """phi-2's published dimensions, built on the meta device: the YAML's targets cover all
    32 layers x 6 projections; the stale remote-code names match nothing."""
    from dpo.errors import UserError
    from dpo.offline.tiny import phi2_config
    from dpo.train.model_checks import check_lora_targets

    phi2 = phi2_config()
    _, _, model, _ = parse()
    matched = check_lora_targets(phi2, model.lora_target_modules)
    assert len(matched) == 32 * 6
    with pytest.raises(UserError, match="Wqkv"):
        check_lora_targets(phi2, ["Wqkv", "out_proj"])


def test_quant_storage_matches_model_dtype_only_when_sharded(monkeypatch):
    from types import SimpleNamespace

    from dpo.train.model_checks import match_quant_storage

    def args(**kw):
        return SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage=None, dtype="bfloat16", **kw)

    plain = SimpleNamespace(fsdp=[], deepspeed_plugin=None)
    zero3 = SimpleNamespace(fsdp=[], deepspeed_plugin=SimpleNamespace(zero_stage=3))
    zero2 = SimpleNamespace(fsdp=[], deepspeed_plugin=SimpleNamespace(zero_stage=2))
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert match_quant_storage(args(), plain) is None
    assert match_quant_storage(args(), zero2) is None
    model_args = args()
    assert match_quant_storage(model_args, zero3) == "bfloat16"
    assert model_args.bnb_4bit_quant_storage is None  # returned, not written into the arguments
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert match_quant_storage(args(), plain) == "bfloat16"


EXPECTED_TOPOLOGY = {
    "single_gpu.yaml": ("NO", 1, None),
    "multi_gpu.yaml": ("MULTI_GPU", 2, None),
    "multi_cpu.yaml": ("MULTI_GPU", 2, None),  # torchrun's launcher; gloo on CPU (see the file)
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2, 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 2, 3),
    "fsdp.yaml": ("FSDP", 2, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TOPOLOGY))
def test_accelerate_config_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_configs" / name
    config = load_config_from_file(str(path))  # raises on unknown keys
    kind, processes, zero_stage = EXPECTED_TOPOLOGY[name]
    assert config.distributed_type.value == kind
    assert config.num_processes == processes
    assert str(config.mixed_precision) in ("no", "PrecisionType.NO")  # precision comes from the recipe
    if zero_stage:
        assert config.deepspeed_config["zero_stage"] == zero_stage
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    assert f"--config_file accelerate_configs/{name}" in path.read_text()


def test_every_accelerate_config_is_tested():
    assert sorted(p.name for p in (ROOT / "accelerate_configs").glob("*.yaml")) == sorted(EXPECTED_TOPOLOGY)


def test_the_distributed_page_shows_the_single_gpu_launch():
    page = (ROOT / "docs" / "distributed.md").read_text()
    assert "accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/dpo_phi2.py" in page


def test_all_linear_targets_every_linear_layer_but_the_output_head():
    """As PEFT's all-linear: 2 layers x 6 projections, and not lm_head."""
    from dpo.offline.tiny import build_tokenizer, tiny_phi_config
    from dpo.train.model_checks import check_lora_targets

    matched = check_lora_targets(tiny_phi_config(len(build_tokenizer())), "all-linear")
    assert len(matched) == 12 and "lm_head" not in matched


def test_lora_config_returns_a_list_of_targets_and_leaves_model_args_alone():
    from dpo.compat import lora_config

    model_args = ModelConfig(model_name_or_path="x", use_peft=True, lora_target_modules=["q_proj"])
    assert model_args.lora_target_modules == "q_proj"  # TRL turns a one-item list into a bare string (a regex to PEFT)
    assert set(lora_config(model_args).target_modules) == {"q_proj"}
    assert model_args.lora_target_modules == "q_proj"


def tiny_gpt2(vocab_size: int):
    """A 2-layer GPT-2 built locally (no download): its attention and MLP layers are transformers' Conv1D."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)


def test_gpt2_conv1d_layers_are_linear_layers_for_lora(tmp_path):
    """GPT-2's c_attn / c_proj / c_fc are Conv1D, which PEFT's LoRA wraps: "all-linear" matches exactly the
    layers PEFT itself wraps (was 0 layers), `c_attn` is accepted (was refused), the trainable-parameter
    estimate equals PEFT's count, and a GPT-2 adapter PEFT saved fits its base (was "no such linear layer")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpo.offline.tiny import build_tokenizer
    from dpo.train.adapters import check_adapter_fits
    from dpo.train.model_checks import check_lora_targets, trainable_parameter_count

    config = tiny_gpt2(len(build_tokenizer()))
    torch.manual_seed(0)
    for targets in ("all-linear", ["c_attn"]):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=targets, fan_in_fan_out=True)
        )  # Conv1D stores W transposed
        wrapped = sorted(
            n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
        )
        matched = check_lora_targets(config, targets)
        assert sorted(matched) == wrapped and wrapped, (targets, matched)
        model_args = ModelConfig(model_name_or_path="x", use_peft=True, lora_r=4, lora_target_modules=targets)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable_parameter_count(config, model_args, matched) == trainable
    assert len(check_lora_targets(config, "all-linear")) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    check_adapter_fits(str(tmp_path / "adapter"), adapter_config, config, "tiny-gpt2")
