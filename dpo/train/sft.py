"""Build a LoRA/QLoRA SFTTrainer: the supervised step before DPO (recipes/sft_phi2.py).

The DPO paper fine-tunes on the preferred answers first and takes that model as pi_ref. Here the
SFT model is the 4-bit base plus an SFT adapter; DPO then starts from it (dpo/train/adapters.py). The
rows are the preference pairs' prompts and chosen answers, in the same format DPO will see, and
the loss covers the answer tokens only (TRL's completion_only_loss on prompt/completion rows).
"""

from __future__ import annotations

import copy

from dpo.compat import SFTTrainer, keep_trainable_weights_fp32, lora_config, quantization_config
from dpo.errors import release_held_warnings
from dpo.log import log
from dpo.train.config import eval_strategy_for
from dpo.train.model_checks import match_quant_storage, model_init_kwargs
from dpo.train.speed.estimate import RunEstimate
from dpo.train.speed.kernels import use_portable_4bit_kernels
from dpo.train.trainer import log_owned_weights, protect_run, start_run


def sft_rows(pairs):
    """Preference pairs (prompt, chosen, rejected, ...) -> SFT rows (prompt, completion = chosen)."""
    return pairs.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")


def build_sft_trainer(model_args, training_args, train_dataset, eval_dataset, tokenizer, callbacks=None) -> SFTTrainer:
    """An SFTTrainer that loads `model_args.model_name_or_path` itself (4-bit if asked) and adds LoRA,
    exactly as dpo.train.trainer.build_dpo_trainer does for DPO, so the adapter fits the DPO run's base,
    with the same run safety (dpo.train.trainer.start_run / protect_run)."""
    run, took_lock = start_run(model_args, training_args, train_dataset)
    storage = match_quant_storage(model_args, training_args)
    if storage:
        log(f"FSDP/ZeRO-3 with a 4-bit base: storing 4-bit weights as {storage} so they shard with the rest")
    trainer_args = copy.copy(training_args)  # the caller's arguments stay as they are
    trainer_args.eval_strategy = eval_strategy_for(training_args, eval_dataset)
    trainer_args.model_init_kwargs = {
        **model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    release_held_warnings()  # weights load next: warnings held while the run was checked now show (dpo/errors.py)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=trainer_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        quantization_config=quantization_config(model_args, storage),
        peft_config=lora_config(model_args),
    )
    use_portable_4bit_kernels(trainer.model)  # one 4-bit kernel on every CPU (dpo/train/speed/kernels.py)
    log_owned_weights(trainer.model)
    n, why = keep_trainable_weights_fp32(trainer, model_args.dtype, training_args.fp16)
    if n:
        log(f"kept {n} trainable LoRA tensors in float32 ({why})")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    loss_on = "answer tokens only" if training_args.completion_only_loss is not False else "every token"
    log(f"SFT: {trainable:,} trainable LoRA parameters; loss on {loss_on}")
    protect_run(trainer, run, took_lock)
    trainer.add_callback(RunEstimate())  # what the run will cost, after its first micro-batch
    return trainer
