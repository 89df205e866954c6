"""Everything that depends on the TRL version, in one place. Tested against TRL 1.16.0.

When TRL changes, this is the file to read and fix: the names recipes import, the loss
types and metrics TRL knows, the options it removed, and the internals we rely on (the
reference forward, the bf16 cast of LoRA weights under quantization, and transformers'
private checkpoint writer).

YAML keys: transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old
name warns); TRL 1.16 still reads `args.gradient_checkpointing`, which transformers keeps in
step with the new one, so the recipes' YAMLs use the new name.

One more place mirrors TRL on purpose: dpo/data/doctor.py counts tokens the way DPOTrainer tokenizes (EOS added
to text completions, chat templates for messages), and tests/data/test_doctor.py checks it against DPOTrainer's
own dataset preparation, so a TRL upgrade that changes tokenization fails that test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from pathlib import Path

import torch
import trl
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import (
    DPOConfig,
    DPOTrainer,
    ModelConfig,
    SFTConfig,
    SFTTrainer,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import _ChunkedLogProbFunction as FusedLMHeadFunction  # its autograd Function
from trl.trainer.utils import create_model_from_path, use_adapter

from dpo.scratch.loss_settings import LOSS_TYPES as _ALL_LOSS_TYPES
from dpo.scratch.loss_settings import NOT_IN_TRL as _NOT_IN_TRL

__all__ = [
    "DataCollatorForPreference",
    "DPOConfig",
    "DPOTrainer",
    "ModelConfig",
    "SFTConfig",
    "SFTTrainer",
    "TrlParser",
    "get_quantization_config",
    "quantization_config",
    "create_model_from_path",
    "REFERENCE_ADAPTER",
    "use_adapter",
    "TESTED_TRL",
    "INSTALLED_TRL",
    "TRL_DEFAULT_MAX_LENGTH",
    "TRL_DEFAULT_TRUNCATION_MODE",
    "LOSS_TYPES",
    "REWARD_METRICS",
    "REMOVED_OPTIONS",
    "lora_config",
    "precomputed_reference_logps",
    "continue_token_count",
    "metrics_kept",
    "load_final_checkpoint",
    "route_checkpoint_writes",
    "reference_model",
    "use_reference_columns",
    "use_samplers",
    "lean_cpu_lm_head",
    "FUSED_PER_TOKEN_FIELDS",
    "FusedLMHeadFunction",
    "fused_lm_head_model",
    "upcast_trainable_params",
    "keep_trainable_weights_fp32",
    "fp16_loss_scale",
    "RecipeDPOTrainer",
]

TESTED_TRL = "1.16.0"
INSTALLED_TRL = trl.__version__  # what benchmarks report
if trl.__version__ != TESTED_TRL:
    warnings.warn(
        f"dpo-recipes is tested with trl=={TESTED_TRL}; you have {trl.__version__}. See dpo/compat.py.", stacklevel=2
    )

# DPOConfig's defaults, read from TRL: the data doctor checks lengths the way a recipe that leaves
# max_length / truncation_mode unset will train.
_DPO_FIELDS = {f.name: f for f in dataclasses.fields(DPOConfig)}
TRL_DEFAULT_MAX_LENGTH: int | None = _DPO_FIELDS["max_length"].default
TRL_DEFAULT_TRUNCATION_MODE: str = _DPO_FIELDS["truncation_mode"].default

# DPOConfig.loss_type accepts a list of these (combined with DPOConfig.loss_weights): the from-scratch
# loss types less the ones TRL dropped (tests/test_library.py checks them against TRL's own list).
LOSS_TYPES = tuple(name for name in _ALL_LOSS_TYPES if name not in _NOT_IN_TRL)

# What DPOTrainer logs every `logging_steps` (eval_ prefixed during evaluation).
REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# Options that older DPO recipes use and TRL removed in 0.29; each with what to do instead.
REMOVED_OPTIONS = {
    "rpo_alpha": "use loss_type: [sigmoid, sft] with loss_weights: [1.0, <rpo_alpha>]",
    "ref_adapter_name": "leave it out: with LoRA the reference is the base model with adapters disabled",
    "model_adapter_name": "leave it out: the trainer trains the 'default' adapter",
    "force_use_ref_model": "leave it out: with LoRA no reference model is loaded",
    "reference_free": "not in TRL; dpo.scratch.loss.dpo_loss(reference_free=True) has it",
    "max_prompt_length": "use max_length (with truncation_mode) instead",
    "max_completion_length": "use max_length (with truncation_mode) instead",
    "generate_during_eval": "not in TRL any more; generate after training instead",
}


# DPO from an SFT adapter: given a PeftModel that already carries adapter "default" (and no
# peft_config, no ref_model), TRL 1.16 adds an adapter "ref" with the same LoraConfig, copies
# "default"'s weights into it, leaves it frozen (PEFT trains only the active adapter) and runs
# the reference forward with "ref" active (trl.trainer.utils.use_adapter). Trainer.save_model
# then writes "default" to output_dir and "ref" to output_dir/ref. `use_adapter(model, name)` is
# TRL's switch (name None: adapters disabled). `create_model_from_path` is
# how TRL loads a model given by name (dtype strings, device_map), reused so that both start
# points load the base the same way.
REFERENCE_ADAPTER = "ref"


def lora_config(model_args):
    """TRL's get_peft_config, with LoRA targets always given to PEFT as a list of names.

    TRL's ModelConfig turns a one-item list (`--lora_target_modules q_proj`) into the bare
    string "q_proj", and PEFT reads a bare string as a regex that must match a module's whole
    dotted name: it matches nothing and fails after the weights have loaded. A list means
    "modules named this", the rule dpo.train.model_checks.check_lora_targets applies up front.
    `model_args` is left as it is.
    """
    targets = model_args.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear":
        model_args = copy.copy(model_args)  # a shallow copy: no __post_init__ to turn the list back
        model_args.lora_target_modules = [targets]
    return get_peft_config(model_args)


def quantization_config(model_args, quant_storage: str | None = None):
    """TRL's get_quantization_config (None unless load_in_4bit / load_in_8bit), with the 4-bit
    storage dtype `quant_storage` when given (dpo.train.model_checks.match_quant_storage); `model_args` is left as it is."""
    if quant_storage:
        model_args = copy.copy(model_args)
        model_args.bnb_4bit_quant_storage = quant_storage
    return get_quantization_config(model_args)


def precomputed_reference_logps(trainer: DPOTrainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs (chosen, rejected) of one collated batch as TRL computes them for
    `precompute_ref_log_probs=True`: no grad, checkpointing off, LD-DPO's ld_alpha applied, through
    `reference_model` (with LoRA: inside `model.disable_adapter()`).

    During ordinary training TRL computes the reference inline in `_compute_loss`, with the
    same adapter switch; tests check that path through the logged rewards.
    """
    return trainer.compute_ref_log_probs(reference_model(trainer), batch)


def reference_model(trainer: DPOTrainer) -> torch.nn.Module:
    """The module whose forward gives pi_ref: TRL's separate `ref_model` (full fine-tuning), else the
    PEFT model itself, whose adapters `compute_ref_log_probs` disables (or switches to "ref")."""
    return trainer.ref_model or trainer.model


def use_reference_columns(trainer: DPOTrainer, train_dataset, eval_dataset, collator=None, prepare=None) -> None:
    """Hand the trainer datasets that carry `ref_chosen_logps` / `ref_rejected_logps` and make its loss
    read them (TRL's `precompute_ref_log_probs` path, switched on after __init__ so TRL does not
    precompute them itself). The signature columns already include both, so the Trainer keeps them.
    `collator` replaces the trainer's; `prepare(batch) -> batch` runs on each batch before its loss."""
    trainer.train_dataset = train_dataset
    trainer.eval_dataset = eval_dataset
    trainer.precompute_ref_logps = True
    trainer.data_collator = collator or trainer.data_collator
    if prepare is not None and not isinstance(trainer, RecipeDPOTrainer):  # only ours calls it
        raise TypeError(f"prepare needs a RecipeDPOTrainer, not a {type(trainer).__name__}")
    trainer.prepare_loss_inputs = prepare or RecipeDPOTrainer.prepare_loss_inputs


def use_samplers(trainer: DPOTrainer, train_sampler=None, eval_sampler=None) -> None:
    """Replace the Trainer's sampler hooks (transformers' private `_get_train_sampler` /
    `_get_eval_sampler`, called with the dataset a DataLoader is built for)."""
    if train_sampler is not None:
        trainer._get_train_sampler = lambda dataset=None: train_sampler(dataset or trainer.train_dataset)
    if eval_sampler is not None:
        trainer._get_eval_sampler = eval_sampler


CPU_VOCAB_TILE = 4096  # vocabulary columns per LM-head tile on CPU: 2k tokens x 4096 x 4 B = 32 MB per temporary


@contextlib.contextmanager
def lean_cpu_lm_head():
    """While active, TRL's fused LM head (trl.trainer.utils, `fused_lm_head=True`) is cheap on CPU;
    on exit TRL is as it was, so anything else in the process (a plain DPOTrainer, the agreement
    tests' reference runs) sees TRL's own code. Our trainer enters it around each step (CPU only).

    TRL 1.16 scores logits in tiles of up to 4096 tokens x `_CHUNKED_LOGPROB_CHUNK_SIZE` (32768)
    vocabulary columns, and off CUDA/XPU it scores every position, prompt and padding included
    (`compact` only where Triton runs; the comment there is about recompilation on Neuron). On CPU
    that is a 270 MB tile for 2k tokens, five or more tile-sized temporaries in the torch fallback,
    and LM-head work on positions whose log-prob is thrown away. Narrower tiles and scoring only the
    completion positions give the same per-token values (each row is independent) with a fraction of
    the memory and time. Only the `compact` decision in trl.trainer.utils changes; the kernels' own
    Triton switch is untouched.
    """
    import trl.trainer.utils as trl_utils

    saved = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    triton_device = saved[0]
    trl_utils._use_triton = lambda device: triton_device(device) or device.type == "cpu"
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCAB_TILE
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = saved


# Fields of TRL 1.16's FusedCausalLMOutput (trl.trainer.utils) that hold one value per next-token position:
# dpo/train/speed/packing.py puts each back in the padded layout after a packed forward.
FUSED_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def fused_lm_head_model(trainer: DPOTrainer) -> torch.nn.Module | None:
    """The model whose instance `forward` TRL 1.16 replaced with its fused LM head (`add_fused_lm_head`
    in DPOTrainer.__init__: the PEFT model's base model, else the model); None if TRL did not."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if "forward" in vars(base) else None


def upcast_trainable_params(trainer: DPOTrainer, dtype: torch.dtype) -> int:
    """Undo TRL's bf16 cast of trainable LoRA weights when the run computes in fp32.

    TRL 1.16 casts trainable parameters of a quantized model to bf16 (the QLoRA paper's
    choice). Under fp32 compute (CPU; a GPU with --dtype float32) that mixes dtypes and rounds small updates
    away, so we put them back in the compute dtype. Returns how many tensors were cast.
    The optimizer is created later, in `train()`, so it sees the new tensors.
    Starting from an SFT adapter, TRL's frozen "ref" copy was taken before the cast, so the
    trainable "default" weights are restored from it: the policy starts exactly at the SFT
    adapter, not at its bf16 rounding.
    """
    n = 0
    params = dict(trainer.model.named_parameters())
    for name, param in params.items():
        if param.requires_grad and param.dtype != dtype:
            exact = params.get(name.replace(".default.", f".{REFERENCE_ADAPTER}."), param)
            param.data = exact.data.to(dtype, copy=True)  # a copy: never share storage with "ref"
            n += 1
    return n


def keep_trainable_weights_fp32(trainer, model_dtype: str | None, fp16: bool) -> tuple[int, str | None]:
    """Put trainable (LoRA) weights back in float32 after TRL's bf16 cast where bf16 ones are wrong:
    fp32 compute (dtype float32: CPU, or chosen on a GPU), and fp16 mixed precision (a T4's default) whatever the model
    dtype, because the fp16 GradScaler unscales fp32 gradients only (bf16 ones fail with
    `_amp_foreach_non_finite_check_and_unscale_cuda not implemented for 'BFloat16'`, TRL#4901; fp16
    ones with "Attempting to unscale FP16 gradients") and fp16 master weights would round updates away.
    Under bf16 mixed precision TRL's bf16 (the QLoRA paper's choice) stays.
    Returns (tensors cast, why) for the caller's log line; (0, None) when nothing needed it."""
    why = "fp16 mixed precision: the gradient scaler needs fp32 gradients" if fp16 else None
    why = why or ("to match fp32 compute" if model_dtype == "float32" else None)
    return (upcast_trainable_params(trainer, torch.float32), why) if why else (0, None)


def fp16_loss_scale(trainer) -> float | None:
    """The fp16 gradient scaler's current loss scale (accelerate's `Accelerator.scaler`, a
    torch.amp.GradScaler); None when the run has none (no fp16, or fp16 on CPU, where accelerate
    makes no scaler)."""
    scaler = getattr(trainer.accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None


def route_checkpoint_writes(trainer: DPOTrainer, save) -> None:
    """Send every checkpoint save (save_steps, epoch ends, a stop on a signal) through
    `save(write, folder)`, where `write()` runs transformers' private `Trainer._save_checkpoint`
    with its own rotation off (rotation must wait until the new checkpoint is known complete)."""
    original = trainer._save_checkpoint

    def save_checkpoint(model, trial):
        folder = Path(trainer._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"

        def write():
            limit = trainer.args.save_total_limit
            trainer.args.save_total_limit = None
            try:
                original(model, trial)
            finally:
                trainer.args.save_total_limit = limit

        save(write, folder)

    trainer._save_checkpoint = save_checkpoint


def continue_token_count(trainer: DPOTrainer) -> None:
    """After a resume, TRL's `num_tokens` metric restarts at 0: carry on from the last logged count
    (TRL keeps the running total in the private `_total_train_tokens`)."""
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    if logged:
        trainer._total_train_tokens = int(logged[-1])


@contextlib.contextmanager
def metrics_kept(trainer: DPOTrainer):
    """Steps run inside (the memory probe) leave no trace in TRL's private `_metrics` and `_total_train_tokens`."""
    saved = copy.deepcopy(trainer._metrics), trainer._total_train_tokens
    try:
        yield
    finally:
        trainer._metrics, trainer._total_train_tokens = saved


def load_final_checkpoint(trainer: DPOTrainer, folder: str) -> bool:
    """A checkpoint saved at the run's last step: load its weights and state without training.
    transformers' `train(resume_from_checkpoint=...)` would run one optimizer step too many
    (its loop tests max_steps only after a step). Returns False for any other checkpoint."""
    state = TrainerState.load_from_json(str(Path(folder) / TRAINER_STATE_NAME))
    args = trainer.args
    if args.max_steps > 0:  # this run's length, which --resume_with_different_settings may have changed
        last = args.max_steps
    else:  # epoch-based: the checkpoint's count holds only if the epochs are the same
        last = state.max_steps if state.num_train_epochs == args.num_train_epochs else None
    if not last or state.global_step < last:
        return False
    trainer._load_from_checkpoint(folder)  # private: the adapter (or full) weights into the model
    trainer.state = state
    return True


class RecipeDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer as every recipe builds it (beside RecipeDPOConfig), with four changes:

    1. Held-out metrics count each pair once under N processes. To give every process a full last
       batch, accelerate pads the last evaluation batch with pairs from the start of the set;
       `gather_for_metrics` drops that padding again. TRL 1.16 gathers entropy, logits and token
       accuracy with `gather_for_metrics`, but rewards/* and logps/* with a plain `gather`, so under N
       processes those counted some held-out pairs twice. During evaluation (and only then) this
       routes `gather` through the same truncation. One process: no change.
    2. A lean LM head on CPU in training steps (`lean_cpu_lm_head`): completion tokens only, in
       narrow tiles; the same log-probs and gradients as TRL's CPU path, far less memory.
    3. The same lean head when it scores the reference (`compute_ref_log_probs`: TRL's
       precompute_ref_log_probs and dpo/train/speed/refcache.py) and in evaluation steps.
    4. Each batch passes `prepare_loss_inputs` before its loss (`use_reference_columns`; dpo/train/speed/reflazy.py).
    """

    prepare_loss_inputs = staticmethod(lambda batch: batch)

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, self.prepare_loss_inputs(inputs), *args, **kwargs)

    def _lm_head(self):
        """dpo.compat.lean_cpu_lm_head on CPU (forward and backward of a step), nothing elsewhere."""
        return lean_cpu_lm_head() if self.args.device.type == "cpu" else contextlib.nullcontext()

    def training_step(self, *args, **kwargs):
        with self._lm_head():
            return super().training_step(*args, **kwargs)

    def compute_ref_log_probs(self, *args, **kwargs):  # precompute_ref_log_probs and dpo/train/speed/refcache.py
        with self._lm_head():
            return super().compute_ref_log_probs(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with self._lm_head():
            return self._prediction_step_each_pair_once(*args, **kwargs)

    def _prediction_step_each_pair_once(self, *args, **kwargs):
        accelerator = self.accelerator
        gather_all = accelerator.gather  # the bound method, before we shadow it on the instance

        def gather_each_pair_once(tensor):
            data = gather_all(tensor)
            state = accelerator.gradient_state
            # per-pair tensors only (a 0-dim total is one value per process); gather_for_metrics,
            # which calls this, cuts again to the same length: a no-op
            if tensor.dim() > 0 and state.end_of_dataloader and state.remainder > 0:
                return data[: state.remainder]  # the real pairs come first; the padding follows
            return data

        accelerator.gather = gather_each_pair_once
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            del accelerator.gather  # back to the class's method
