"""QLoRA DPO of microsoft/phi-2 on jondurbin/truthy-dpo-v0.1, on one 16 GB GPU.

    accelerate launch recipes/dpo_phi2.py                         # settings: recipes/dpo_phi2.yaml
    accelerate launch recipes/dpo_phi2.py --beta 0.2 --output_dir outputs/beta0.2
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/dpo_phi2.py
    accelerate launch recipes/dpo_phi2.py --resume_from_checkpoint last
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/dpo_phi2.py   # 2 CPU processes

Offline (no GPU, no internet): a tiny Phi model and truthy-format rows, same code path:

    python -m dpo.tiny outputs/tiny-phi --truthy_rows outputs/truthy_sample.jsonl
    python recipes/dpo_phi2.py --model_name_or_path outputs/tiny-phi \\
        --dataset_name outputs/truthy_sample.jsonl --max_steps 5 --gradient_accumulation_steps 1

Prompt format: phi-2 has no chat template; its documented QA format is used, with the
dataset's system text opening the instruction (dpo/data/formats.py:phi2_qa_format):

    Instruct: <system>\\n\\n<prompt>\\nOutput: <answer><|endoftext|>
"""

from dpo.data.doctor import check_training_split
from dpo.data.formats import phi2_qa_format
from dpo.data.loading import split_heldout
from dpo.errors import exit_on_user_error
from dpo.log import log, pairs_line
from dpo.train.adapters import start_point
from dpo.train.config import DPOScriptArguments, load_recipe_args
from dpo.train.distributed import on_main_process
from dpo.train.model_checks import check_model_and_load_tokenizer
from dpo.train.trainer import build_dpo_trainer, train_and_save

ScriptArguments = DPOScriptArguments  # dataset_name/config/train_split, test_size, sft_adapter_path (dpo.train.config)


@exit_on_user_error
def main(argv: list[str] | None = None, callbacks=None):
    # ── args: YAML beside this file < --config other.yaml < CLI flags ─────────────────
    script_args, training_args, model_args = load_recipe_args(ScriptArguments, __file__, argv)

    # ── model: checks only; TRL loads the 4-bit weights when it builds the trainer ─────
    model_args.model_name_or_path, script_args.sft_adapter_path = start_point(
        model_args, training_args, script_args.sft_adapter_path
    )  # an SFT adapter, given as --sft_adapter_path or as the model: checked against the base
    tokenizer = check_model_and_load_tokenizer(model_args, training_args)

    # ── data: truthy rows (system, prompt, chosen, rejected) -> phi-2 QA format; the doctor
    #    (dpo/data/doctor.py) checks every row and drops degenerate ones, counted, before any weights load.
    #    Under several processes it runs once, on the main process; the others wait for its report.
    report = on_main_process(
        check_training_split, script_args, training_args, tokenizer, prompt_format="text", text_format=phi2_qa_format
    )
    log(report.summary())
    train, heldout = split_heldout(report.kept, script_args.test_size, training_args.seed)
    log(pairs_line(train, heldout, report.example, tokenizer, training_args))

    # ── trainer: 4-bit base + LoRA; no ref_model, the base with adapters off is pi_ref ──
    trainer = build_dpo_trainer(
        model_args, training_args, train, heldout, tokenizer, callbacks, script_args.sft_adapter_path
    )

    # ── train and save: adapter, tokenizer, resolved config, metrics, curves ────────────
    train_and_save(trainer, (script_args, training_args, model_args), training_args.resume_from_checkpoint, heldout)
    return trainer


if __name__ == "__main__":
    main()
