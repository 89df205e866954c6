"""Several processes: what a recipe logs, checks and shares when accelerate or torchrun starts N copies.

We write no distributed training code: accelerate (through the Trainer) does data parallel, FSDP
and DeepSpeed. This module only
  - describes the topology (world size, machines, sharding, effective batch) for the log and for
    resolved_config.yaml,
  - refuses the one launch that silently runs a single process (`accelerate launch --cpu
    --num_processes N`: accelerate's CPU launcher starts N processes only under mpirun),
  - runs a step once, on the main process, and hands its result to the others (the data doctor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast_object_list

from dpo.errors import UserError

CPU_LAUNCH_HELP = (
    "accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes N <recipe>.py, "
    "or torchrun --nproc_per_node N <recipe>.py"
)


@dataclass(frozen=True)
class Topology:
    world_size: int  # processes in the whole job
    num_machines: int
    backend: str | None  # gloo (CPU), nccl (CUDA), None (one process)
    sharding: str  # what is split across processes
    per_device_train_batch_size: int
    gradient_accumulation_steps: int

    @property
    def effective_train_batch_size(self) -> int:
        """Pairs per optimizer step: per device x accumulation x processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    def describe(self) -> str:
        machines = f" on {self.num_machines} machines" if self.num_machines > 1 else ""
        backend = f", {self.backend}" if self.backend else ""
        return (
            f"world size {self.world_size} process{'es' if self.world_size > 1 else ''}{machines} "
            f"({self.sharding}{backend}); effective batch {self.effective_train_batch_size} pairs = "
            f"{self.per_device_train_batch_size} per device x {self.gradient_accumulation_steps} accumulation "
            f"x {self.world_size} processes"
        )

    def as_comments(self) -> str:
        """Lines for resolved_config.yaml. Comments, not keys: they describe how the run was
        launched, which the launcher decides, so the file stays a valid --config anywhere."""
        return (
            f"# world_size: {self.world_size}\n"
            f"# num_machines: {self.num_machines}\n"
            f"# sharding: {self.sharding}\n"
            f"# effective_train_batch_size: {self.effective_train_batch_size}  "
            f"# = per_device_train_batch_size x gradient_accumulation_steps x world_size\n"
        )


def _sharding(world_size: int) -> str:
    """What the launcher asked accelerate to split, from the variables `accelerate launch` sets."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP{os.environ.get('FSDP_VERSION', '1')}: weights, gradients, optimizer state sharded"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        what = {"1": "optimizer state", "2": "optimizer state, gradients"}.get(
            stage, "weights, gradients, optimizer state"
        )
        return f"DeepSpeed ZeRO-{stage}: {what} sharded"
    return "data parallel: a full copy per process" if world_size > 1 else "single process"


def topology(training_args) -> Topology:
    state = PartialState()  # already set up by TrainingArguments (cpu=use_cpu), so this only reads it
    # torchrun (and accelerate's launcher, which is torchrun) says how many machines joined
    machines = int(os.environ.get("GROUP_WORLD_SIZE", 0)) or state.num_processes // int(
        os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)
    )
    return Topology(
        world_size=state.num_processes,
        num_machines=max(1, machines),
        backend=state.backend,
        sharding=_sharding(state.num_processes),
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
    )


def check_launch() -> None:
    """Refuse the launches that would silently run something other than what was asked:

    - `accelerate launch --cpu --num_processes N` (N > 1): accelerate sets the rendezvous variables,
      then starts one plain process, which would train alone and report one process's epochs;
    - FSDP on CPU processes: accelerate 1.15 turns FSDP on only for GPU-type devices (its
      AcceleratorState leaves MULTI_CPU alone), so fsdp.yaml would run plain data parallel,
      a full copy per process, while the user counts on sharded memory.
    """
    state = PartialState()
    launched_for_many = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ
    if launched_for_many and "RANK" not in os.environ and state.num_processes == 1:
        raise UserError(
            "`accelerate launch --cpu --num_processes N` starts only ONE process (accelerate runs N CPU "
            f"processes only through mpirun). For N CPU processes use: {CPU_LAUNCH_HELP}"
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and state.distributed_type == DistributedType.MULTI_CPU:
        raise UserError(
            "FSDP was requested on CPU processes, but accelerate enables FSDP only on GPUs (and other "
            "accelerators): these processes would each hold a full copy, not a shard. For CPU data "
            f"parallel use: {CPU_LAUNCH_HELP}"
        )


def on_main_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) computed once, by the main process; every process gets its result.

    The others wait at the broadcast. A UserError on the main process reaches every process:
    the main one reports it, the others exit with the same status without repeating it.
    """
    state = PartialState()
    if state.num_processes == 1:
        return fn(*args, **kwargs)
    box = [None]
    if state.is_main_process:
        try:
            box = [fn(*args, **kwargs)]
        except UserError as err:
            box = [err]
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], UserError):
        if state.is_main_process:
            raise box[0]
        raise SystemExit(2)
    return box[0]
