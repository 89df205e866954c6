"""The device side of `per_device_train_batch_size: auto` (the model and the rule: dpo/train/speed/autobatch.py).

After the trainer is built (weights loaded, data tokenized) and before training, `auto_batch(trainer)` runs a short
probe on the GPU: one forward + backward of TRL's own loss on one pair and on two pairs, each at the run's longest
sequence, with and then without activation checkpointing, reading torch.cuda.max_memory_allocated around each. The
slope between one and two pairs is the per-pair (per-token) cost; the intercept what any step allocates. The probe
without checkpointing runs at a shorter length where the run's would not fit twice at a rough analytic cost
(autobatch.analytic_per_token); its coefficient is extrapolated linearly. Its steps leave no gradient, no optimizer
state and no logged metric behind (dpo.compat.metrics_kept).

On a CPU (or any device other than CUDA) nothing is probed: the configured micro-batch, accumulation and
checkpointing are kept, and the log says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo.compat import fused_lm_head_model, metrics_kept
from dpo.errors import UserError
from dpo.files import read_json_object
from dpo.train.speed import autobatch
from dpo.train.speed.sampler import sequence_lengths


class CudaMemory:
    """What the probe reads of the device's memory; tests pass an object with the same methods (a simulated
    allocator), so the measurement is checked on a CPU."""

    def empty(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def free(self) -> int:
        """Free device memory plus what this process's caching allocator holds (it can reuse that)."""
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved()


def peaks(run_step, sizes, memory) -> tuple[int, list[int]]:
    """(resident bytes before, [peak above resident for each size]): `run_step(k)` runs one forward + backward
    of k pairs and frees what it made; the allocator's peak is reset before each."""
    memory.empty()
    resident, found = memory.allocated(), []
    for k in sizes:
        memory.reset_peak()
        run_step(k)
        found.append(memory.peak() - resident)
        memory.empty()
    return resident, found


def probe_row(row: dict, tokens: int) -> dict:
    """A pair whose chosen and rejected sequences are both `tokens` long (a 1-token prompt, so every other token
    is a completion token the LM head scores: the costly case), made of the row's own token ids; other columns
    (TRL's precomputed reference log-probs) kept."""
    ids = list(row["prompt_ids"]) + list(row["chosen_ids"]) + list(row["rejected_ids"])
    ids = (ids * (tokens // max(1, len(ids)) + 1))[:tokens]
    return {**row, "prompt_ids": ids[:1], "chosen_ids": ids[1:], "rejected_ids": ids[1:][::-1]}


def set_checkpointing(trainer, on: bool) -> None:
    """Activation checkpointing of the trainer's model on or off, with the run's kwargs, as transformers' Trainer
    turns it on (its every_n_layers / offload keys go to the method, the rest to torch's checkpoint)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not on:
        base.activation_checkpointing_disable()
        return
    kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
    every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs or None, every_n_layers=every, offload=offload
    )
    if kwargs.get("use_reentrant", False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad (TRL does it)


def _step(trainer, row: dict):
    def run(k: int) -> None:
        inputs = trainer._prepare_inputs(trainer.data_collator([row] * k))
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        del loss, inputs

    return run


def measure(trainer, row: dict, tokens: int, budget: autobatch.Budget, memory) -> autobatch.Measured:
    """The probe (module docstring) with `row`'s token ids. Raises UserError where one pair with checkpointing
    runs out of memory."""
    config = trainer.accelerator.unwrap_model(trainer.model).config
    shape = (config.hidden_size, config.num_hidden_layers, config.vocab_size)
    fused = fused_lm_head_model(trainer) is not None
    model = trainer.model
    was_training = model.training
    model.train()
    try:
        with metrics_kept(trainer):
            set_checkpointing(trainer, True)
            guess_on = autobatch.analytic_per_token(*shape, True, fused)
            on_tokens = autobatch.probe_tokens_for(tokens, budget.plan - memory.allocated(), guess_on)
            try:
                resident, (one, two) = peaks(_step(trainer, probe_row(row, on_tokens)), (1, 2), memory)
            except torch.cuda.OutOfMemoryError:
                raise UserError(
                    f"per_device_train_batch_size auto: the memory probe ran out of GPU memory with 1-2 pairs of "
                    f"{on_tokens} tokens and activation checkpointing ({_gib(memory.free())} free); lower max_length, "
                    "or set per_device_train_batch_size to a number"
                ) from None
            step_fixed, per_token_on = autobatch.per_token_from_probe(one, two, on_tokens, guess_on)
            set_checkpointing(trainer, False)
            guess_off = autobatch.analytic_per_token(*shape, False, fused)
            off_tokens = autobatch.probe_tokens_for(tokens, budget.plan - resident, guess_off)
            try:
                _, (one, two) = peaks(_step(trainer, probe_row(row, off_tokens)), (1, 2), memory)
                per_token_off = autobatch.per_token_from_probe(one, two, off_tokens, guess_off)[1]
            except torch.cuda.OutOfMemoryError:  # the analytic guess was too low: checkpointing stays possible
                per_token_off = None
            trainer.model.zero_grad(set_to_none=True)  # what a step cut short by the error left (the error is gone)
            memory.empty()
    finally:
        set_checkpointing(trainer, bool(trainer.args.activation_checkpointing))
        model.train(was_training)
    return autobatch.Measured(resident, step_fixed, per_token_on, per_token_off)


def _gib(n: int) -> str:
    return f"{n / autobatch.GIB:.2f} GiB"


def agreed(measured: autobatch.Measured, budget: autobatch.Budget) -> tuple[autobatch.Measured, autobatch.Budget]:
    """Under several processes each reads its own device: every process plans for the largest cost any measured
    and the smallest budget any has, so all pick the same micro-batch (a mismatch would hang the collectives)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return measured, budget
    off = -1.0 if measured.per_token_off is None else measured.per_token_off
    where = {"device": torch.device("cuda", torch.cuda.current_device()), "dtype": torch.float64}  # bytes exact
    high = torch.tensor([measured.resident, measured.step_fixed, measured.per_token_on, off], **where)
    low = torch.tensor([budget.usable, budget.device_free, -1.0 if measured.per_token_off is None else 1.0], **where)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    r, s, on, off = high.tolist()
    usable, free, any_off = low.tolist()
    merged = autobatch.Measured(int(r), int(s), on, off if any_off > 0 else None)
    return merged, autobatch.Budget(int(usable), budget.capped, int(free))


def apply(trainer, decision: autobatch.Decision) -> None:
    """The decision into the trainer's own arguments (a copy of the recipe's, dpo/train/trainer.py) and model.
    transformers reads the micro-batch for its data loader from `_train_batch_size`, set in Trainer.__init__."""
    for name, value in decision.settings().items():
        setattr(trainer.args, name, value)
    trainer._train_batch_size = trainer.args.train_batch_size
    set_checkpointing(trainer, decision.checkpointing)


def auto_batch(trainer, memory=None) -> tuple[autobatch.Decision | None, str]:
    """For a trainer whose arguments say `per_device_train_batch_size: auto` (auto_batch_base set): on CUDA, probe,
    decide and apply; elsewhere keep the configured values. Returns (the decision or None, the line to log).
    `memory`: the device's memory as the probe reads it (CudaMemory); the tests pass a simulated allocator, which
    then stands for the device, so the whole choice runs on a CPU."""
    args = trainer.args
    configured = f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}"
    if memory is None and args.device.type != "cuda":
        ckpt = "on" if args.activation_checkpointing else "off"
        return None, (
            f"per_device_train_batch_size auto: no CUDA device ({args.device.type}): the configured micro-batch "
            f"{configured} pairs per step and activation checkpointing {ckpt} are kept"
        )
    memory = memory or CudaMemory()
    lengths = [max(c, r) for c, r in zip(*sequence_lengths(trainer.train_dataset, args.max_length))]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    budget = autobatch.budget_for(memory.free(), args.auto_batch_memory_gib)
    row = trainer.train_dataset[longest]
    measured, budget = agreed(measure(trainer, row, lengths[longest], budget, memory), budget)
    tokens = lengths[longest]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    decision = autobatch.decide(
        measured,
        budget,
        tokens,
        trainable,
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        bool(args.activation_checkpointing),
        resumed_micro_batch(args.resume_from_checkpoint),
    )
    apply(trainer, decision)
    return decision, decision.line()


def resumed_micro_batch(checkpoint) -> int | None:
    """The micro-batch per process of the checkpoint a run resumes from (its trainer_state.json's train_batch_size,
    transformers' per-device batch times the GPUs of one process: 1 under accelerate), or None."""
    if not checkpoint:
        return None
    fix = "resume from a complete checkpoint (--resume_from_checkpoint last)"
    state = read_json_object(Path(checkpoint) / "trainer_state.json", {}, fix)
    size = state.get("train_batch_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def resolved_settings(trainer) -> tuple[dict, str]:
    """What resolved_config.yaml records of an `auto` run: the numbers it trained with and the auto settings unset,
    so the file repeats the run on any machine, and a comment line saying they came from auto. ({}, "") otherwise."""
    if getattr(trainer.args, "auto_batch_base", None) is None:
        return {}, ""
    decision = getattr(trainer, "auto_batch", None)
    values = {**(decision.settings() if decision else {}), "auto_batch_base": None, "auto_batch_memory_gib": None}
    how = decision.line() if decision else "no CUDA device: the configured values were kept"
    return values, f"# per_device_train_batch_size was auto; the numbers below are what it resolved to: {how}\n"
