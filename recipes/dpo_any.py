"""LoRA / QLoRA DPO of any causal LM on any supported preference dataset, on one GPU.

    accelerate launch recipes/dpo_any.py                              # settings: recipes/dpo_any.yaml
    accelerate launch recipes/dpo_any.py --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name my.jsonl
    accelerate launch recipes/dpo_any.py --config recipes/dpo_hh_rlhf.yaml   # Anthropic HH-RLHF
    accelerate launch recipes/dpo_any.py --dataset_name my.csv --prompt_column question --load_in_4bit false
    python -m dpo.doctor my.jsonl --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct   # check the data alone first

Offline (no GPU, no internet): a tiny Phi model and truthy-format rows, same code path:

    python -m dpo.tiny outputs/tiny-phi --truthy_rows outputs/truthy_sample.jsonl
    python recipes/dpo_any.py --model_name_or_path outputs/tiny-phi --dataset_name outputs/truthy_sample.jsonl \\
        --max_steps 5 --gradient_accumulation_steps 1

Data: prompt/chosen/rejected text (+ system), conversational message lists (explicit or implicit
prompt), Anthropic HH transcripts, or any columns named in the YAML (`prompt_column: question`);
see dpo/data/pairs.py. Two responses and a label saying which is better (PKU-SafeRLHF, SHP, HelpSteer2,
`label_column: better_response_id`) or a score per response (`score_columns: [score_a, score_b]`,
raw UltraFeedback's completions): see dpo/data/preferences.py. With `prompt_format: chat` (default) the tokenizer's chat template formats every
row; a tokenizer without one gets dpo/data/formats.py's plain Human/Assistant template and a warning.
The data doctor (dpo/data/doctor.py) checks every row and prints its table before any weights load.
"""

from dataclasses import dataclass, field
from pathlib import Path

from dpo.data.doctor import check_splits
from dpo.data.loading import split_heldout
from dpo.data.pairs import Columns
from dpo.errors import exit_on_user_error
from dpo.log import log, pairs_line
from dpo.plots import plot_lengths
from dpo.train.adapters import start_point
from dpo.train.config import DPOScriptArguments, load_recipe_args
from dpo.train.distributed import on_main_process
from dpo.train.model_checks import check_model_and_load_tokenizer
from dpo.train.trainer import build_dpo_trainer, train_and_save


@dataclass
class ScriptArguments(DPOScriptArguments):
    """The phi-2 recipe's data and start-point fields (dpo.train.config.DPOScriptArguments), plus a test split
    and the layout settings."""

    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; unset: hold out test_size."}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column with the prompt (detected: prompt, question, instruction)."}
    )
    chosen_column: str | None = field(
        default=None, metadata={"help": "Column with the preferred answer (detected: chosen)."}
    )
    rejected_column: str | None = field(
        default=None, metadata={"help": "Column with the dispreferred answer (detected: rejected)."}
    )
    system_column: str | None = field(
        default=None, metadata={"help": "Column with a system text (detected: system, system_prompt)."}
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Column saying which of two responses is better (detected: better_response_id, labels, "
            "preference, preference_strength; PKU-SafeRLHF: choose better_response_id or safer_response_id)."
        },
    )
    score_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "A score column per response (detected: chosen_score/rejected_score, score_A/score_B, ...), "
            "or the score key of a completions list (default overall_score); higher is better."
        },
    )
    prompt_format: str = field(
        default="chat", metadata={"help": "chat: the tokenizer's chat template; text: strings as they are."}
    )
    degenerate_rows: str = field(
        default="drop", metadata={"help": "drop (count and warn) or fail on empty/identical/duplicate/too-long rows."}
    )


@exit_on_user_error
def main(argv: list[str] | None = None, callbacks=None):
    # ── args: YAML beside this file < --config other.yaml < CLI flags ─────────────────
    script_args, training_args, model_args = load_recipe_args(ScriptArguments, __file__, argv)

    # ── model: checks only; TRL loads the (4-bit) weights when it builds the trainer ───
    model_args.model_name_or_path, script_args.sft_adapter_path = start_point(
        model_args, training_args, script_args.sft_adapter_path
    )  # an SFT adapter, given as --sft_adapter_path or as the model: checked against the base
    tokenizer = check_model_and_load_tokenizer(model_args, training_args)

    # ── data: any layout -> prompt/chosen/rejected; the doctor checks every row ─────────
    #    Under several processes it runs once, on the main process; the others wait for its reports.
    columns = Columns(
        script_args.prompt_column,
        script_args.chosen_column,
        script_args.rejected_column,
        script_args.system_column,
        script_args.label_column,
        script_args.score_columns,
    )
    formatting = dict(
        columns=columns, prompt_format=script_args.prompt_format, degenerate_rows=script_args.degenerate_rows
    )
    report, test = on_main_process(check_splits, script_args, training_args, tokenizer, **formatting)
    if report.chat_template:  # chat rows: train (and save the tokenizer) with the template the doctor rendered
        tokenizer.chat_template = report.chat_template
    if test is not None:
        train, heldout = report.kept, test.kept
    else:
        if script_args.dataset_test_split:  # e.g. a local file, which has only "train"
            log(
                f"no split '{script_args.dataset_test_split}' in {script_args.dataset_name}; "
                f"holding out test_size={script_args.test_size} of the training rows instead"
            )
        train, heldout = split_heldout(report.kept, script_args.test_size, training_args.seed)
    log(pairs_line(train, heldout, report.example, tokenizer, training_args))

    # ── trainer: (4-bit) base + LoRA; no ref_model, the base with adapters off is pi_ref ─
    trainer = build_dpo_trainer(
        model_args, training_args, train, heldout, tokenizer, callbacks, script_args.sft_adapter_path
    )  # output_dir checked here: a refused rerun leaves the finished run's files, data_lengths.png too, as they were
    on_main_process(plot_lengths, report, Path(training_args.output_dir) / "data_lengths.png")

    # ── train and save: adapter, tokenizer (with its chat template), config, metrics, curves
    train_and_save(trainer, (script_args, training_args, model_args), training_args.resume_from_checkpoint, heldout)
    return trainer


if __name__ == "__main__":
    main()
