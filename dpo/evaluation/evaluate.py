"""Did the model get better? `python -m dpo.evaluate OUTPUT_DIR` on any run folder (SFT or DPO).

    python -m dpo.evaluate outputs/dpo_phi2
    python -m dpo.evaluate outputs/dpo_phi2 --reward_model OpenAssistant/reward-model-deberta-v3-large-v2
    python -m dpo.evaluate outputs/dpo_phi2 --num_prompts 64 --max_new_tokens 256

pi_theta is the run's adapter; pi_ref is what the run trained against: the base with adapters
disabled, or base + the SFT adapter when DPO started from one (output_dir/ref, TRL's frozen
copy). One model is in memory: the base once, both adapters on it, switched per forward (per row: answers).

  1. held-out pairs (heldout_pairs.jsonl, written by the recipe): implicit-reward accuracy and
     margin, beta * (log pi_theta/pi_ref of chosen - of rejected), with 95% intervals;
  2. the first --num_prompts held-out prompts answered by pi_ref and pi_theta, greedy and
     sampled (temperature 1, same seed), with lengths; KL(pi_theta || pi_ref) from the sampled
     policy answers and the length ratio (a policy that only got longer is exploiting length);
  3. with --reward_model, a judge: win rate of pi_theta over pi_ref with its 95% interval, and
     the length-controlled win rate (dpo/evaluation/judge.py).

Writes output_dir/eval/: metrics.json, report.md, report.html (answers side by side),
generations.jsonl. The folder is replaced only once everything has been computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpo.data.tools import TOOLS_COLUMN
from dpo.errors import UserError, exit_on_user_error, release_held_warnings
from dpo.evaluation.answers import GENERATION_MODES, answers_of_both, as_model
from dpo.gate.check import parse_and_check_flags
from dpo.gate.flags import command_parser
from dpo.log import log

# ── the run folder, checked before any weights load ─────────────────────────────────────────
COMMAND = "python -m dpo.evaluate"
# A held-out pair as the recipe wrote it (dpo/train/trainer.py): messages keep their tool calls, and a tool-calling
# row keeps the tools it offers (dpo/data/tools.py: JSON text, null on a row without tools), rendered as in training.
PAIR_SHAPE = {
    "prompt": ((str, list), None),
    "chosen": ((str, list), None),
    "rejected": ((str, list), None),
    TOOLS_COLUMN: ((str, type(None)), None),
}
DAMAGED = "the run folder is damaged (a file edited or cut short): rerun the training, or use an intact copy"
# No token of the recipes' tokenizers is longer (SmolLM2-135M's longest is 81 characters), so a held-out text past
# max_length x this cannot fit in max_length tokens: TRL drops such a pair, and scoring it would tokenize it whole.
MAX_CHARS_PER_TOKEN = 128
NO_MAX_LENGTH = 32768  # tokens, for a run with max_length null (a model without a position limit)


def read_run(output_dir: str | Path, command: str = COMMAND) -> tuple[dict, list[dict]]:
    """(resolved config, held-out pairs) of a run folder; UserError naming what is missing or malformed."""
    from dpo.files import read_yaml_mapping
    from dpo.train.safety.runs import require_finished_run

    out = Path(output_dir)
    if not out.is_dir():
        raise UserError(f"run folder not found: {out}")
    require_finished_run(out, command)
    refuse_full_fine_tune(out, command)
    for name in ("adapter_config.json", "resolved_config.yaml"):
        if not (out / name).is_file():
            raise UserError(f"{out} has no {name}: not a finished run folder of these recipes")
    pairs_file = out / "heldout_pairs.jsonl"
    if not pairs_file.is_file():
        raise UserError(
            f"{out} has no heldout_pairs.jsonl: the run held nothing out (test_size 0); re-run with a test_size"
        )
    resolved = read_yaml_mapping(out / "resolved_config.yaml", DAMAGED)
    if not isinstance(resolved.get("model_name_or_path"), str):
        raise UserError(f"{out / 'resolved_config.yaml'} names no model_name_or_path; {DAMAGED}")
    max_length = resolved.get("max_length")
    tokens = max_length if isinstance(max_length, int) and max_length > 0 else NO_MAX_LENGTH
    longest = (
        MAX_CHARS_PER_TOKEN * tokens,
        f"{MAX_CHARS_PER_TOKEN} characters a token at most x max_length {tokens}: more than the run's max_length "
        "holds, and would be tokenized whole",
    )
    pairs = read_heldout_pairs(pairs_file, longest)
    if not pairs:
        raise UserError(f"{pairs_file} is empty")
    return resolved, pairs


def read_heldout_pairs(pairs_file: Path, longest: tuple[int, str] | None = None) -> list[dict]:
    """The pairs of a run's heldout_pairs.jsonl (PAIR_SHAPE; `tools` only on tool-calling runs), each with
    exactly the fields `dpo.data.formats.render` takes; UserError naming the line otherwise."""
    from dpo.files import read_jsonl_objects

    rows = read_jsonl_objects(pairs_file, PAIR_SHAPE, DAMAGED, longest, optional=(TOOLS_COLUMN,))
    return [{key: row[key] for key in PAIR_SHAPE if key in row} for row in rows]


def refuse_full_fine_tune(out: Path, command: str) -> None:
    """A finished full fine-tune (use_peft false: the folder holds the whole model, no adapter) is named as one,
    with where its model and held-out metrics are; evaluate and export work on an adapter and its base."""
    from dpo.files import read_yaml_mapping

    if (out / "adapter_config.json").is_file() or not (out / "resolved_config.yaml").is_file():
        return
    if read_yaml_mapping(out / "resolved_config.yaml", DAMAGED).get("use_peft") is False:
        raise UserError(
            f"{out} is a full fine-tune (use_peft false): it holds the whole trained model and no adapter, and "
            f"{command} works on an adapter and the base it was trained from. The folder itself is the model "
            f"(AutoModelForCausalLM.from_pretrained('{out}')); its held-out metrics (eval_rewards/accuracies, "
            "margins) are in final_metrics.json"
        )


def check_run_files(output_dir: Path, base: str, source: str, command: str = COMMAND, revision: str | None = "main"):
    """The rest of what evaluate and export check before any weights load: the run's tokenizer and adapter
    are usable, every file run_complete.json hashed is the one the run wrote (not an adapter swapped for a
    checkpoint's), and the base it names (`source`: where) is still there with the weights the run recorded
    (dpo/train/safety/identity.py). Returns (the tokenizer, the base's revision to load)."""
    from dpo.train.adapters import adapter_weights
    from dpo.train.model_checks import check_run_base, load_tokenizer
    from dpo.train.safety.runs import verify_finished_run

    tokenizer = load_tokenizer(str(output_dir))
    adapter_weights(str(output_dir))
    marker = verify_finished_run(output_dir, command)
    check_run_base(base, source)
    return tokenizer, run_base_revision(output_dir, marker, base, revision, command)


def run_base_revision(output_dir: Path, marker: dict, base: str, revision: str | None, command: str) -> str | None:
    """The revision of `base` to load for the run in `output_dir` (`marker`: its run_complete.json): refused when
    a local base's weights are not those the run recorded; a hub base at the commit the run was trained on."""
    from dpo.train.safety.identity import check_base
    from dpo.train.safety.runs import RUN_MARKER

    fix = f"Put the model the run was trained on back at {base}, or train again on this one"
    return check_base(output_dir / RUN_MARKER, marker["run"], base, revision, command, fix)


def reference_adapter(output_dir: Path, resolved: dict) -> str | None:
    """The SFT adapter DPO trained against: the run's own frozen copy (hashed with the run's files), else the
    configured one (a run from before the copy was kept), refused unless its weights have the sha256 the run
    recorded: an adapter retrained or replaced at that path since would be another pi_ref."""
    from dpo.files import file_sha256
    from dpo.train.adapters import adapter_weights
    from dpo.train.safety.runs import RUN_MARKER, finished_run

    if (output_dir / "ref" / "adapter_config.json").is_file():
        return str(output_dir / "ref")
    path = resolved.get("sft_adapter_path") or None
    recorded = ((finished_run(output_dir) or {}).get("run") or {}).get("sft_adapter_sha256")
    if path and recorded and (now := file_sha256(adapter_weights(path))) != recorded:
        raise UserError(
            f"{output_dir} was trained against the SFT adapter {path} with sha256 {recorded} ({RUN_MARKER}), but it "
            f"now has sha256 {now} (retrained or replaced since), so pi_ref would not be the run's: put that adapter "
            "back, or evaluate a run trained against this one"
        )
    return path


def load_policy_and_reference(output_dir: Path, resolved: dict, ref: str | None):
    """The base as the run loaded it (4-bit if it was), adapter "policy" = the run's, and "ref"
    = `ref`, the SFT adapter (reference_adapter) if there was one. Returns (PeftModel, tokenizer)."""
    release_held_warnings()  # weights load next (dpo/errors.py)
    from dpo.compat import ModelConfig, get_quantization_config
    from dpo.train.adapters import load_with_adapter, put_adapter

    fields = {k: v for k, v in resolved.items() if k in ModelConfig.__dataclass_fields__}
    model_args = ModelConfig(**fields)
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": bool(resolved.get("trust_remote_code", False)),
        "dtype": model_args.dtype or "float32",
        "use_safetensors": True,
    }
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    tokenizer, kwargs["revision"] = check_run_files(
        output_dir,
        model_args.model_name_or_path,
        "model_name_or_path in resolved_config.yaml",
        COMMAND,
        kwargs["revision"],
    )
    model = load_with_adapter(model_args.model_name_or_path, kwargs, str(output_dir), False, adapter_name="policy")
    if ref:
        model = put_adapter(model, ref, adapter_name="ref")
    model.eval()
    return model, tokenizer


# ── log-probabilities and generations ────────────────────────────────────────────────────────
def encode_pairs(tokenizer, pairs: list[dict], max_length: int | None):
    """Token ids of each prompt and of its chosen and rejected answers, split and truncated as TRL does."""
    from dpo.data.formats import common_prefix_length, render

    prompt_ids, chosen_ids, rejected_ids = [], [], []
    for pair in pairs:
        chat = not isinstance(pair["chosen"], str)
        p, pc, pr = (
            tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in render(**pair, tokenizer=tokenizer)
        )
        n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
        keep = max_length - n if max_length else None  # keep_start: the answer is cut, the prompt kept
        prompt_ids.append(p[:n])
        chosen_ids.append(pc[n:][:keep])
        rejected_ids.append(pr[n:][:keep])
    return prompt_ids, chosen_ids, rejected_ids


def logps_of_rows(model, rows: list, pad: int, bs: int, shared_prompts: bool = True) -> dict[str, torch.Tensor]:
    """{"policy" | "reference": log pi(answer | prompt) of each (prompt_ids, answer_ids) row} under a progress bar per
    model: each distinct prompt fed once per model (dpo/evaluation/scoring.py), or with `shared_prompts` False each
    row fed whole in padded batches of `bs` rows (dpo/scratch/logps.py; what it replaced, kept to compare)."""
    from tqdm.auto import tqdm

    from dpo.evaluation.scoring import logps_sharing_prompts
    from dpo.scratch.logps import completion_logps

    out = {}
    for name in ("policy", "reference"):
        desc = f"log-probs under {name}: held-out pairs and sampled answers"
        with as_model(model, name), tqdm(total=len(rows), desc=desc, unit="answer") as bar:
            if shared_prompts:
                out[name] = logps_sharing_prompts(model, rows, bar, bs)
                continue
            parts = []
            for i in range(0, len(rows), bs):
                batch = rows[i : i + bs]
                parts.append(completion_logps(model, [p for p, _ in batch], [a for _, a in batch], pad, bs))
                bar.update(len(batch))
            out[name] = torch.cat(parts)
    return out


# ── the whole evaluation ─────────────────────────────────────────────────────────────────────
def evaluate(
    output_dir,
    reward_model=None,
    num_prompts=16,
    max_new_tokens=128,
    batch_size=8,
    seed=0,
    dequantize=True,
    one_loop=True,
    shared_prompts=True,
) -> dict:
    """`dequantize`: on a CPU, the 4-bit base dequantized once for inference (dpo/train/speed/dequant.py); `one_loop`:
    all four generations in one decode loop (dpo/evaluation/answers.py); `shared_prompts`: each prompt fed once per
    model for the log-probs of all its answers (dpo/evaluation/scoring.py). Each off only to measure what it saves
    (benchmarks/bench_evaluate.py)."""
    from dpo.evaluation.judge import mean_interval, wilson
    from dpo.evaluation.report import run_identity, write_eval_folder
    from dpo.evaluation.sampling import render_prompt
    from dpo.train.speed.dequant import dequantized_4bit_layers

    output_dir = Path(output_dir)
    resolved, pairs = read_run(output_dir)
    evaluated_run = run_identity(output_dir)  # recorded in eval/: the run these numbers belong to
    ref = reference_adapter(output_dir, resolved)  # checked before any weights load
    if reward_model:
        from dpo.evaluation.judge import check_reward_model

        check_reward_model(reward_model)  # a sequence-classification head, in safetensors: before any weights load
    model, tokenizer = load_policy_and_reference(output_dir, resolved, ref)
    if dequantize:
        n, why = dequantized_4bit_layers(model)  # CPU inference: one dequantization, not one per forward
        log(f"4-bit base {'dequantized for inference: ' + str(n) + ' layers, ' if n else 'kept 4-bit: '}{why}")
    pad, beta = tokenizer.pad_token_id, float(resolved.get("beta", 0.1))
    log(
        f"evaluating {output_dir}: pi_theta = its adapter, pi_ref = {ref or 'base'}"
        f"; {torch.get_num_threads()} CPU threads (--torch_threads)"
    )

    # 1. generations from both models, greedy and sampled (one decode loop: dpo/evaluation/answers.py)
    chat = not isinstance(pairs[0]["chosen"], str)
    chosen_prompts = [p["prompt"] for p in pairs[:num_prompts]]
    texts = [render_prompt(tokenizer, p["prompt"], p.get(TOOLS_COLUMN)) for p in pairs[:num_prompts]]
    gen_prompt_ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    answers = answers_of_both(model, tokenizer, gen_prompt_ids, max_new_tokens, seed, batch_size, one_loop)
    sampled = answers["sampled", "policy"]

    # 2. log-probs under both models, in one pass each: the held-out pairs' chosen and rejected answers (implicit
    # rewards) and the sampled policy answers (KL(pi_theta || pi_ref)); a prompt's answers share its forward
    prompt_ids, chosen_ids, rejected_ids = encode_pairs(tokenizer, pairs, resolved.get("max_length"))
    n = len(pairs)
    scored_rows = [*zip(prompt_ids, chosen_ids), *zip(prompt_ids, rejected_ids), *zip(gen_prompt_ids, sampled)]
    logps = logps_of_rows(model, scored_rows, pad, batch_size, shared_prompts)
    chosen, rejected, kl_rows = slice(0, n), slice(n, 2 * n), slice(2 * n, None)
    reward_chosen = beta * (logps["policy"][chosen] - logps["reference"][chosen])
    reward_rejected = beta * (logps["policy"][rejected] - logps["reference"][rejected])
    margins = (reward_chosen - reward_rejected).tolist()
    accuracy = sum(m > 0 for m in margins) / len(margins)
    margin, margin_low, margin_high = mean_interval(margins)
    metrics = {
        "heldout_pairs": len(pairs),
        "beta": beta,
        "reward_accuracy": accuracy,
        "reward_accuracy_ci95": list(wilson(accuracy, len(margins))),
        "reward_margin": margin,
        "reward_margin_ci95": [margin_low, margin_high],
    }
    kl, kl_low, kl_high = mean_interval((logps["policy"][kl_rows] - logps["reference"][kl_rows]).tolist())
    lengths = {key: [len(a) for a in value] for key, value in answers.items()}
    for mode in GENERATION_MODES:
        pol, ref = sum(lengths[mode, "policy"]), sum(lengths[mode, "reference"])
        metrics[f"{mode}_length_policy"] = pol / len(texts)
        metrics[f"{mode}_length_reference"] = ref / len(texts)
        metrics[f"{mode}_length_ratio"] = pol / max(ref, 1)
    metrics.update(generation_prompts=len(texts), kl=kl, kl_ci95=[kl_low, kl_high], max_new_tokens=max_new_tokens)
    decoded = {k: [tokenizer.decode(a, skip_special_tokens=True) for a in v] for k, v in answers.items()}
    model = None  # free the policy before loading a judge

    # 3. the judge
    if reward_model:
        from dpo.evaluation.judge import load_reward_model, score, win_rates

        judge, judge_tokenizer = load_reward_model(reward_model, "cuda" if torch.cuda.is_available() else "cpu")
        plain_prompts = [t if isinstance(p, str) else p[-1]["content"] for p, t in zip(chosen_prompts, texts)]
        metrics["judge"] = {"reward_model": reward_model}
        for mode in GENERATION_MODES:
            scores = {
                name: score(
                    judge, judge_tokenizer, plain_prompts, decoded[mode, name], batch_size, f"judge: {mode}, {name}"
                )
                for name in ("policy", "reference")
            }
            metrics["judge"][mode] = win_rates(
                scores["policy"], scores["reference"], lengths[mode, "policy"], lengths[mode, "reference"]
            )
            for name in ("policy", "reference"):
                decoded[mode, f"{name}_score"] = scores[name]

    rows = [
        {
            "prompt": t,
            **{f"{m}_{n}": decoded[m, n][i] for m in GENERATION_MODES for n in ("policy", "reference")},
            **{f"{m}_{n}_tokens": lengths[m, n][i] for m in GENERATION_MODES for n in ("policy", "reference")},
            **{
                f"{m}_{n}_score": decoded[m, f"{n}_score"][i]
                for m in GENERATION_MODES
                for n in ("policy", "reference")
                if (m, f"{n}_score") in decoded
            },
        }
        for i, t in enumerate(texts)
    ]
    folder = write_eval_folder(output_dir, metrics, rows, evaluated_run)
    log(f"evaluation written to {folder} (report.md, report.html, metrics.json, generations.jsonl)")
    return metrics


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m dpo.evaluate", __doc__)
    parser.add_argument("output_dir", help="a run folder written by a recipe (SFT or DPO)")
    parser.add_argument("--reward_model", help="sequence-classification reward model (hub id or folder) as judge")
    parser.add_argument("--num_prompts", type=int, default=16, help="held-out prompts to answer (default 16)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="answer length cap in tokens (default 128)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="answers per log-probability forward (the answers of one prompt share its forward), prompts per generation batch (default 8); a generation batch holds 4 rows a prompt (greedy and sampled answers of both models, one decode loop), so its KV cache is 4x a prompt's",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both models")
    parser.add_argument(
        "--torch_threads",
        type=int,
        help="CPU threads (default: torch's, every core). On a CPU shared with other work, 1: two threads that wait "
        "on each other made a generation step's matmuls 5-15x slower than one thread under load",
    )
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_and_check_flags(
        _parser(), argv
    )  # the settings gate (dpo/gate/): --num_prompts, --max_new_tokens, --batch_size, --seed, --torch_threads
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return evaluate(
        args.output_dir, args.reward_model, args.num_prompts, args.max_new_tokens, args.batch_size, args.seed
    )


if __name__ == "__main__":
    main()
