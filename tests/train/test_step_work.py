"""The recipe's optimizer step does no more work than TRL + precompute_ref_log_probs's: counted, not timed
(benchmarks/step_work.py), on the tiny phi with the phi-2 recipe's settings and TRL given the same.

Counted per optimizer step: torch ops dispatched, and host reads (item/bool/float of a tensor, nonzero-like ops,
tolist/cpu/numpy: each a host sync on a GPU), in the whole step and in the part around the model (data, the
non-finite guard, clipping, the optimizer, callbacks, logging), where per-step overhead of our own would show.
The recipe's CPU-only lean LM head (dpo.compat.lean_cpu_lm_head: on a CPU, less memory, more index ops, and
host reads that sync nothing without a device) is switched off: this counts the step a GPU runs.
"""

import contextlib
import json

import pytest
from datasets import Dataset
from helpers import ROOT, load_script

from dpo.compat import DPOConfig, DPOTrainer, lora_config, quantization_config
from dpo.train.config import DPOScriptArguments, load_recipe_args
from dpo.train.model_checks import load_tokenizer
from dpo.train.trainer import build_dpo_trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SKIP, STEPS, ACCUMULATION = 1, 2, 2  # count steps 2-3 of 4: two micro-batches each, so per-micro-batch work shows
step_work = load_script(ROOT / "benchmarks" / "step_work.py", "bench_step_work")


def rows(n=16):  # = 4 steps x 2 pairs x 2 micro-batches: the plan reaches every pair, the cache fills up front
    """Pairs of one length (a numbered prompt): both sides' batches then have the same shapes, whatever order
    their samplers pick."""
    return [
        {"prompt": f"Question {i:03d}: is the sky blue?", "chosen": " Yes, it is blue.", "rejected": " No, green."}
        for i in range(100, 100 + n)
    ]


def counted(trainer) -> dict:
    with step_work.StepWork(trainer, skip=SKIP, steps=STEPS) as work:
        trainer.train()
    return work.per_step()


@pytest.fixture(scope="module")
def recipe_and_trl(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step-work")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in rows()))
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pairs), "--output_dir", str(tmp / "r")]
    flags += ["--max_steps", str(SKIP + STEPS + 1), "--gradient_accumulation_steps", str(ACCUMULATION)]
    flags += ["--max_length", "64", "--save_strategy", "no", "--eval_strategy", "no", "--test_size", "0"]
    flags += ["--reference_cache_dir", str(tmp / "cache"), "--disable_tqdm", "true"]
    _, args, model_args = load_recipe_args(DPOScriptArguments, ROOT / "recipes" / "dpo_phi2.py", flags)
    tokenizer, data = load_tokenizer(str(tiny_model_dir)), Dataset.from_list(rows())
    recipe = build_dpo_trainer(model_args, args, data, None, tokenizer)
    recipe._lm_head = contextlib.nullcontext  # the GPU path (module docstring)
    trl_args = DPOConfig(  # the same settings, TRL's defaults elsewhere (its optimizer among them)
        output_dir=str(tmp / "t"),
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=True,
        model_init_kwargs={"dtype": model_args.dtype},
        report_to="none",
        disable_tqdm=True,
        **{
            name: getattr(args, name)
            for name in (
                "max_steps",
                "gradient_accumulation_steps",
                "per_device_train_batch_size",
                "max_length",
                "learning_rate",
                "beta",
                "loss_type",
                "max_grad_norm",
                "warmup_steps",
                "lr_scheduler_type",
                "logging_steps",
                "save_strategy",
                "seed",
                "activation_checkpointing",
                "activation_checkpointing_kwargs",
            )
        },
    )
    trl = DPOTrainer(
        model=str(tiny_model_dir),
        args=trl_args,
        train_dataset=data,
        processing_class=tokenizer,
        quantization_config=quantization_config(model_args, None),
        peft_config=lora_config(model_args),
    )
    return counted(recipe), counted(trl)


def test_the_recipes_step_does_no_more_than_trl_with_precompute(recipe_and_trl):
    recipe, trl = recipe_and_trl
    print(json.dumps({"recipe": recipe, "trl": trl}, indent=1))
    assert recipe["steps"] == trl["steps"] == STEPS
    assert recipe["ops"] <= trl["ops"]
    assert recipe["host_reads"] <= trl["host_reads"]


def test_around_the_model_the_recipe_adds_no_work_per_step(recipe_and_trl):
    """Data, the non-finite guard, clipping, the optimizer, callbacks and logging: no more ops and host reads
    than TRL's. The guard reads its one check per step with no more than the reads it saves (transformers'
    logging_nan_inf_filter reads every micro-batch's loss twice), whatever the number of LoRA tensors."""
    recipe, trl = (side["phases"]["other"] for side in recipe_and_trl)
    assert recipe["ops"] <= trl["ops"]
    assert recipe["host_reads"] <= trl["host_reads"]
