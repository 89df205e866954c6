"""Build, run and save a LoRA/QLoRA DPOTrainer. Shared by every recipe.

The reference model rule: we never pass `ref_model`. With a `peft_config`, TRL computes the
reference log-probs with the adapters disabled, so the frozen (4-bit) base *is* pi_ref and one
copy of the weights is in memory. Starting from an SFT adapter (dpo/train/adapters.py), the policy
is that adapter, trainable, and TRL's frozen copy of it ("ref") makes the reference base + SFT.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

from dpo.compat import (
    DPOTrainer,
    RecipeDPOTrainer,
    keep_trainable_weights_fp32,
    load_final_checkpoint,
    lora_config,
    quantization_config,
    route_checkpoint_writes,
)
from dpo.errors import RunStopped, release_held_warnings
from dpo.files import json_text
from dpo.gate.credentials import check_no_secrets
from dpo.gate.output_dir import check_output_dir_apart
from dpo.gate.plan import check_plan
from dpo.log import log
from dpo.plots import plot_training_curves
from dpo.signals import saving
from dpo.train.adapters import policy_from_sft_adapter
from dpo.train.config import eval_strategy_for, write_resolved_config
from dpo.train.distributed import on_main_process, topology
from dpo.train.model_checks import match_quant_storage, model_init_kwargs
from dpo.train.safety import lock
from dpo.train.safety.checkpoints import CheckpointSaver, newest_complete_checkpoint, resumed_step
from dpo.train.safety.guards import HealthCheck, NonFiniteGuard, NonFiniteTraining, nonfinite_advice
from dpo.train.safety.interrupts import StopOnSignal
from dpo.train.safety.runs import (
    ContinueCounters,
    finished_run,
    prepare_output_dir,
    run_settings,
    whole_run_metrics,
    write_final_outputs,
)
from dpo.train.speed.autobatch_probe import auto_batch, resolved_settings
from dpo.train.speed.estimate import RunEstimate
from dpo.train.speed.kernels import cpu_has_avx512bf16, portable_4bit_layers, use_portable_4bit_kernels
from dpo.train.speed.memory import own_file_mapped_weights
from dpo.train.speed.packing import check_packing, install_packing
from dpo.train.speed.refcache import attach_reference_cache, check_reference_cache
from dpo.train.speed.sampler import install_length_grouping

# How a stopped run continues, said in the stop message; a caller that continues its runs another way
# (the rounds recipe: the same command again) passes its own to train_and_save.
RESUME_ADVICE = "Resume with --resume_from_checkpoint last"


def build_dpo_trainer(
    model_args,
    training_args,
    train_dataset,
    eval_dataset,
    tokenizer,
    callbacks=None,
    sft_adapter=None,
    reference=None,
) -> DPOTrainer:
    """A DPOTrainer that loads `model_args.model_name_or_path` itself (4-bit if asked) and adds LoRA,
    or, given `sft_adapter` (checked by dpo.train.adapters.start_point), puts that adapter on it to train.
    `reference(trainer) -> words`, where given, makes the reference another model than the one the policy
    starts from (the rounds' `reference: initial`) before the log names it: the log names one reference.

    The arguments are not changed: the trainer gets a copy of `training_args` whose
    model_init_kwargs add ours (revision, dtype, safetensors only) under the user's own.
    """
    run, took_lock = start_run(model_args, training_args, train_dataset, sft_adapter)
    storage = match_quant_storage(model_args, training_args)
    if storage:
        log(f"FSDP/ZeRO-3 with a 4-bit base: storing 4-bit weights as {storage} so they shard with the rest")
    use_cache = getattr(training_args, "reference_cache", False)  # dpo.train.config.RecipeDPOConfig's switch
    if use_cache:
        check_reference_cache(training_args)
    check_packing(training_args)
    trainer_args = copy.copy(training_args)
    trainer_args.eval_strategy = eval_strategy_for(training_args, eval_dataset)
    trainer_args.model_init_kwargs = {
        **model_init_kwargs(model_args, training_args),
        **(training_args.model_init_kwargs or {}),
    }
    model, quantization, peft_config = model_args.model_name_or_path, quantization_config(model_args, storage), None
    release_held_warnings()  # weights load next: warnings held while the run was checked now show (dpo/errors.py)
    if sft_adapter:
        model = policy_from_sft_adapter(model, trainer_args, quantization, sft_adapter)
        quantization, trainer_args.model_init_kwargs = None, None  # the base is loaded: TRL would warn
    else:
        peft_config = lora_config(model_args)
    with portable_4bit_layers():  # TRL's precompute_ref_log_probs runs the model inside __init__
        trainer = RecipeDPOTrainer(
            model=model,
            ref_model=None,  # the base with adapters disabled (or TRL's frozen "ref" copy of the SFT adapter)
            args=trainer_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            quantization_config=quantization,
            peft_config=peft_config,
        )
    n_4bit = use_portable_4bit_kernels(trainer.model)  # also an SFT-adapter model loaded before (a no-op check)
    if n_4bit and cpu_has_avx512bf16():
        log(f"CPU has AVX512-BF16: {n_4bit} 4-bit layers kept on the portable kernel (dpo/train/speed/kernels.py)")
    log_owned_weights(trainer.model)
    if getattr(training_args, "packing", False):  # after the kernel switch: its probe runs the model
        log(install_packing(trainer))
    n, why = keep_trainable_weights_fp32(trainer, model_args.dtype, training_args.fp16)
    if n:
        log(f"kept {n} trainable LoRA tensors in float32 ({why})")
    if getattr(trainer_args, "auto_batch_base", None) is not None:  # per_device_train_batch_size: auto
        # after the dtype of the LoRA weights is settled, before the sampler is cut to the micro-batch
        trainer.auto_batch, line = auto_batch(trainer)
        log(line)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if reference is not None:
        reference = reference(trainer)
    else:
        reference = describe_reference(trainer, model_args.model_name_or_path, sft_adapter)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); reference = {reference}")
    protect_run(trainer, run, took_lock)
    trainer.add_callback(HealthCheck())  # DPO-specific warnings: loss stuck at ln 2, likelihood displacement
    trainer.add_callback(RunEstimate())  # what the run will cost, after its first micro-batch
    if trainer.args.device.type == "cpu":
        log("CPU: TRL's fused LM head scores completion tokens only, in narrow tiles (dpo.compat.lean_cpu_lm_head)")
    if training_args.train_sampling_strategy == "group_by_length":
        log(install_length_grouping(trainer))
    if use_cache:
        cache = attach_reference_cache(trainer, training_args.reference_cache_dir)
        trainer.add_callback(cache.callback())  # parity each epoch; pairs filled in a step written at its end
    return trainer


def describe_reference(trainer, model_name: str, sft_adapter: str | None = None) -> str:
    """Where pi_ref comes from in this trainer, for the log: the base with the LoRA adapter disabled, the base
    + the frozen SFT adapter, or, in a full fine-tune (use_peft false: no adapter to disable), TRL's own second
    copy of the starting model, or its log-probs computed once before training (precompute_ref_log_probs)."""
    from peft import PeftModel

    if sft_adapter:
        return f"base + frozen SFT adapter ({sft_adapter})"
    if isinstance(trainer.model, PeftModel):
        return "base with adapters disabled"
    if trainer.ref_model is not None:
        return f"a frozen second copy of {model_name} (full fine-tune: no adapters)"
    return f"{model_name}'s log-probs, computed once before training (full fine-tune: no adapters)"


def log_owned_weights(model) -> None:
    """Unmap the checkpoint file the CPU weights still view (dpo/train/speed/memory.py), saying so."""
    n, size = own_file_mapped_weights(model)
    if n:
        log(f"copied {n} weights ({size / 2**20:.0f} MB) out of the checkpoint's memory map, which is released")


def start_run(model_args, training_args, train_dataset, sft_adapter=None) -> tuple[dict, bool]:
    """Before any weights load: refuse secrets in the settings, an output_dir in the model or adapter
    folder, an output_dir another run holds, and mixing two runs in one output_dir. Returns the run's
    settings fingerprint (dpo/train/safety/runs.py) and whether the output_dir lock was taken here (not by the
    recipe around it), both for `protect_run`."""
    check_no_secrets(model_args, training_args)  # also for notebooks and scripts that skip load_recipe_args
    plan, warning = check_plan(len(train_dataset), training_args, topology(training_args).world_size)
    log(f"plan: {len(train_dataset)} training pairs -> {plan.describe()}")
    if warning:
        log(f"warning: {warning}")
    check_output_dir_apart(training_args.output_dir, model_args.model_name_or_path, sft_adapter)
    run = run_settings(training_args, model_args, train_dataset, sft_adapter)
    took_lock = on_main_process(lock.take, training_args.output_dir)
    try:
        prepare_output_dir(training_args, run, sft_adapter)
    except BaseException:
        if took_lock:
            lock.release(training_args.output_dir)
        raise
    return run, took_lock


def protect_run(trainer, run: dict, took_lock: bool) -> None:
    """What `train_and_save` relies on, for a DPO or an SFT trainer: checkpoints marked complete,
    Ctrl-C/SIGTERM saving one, a stop on a non-finite loss or gradient, counters that continue on resume,
    and the output_dir lock released at its end if `start_run` took it."""
    trainer.run_settings, trainer.stop_on_signal, trainer.took_output_lock = run, StopOnSignal(), took_lock
    route_checkpoint_writes(trainer, CheckpointSaver(trainer, run, trainer.stop_on_signal.held))
    for callback in (trainer.stop_on_signal, NonFiniteGuard(trainer), ContinueCounters(trainer)):
        trainer.add_callback(callback)


def train_and_save(
    trainer: DPOTrainer,
    arg_objects,
    resume_from_checkpoint=None,
    heldout=None,
    resume_advice: str = RESUME_ADVICE,
    next_step: str = "",
) -> dict:
    """Train, evaluate on the held-out split, and write everything a user needs to `output_dir`.

    output_dir/
      adapter_model.safetensors, adapter_config.json   the LoRA adapter
      tokenizer files                                  so the folder loads on its own
      resolved_config.yaml                             every setting of the run; a valid --config
      final_metrics.json                               train metrics + held-out eval metrics
      trainer_state.json, training_curves.png          the logged history and its plot
      run_complete.json                                written last: the files above are one whole run
      heldout_pairs.jsonl                              `heldout` (HELDOUT_COLUMNS), for dpo.evaluation.evaluate

    Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved (`--resume_from_checkpoint last`),
    exit status 128 + signal (the stop line ends with `resume_advice`). One during the final save: the save is
    finished, then the run stops, 128 + signal, the stop line saying the run is complete and what the caller
    would have done next (`next_step`: the rounds' next round). A non-finite loss/gradient stops before that
    step, exit status 3.
    """
    try:
        return _train_and_save(trainer, arg_objects, resume_from_checkpoint, heldout, resume_advice, next_step)
    finally:
        if getattr(trainer, "took_output_lock", False):  # built outside a recipe: the run ends here
            lock.release(trainer.args.output_dir)


def _train_and_save(trainer, arg_objects, resume_from_checkpoint, heldout, resume_advice, next_step) -> dict:
    output_dir, stopper = Path(trainer.args.output_dir), trainer.stop_on_signal
    resumed_at = resumed_step(resume_from_checkpoint) if resume_from_checkpoint else 0  # rotation may delete it
    with stopper.installed():
        try:
            if resume_from_checkpoint and load_final_checkpoint(trainer, resume_from_checkpoint):
                log(f"{resume_from_checkpoint} is the run's last step: writing the final files only")
                train_metrics = {}
            else:
                train_metrics = trainer.train(resume_from_checkpoint=resume_from_checkpoint).metrics
        except NonFiniteTraining as err:
            raise RunStopped(nonfinite_advice(err, trainer.args, newest_complete_checkpoint(output_dir)), 3) from None
        except KeyboardInterrupt:
            last = newest_complete_checkpoint(output_dir)
            raise RunStopped(
                f"interrupted twice: stopped without saving; newest complete checkpoint: {last}", 130
            ) from None
        if stopper.signum is not None:
            raise RunStopped(
                f"{signal.Signals(stopper.signum).name} at step {trainer.state.global_step}: checkpoint saved in "
                f"{newest_complete_checkpoint(output_dir)}. {resume_advice}",
                128 + stopper.signum,
            )
        metrics = whole_run_metrics(train_metrics, trainer.state.log_history, resumed_at, trainer.state.global_step)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())

        def write_into(folder: Path) -> None:
            trainer.save_model(str(folder))
            if trainer.accelerator.is_main_process:
                launched = "# How this run was launched (the launcher decides this, not the file):\n"
                resolved, auto_note = resolved_settings(trainer)  # per_device_train_batch_size: auto's numbers
                notes = launched + topology(trainer.args).as_comments() + auto_note
                write_resolved_config(folder / "resolved_config.yaml", *arg_objects, notes=notes, overrides=resolved)
                # metrics are observations: a NaN eval loss is written as null and named in the log
                (folder / "final_metrics.json").write_text(
                    json_text(metrics, output_dir / "final_metrics.json", observations=True, indent=2, sort_keys=True)
                )
                trainer.state.save_to_json(str(folder / "trainer_state.json"))
                plot_training_curves(trainer.state.log_history, folder / "training_curves.png")
                if heldout is not None:
                    write_heldout_pairs(heldout, folder / "heldout_pairs.jsonl")

        # a Ctrl-C now waits for the final files, then stops the run (and a caller's next step)
        complete = f"the run in {output_dir} is complete. {next_step}".rstrip()
        with saving(f"the final files of {output_dir}", advice=complete):
            write_final_outputs(trainer, trainer.run_settings, write_into)
    summary = ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if "rewards/" in k or k in ("train_loss", "eval_loss")
    )
    log(f"done: {summary}")
    log(f"{written_summary((finished_run(output_dir) or {}).get('files', []))} in {output_dir}")
    return metrics


# A held-out pair's fields as the data layer keeps them, for dpo.evaluation.evaluate to render as training did:
# messages keep their tool calls, and a tool-calling row its `tools` (TRL's column; dpo/data/tools.py TOOLS_COLUMN).
HELDOUT_COLUMNS = ("prompt", "chosen", "rejected", "tools")


def write_heldout_pairs(heldout, path: Path) -> None:
    """`heldout` (a Dataset of pairs) as JSON lines, each pair with every field of HELDOUT_COLUMNS it has."""
    heldout.select_columns([c for c in HELDOUT_COLUMNS if c in heldout.column_names]).to_json(path)


def written_summary(names: list[str]) -> str:
    """The final files that were written, in words ("adapter, tokenizer, ... and training_curves.png"):
    only what is there (no training_curves.png when nothing was logged to plot)."""
    parts = []
    if any(n.startswith("adapter_model") for n in names):
        parts.append("adapter")
    elif any(n.startswith("model") and n.endswith(".safetensors") for n in names):
        parts.append("model")
    if any(n.startswith(("tokenizer", "vocab", "merges", "special_tokens")) for n in names):
        parts.append("tokenizer")
    parts += [n for n in ("resolved_config.yaml", "final_metrics.json", "training_curves.png") if n in names]
    if len(parts) < 2:
        return "".join(parts) or "no final files"
    return f"{', '.join(parts[:-1])} and {parts[-1]}"
