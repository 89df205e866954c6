"""Entry point that tests/train/test_distributed.py starts under `accelerate launch`: runs a recipe and
records, per process, what the test cannot see from outside.

    accelerate launch ... tests/_launch_recipe.py <recipe name> <recipe flags...>

Environment:
  DPO_TEST_FACTS  folder for facts-rank<R>.json: how often this process ran the data doctor,
                  accelerate's distributed type, world size, and how the LoRA weights are stored
                  (sharded: each process holds part of each tensor).
  DPO_TEST_CRASH  "<rank>:<step>": that process raises RuntimeError at the end of that step.
  DPO_TEST_CTRL_C "<step>": at the end of that step rank 0 sends SIGINT to its whole process group,
                  as Ctrl-C in a terminal does (the launcher and every process get it).
"""

import json
import os
import signal
import sys
from pathlib import Path

from helpers import load_recipe  # tests/ is on sys.path: this file runs as a script from there

import dpo.data.doctor

doctor_runs = []
check_data = dpo.data.doctor.check_data


def counted_check_data(*args, **kwargs):
    doctor_runs.append(1)
    return check_data(*args, **kwargs)


dpo.data.doctor.check_data = counted_check_data  # before the recipe imports it by name

from accelerate.state import AcceleratorState  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
facts = {"rank": RANK}


def local_numel(param) -> int:
    """Elements of `param` this process holds: a shard under FSDP2 or ZeRO-3, all of it otherwise."""
    if hasattr(param, "to_local"):  # FSDP2: a DTensor
        return param.to_local().numel()
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3: this process's partition
        return param.ds_tensor.numel()
    return param.numel()


class RecordAndCrash(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        facts["distributed_type"] = str(AcceleratorState().distributed_type).split(".")[-1]
        facts["world_size"] = AcceleratorState().num_processes
        facts["lora_numel_global"] = sum(getattr(p, "ds_numel", p.numel()) for p in lora)
        facts["lora_numel_local"] = sum(local_numel(p) for p in lora)

    def on_step_end(self, args, state, control, **kwargs):
        if os.environ.get("DPO_TEST_CRASH") == f"{RANK}:{state.global_step}":
            raise RuntimeError(f"test crash in rank {RANK} at step {state.global_step}")
        if os.environ.get("DPO_TEST_CTRL_C") == str(state.global_step) and RANK == 0:
            os.killpg(os.getpgrp(), signal.SIGINT)


def write_facts():
    folder = os.environ.get("DPO_TEST_FACTS")
    if folder:
        facts["doctor_runs"] = len(doctor_runs)
        Path(folder, f"facts-rank{RANK}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    recipe = load_recipe(sys.argv[1])
    try:
        recipe.main(sys.argv[2:], callbacks=[RecordAndCrash()])
    finally:
        write_facts()
