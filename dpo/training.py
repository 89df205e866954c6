"""Build, run and save a LoRA/QLoRA DPOTrainer. Shared by every recipe.

The reference model rule: we never pass `ref_model`. With a `peft_config`, TRL computes the
reference log-probs with the adapters disabled, so the frozen (4-bit) base *is* pi_ref and one
copy of the weights is in memory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from accelerate import PartialState

from dpo.compat import (
    DPOTrainer,
    lean_cpu_lm_head,
    lora_config,
    quantization_config,
    save_resumable_checkpoint,
    upcast_trainable_params,
)
from dpo.config import write_resolved_config
from dpo.kernels import cpu_has_avx512bf16, use_portable_4bit_kernels
from dpo.log import log
from dpo.model import match_quant_storage, model_init_kwargs
from dpo.plots import plot_training_curves
from dpo.refcache import attach_reference_cache, check_reference_cache
from dpo.sampler import install_length_grouping


def build_dpo_trainer(model_args, training_args, train_dataset, eval_dataset, tokenizer, callbacks=None) -> DPOTrainer:
    """A DPOTrainer that loads `model_args.model_name_or_path` itself (4-bit if asked) and adds LoRA.

    The arguments are not changed: the trainer gets a copy of `training_args` whose
    model_init_kwargs add ours (revision, dtype, safetensors only) under the user's own.
    """
    storage = match_quant_storage(model_args, training_args)
    if storage:
        log(f"FSDP/ZeRO-3 with a 4-bit base: storing 4-bit weights as {storage} so they shard with the rest")
    use_cache = getattr(training_args, "reference_cache", False)  # dpo.config.RecipeDPOConfig's switch
    if use_cache:
        check_reference_cache(training_args)
    trainer_args = copy.copy(training_args)
    trainer_args.model_init_kwargs = {
        **model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    trainer = DPOTrainer(
        model=model_args.model_name_or_path,
        ref_model=None,  # the base with adapters disabled is the reference
        args=trainer_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        quantization_config=quantization_config(model_args, storage),
        peft_config=lora_config(model_args),
    )
    n_4bit = use_portable_4bit_kernels(trainer.model)
    if n_4bit and cpu_has_avx512bf16():
        log(f"CPU has AVX512-BF16: {n_4bit} 4-bit layers kept on the portable kernel (dpo/kernels.py)")
    if model_args.dtype == "float32":
        n = upcast_trainable_params(trainer, torch.float32)
        if n:
            log(f"kept {n} trainable LoRA tensors in float32 to match fp32 compute")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); reference = base with adapters disabled"
    )
    if trainer.args.device.type == "cpu" and lean_cpu_lm_head():
        log("CPU: TRL's fused LM head scores completion tokens only, in narrow tiles (dpo.compat.lean_cpu_lm_head)")
    if training_args.train_sampling_strategy == "group_by_length":
        log(install_length_grouping(trainer))
    if use_cache:
        cache = attach_reference_cache(trainer, training_args.reference_cache_dir)
        trainer.add_callback(cache.parity_callback())
    return trainer


def train_and_save(trainer: DPOTrainer, arg_objects, resume_from_checkpoint=None) -> dict:
    """Train, evaluate on the held-out split, and write everything a user needs to `output_dir`.

    output_dir/
      adapter_model.safetensors, adapter_config.json   the LoRA adapter
      tokenizer files                                  so the folder loads on its own
      resolved_config.yaml                             every setting of the run; a valid --config
      final_metrics.json                               train metrics + held-out eval metrics
      trainer_state.json, training_curves.png          the logged history and its plot

    Ctrl-C saves a resumable checkpoint first (`--resume_from_checkpoint last`).
    """
    output_dir = Path(trainer.args.output_dir)
    if PartialState().is_main_process:
        write_resolved_config(output_dir / "resolved_config.yaml", *arg_objects)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except KeyboardInterrupt:
        save_resumable_checkpoint(trainer)
        log(
            f"interrupted at step {trainer.state.global_step}; checkpoint saved in {output_dir}. "
            "Resume with --resume_from_checkpoint last"
        )
        raise
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    summary = ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if "rewards/" in k or k in ("train_loss", "eval_loss")
    )
    log(f"done: {summary}")
    log(f"adapter, tokenizer, resolved_config.yaml, final_metrics.json and training_curves.png in {output_dir}")
    return metrics
