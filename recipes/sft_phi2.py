"""QLoRA SFT of microsoft/phi-2 on the chosen answers of jondurbin/truthy-dpo-v0.1: step 1 of 2.

    accelerate launch recipes/sft_phi2.py                         # settings: recipes/sft_phi2.yaml
    accelerate launch recipes/dpo_phi2.py --sft_adapter_path outputs/sft_phi2   # step 2: DPO from it
    accelerate launch recipes/sft_phi2.py --resume_from_checkpoint last

The DPO paper fine-tunes on the preferred answers first and uses that model as pi_ref. This
recipe writes that SFT model as a LoRA adapter on the 4-bit base; the DPO recipes then take it
as their starting point and their reference (dpo/train/adapters.py). Same prompt format as
recipes/dpo_phi2.py (phi-2's `Instruct: ...\\nOutput:`), same data checks, same outputs
(adapter, tokenizer, resolved_config.yaml, final_metrics.json, curves, checkpoints), and the
loss covers the answer tokens only.

Offline (no GPU, no internet):

    python -m dpo.tiny outputs/tiny-phi --truthy_rows outputs/truthy_sample.jsonl
    python recipes/sft_phi2.py --model_name_or_path outputs/tiny-phi --dataset_name outputs/truthy_sample.jsonl \\
        --max_steps 5 --output_dir outputs/sft_tiny
"""

from dpo.data.doctor import check_training_split, split_like_dpo
from dpo.data.formats import phi2_qa_format
from dpo.errors import exit_on_user_error
from dpo.log import log
from dpo.train.config import DataArguments, RecipeSFTConfig, load_recipe_args
from dpo.train.distributed import on_main_process
from dpo.train.model_checks import check_model_and_load_tokenizer
from dpo.train.sft import build_sft_trainer, sft_rows
from dpo.train.trainer import train_and_save

ScriptArguments = DataArguments  # dataset_name/config/train_split, test_size (dpo.train.config)


@exit_on_user_error
def main(argv: list[str] | None = None, callbacks=None):
    # ── args: YAML beside this file < --config other.yaml < CLI flags ─────────────────
    script_args, training_args, model_args = load_recipe_args(ScriptArguments, __file__, argv, RecipeSFTConfig)

    # ── model: checks only; TRL loads the 4-bit weights when it builds the trainer ─────
    tokenizer = check_model_and_load_tokenizer(model_args, training_args)

    # ── data: the DPO recipe's rows and checks; SFT keeps the prompt and the chosen answer, also
    #    where rejected is empty or equal to chosen (SFT never reads it). The same seed holds out
    #    the same pairs as recipes/dpo_phi2.py, so DPO's held-out pairs were not seen by SFT either.
    report = on_main_process(  # once, on the main process, under several processes
        check_training_split,
        script_args,
        training_args,
        tokenizer,
        prompt_format="text",
        text_format=phi2_qa_format,
        sft=True,
    )
    log(report.summary())
    train_pairs, heldout_pairs = split_like_dpo(report, script_args.test_size, training_args.seed)
    train_rows = sft_rows(train_pairs)
    heldout_rows = sft_rows(heldout_pairs) if heldout_pairs is not None else None
    log(f"{len(train_rows)} SFT rows (prompt + chosen answer), {len(heldout_rows or [])} held out")

    # ── trainer: 4-bit base + LoRA, loss on the answer tokens ───────────────────────────
    trainer = build_sft_trainer(model_args, training_args, train_rows, heldout_rows, tokenizer, callbacks)

    # ── train and save: adapter, tokenizer, resolved config, metrics, curves ────────────
    train_and_save(
        trainer, (script_args, training_args, model_args), training_args.resume_from_checkpoint, heldout_pairs
    )
    log(f"next: accelerate launch recipes/dpo_phi2.py --sft_adapter_path {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
