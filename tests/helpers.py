"""What several test modules share (fixtures live in conftest.py):

* the repository root, and loading recipe and benchmark scripts: they are scripts, not a
  package (dpo/ never imports them), so tests load them from their files;
* preference rows in the exact shapes of well-known hub datasets (test_data, test_doctor,
  test_recipe_generic);
* a tiny policy/reference pair and real TRL DPOTrainers built on them, so that the from-scratch
  DPO can be compared with TRL itself (test_loss_agreement, test_loop_agreement). TRL internals
  touched (pinned TRL 1.16): `trainer._metrics["train"]` holds one value per `compute_loss` call
  for each logged metric; `DPOConfig(train_sampling_strategy="sequential")` makes the dataloader
  deterministic.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from dpo.compat import REWARD_METRICS, ModelConfig
from dpo.offline.tiny import build_tiny_model, build_tokenizer, truthy_like_rows
from dpo.scratch.logps import ld_logps, sequence_logps, sft_nll, wpo_weights
from dpo.scratch.loop import reward_metrics
from dpo.scratch.loss import dpo_loss
from dpo.scratch.loss_settings import LENGTH_LOSS_TYPES
from dpo.train.config import RecipeDPOConfig
from dpo.train.model_checks import load_tokenizer
from dpo.train.trainer import build_dpo_trainer

ROOT = Path(__file__).resolve().parents[1]
# Real human preferences: Anthropic HH-RLHF harmless-base test split, the original file (data/hh-rlhf/README.md).
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def cli(**settings) -> list[str]:
    """Command-line flags from settings, in the order given: cli(max_steps=4, output_dir=out) is
    ["--max_steps", "4", "--output_dir", str(out)]; booleans as TrlParser reads them (true/false)."""
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def load_script(path: str | Path, name: str | None = None):
    """Import a script file (a recipe, a benchmark) as a module without running its `__main__`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """recipes/<name>.py as a module: its ScriptArguments and main."""
    return load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")


# ── rows shaped like hub datasets ───────────────────────────────────────────────────────────

SYSTEM = "You are a helpful assistant."
QA = [  # (question, good answer, bad answer); row i uses QA[i % len(QA)] and numbers the question
    ("How do I boil an egg?", "Simmer it for nine minutes, then cool it in cold water.", "Microwave it whole."),
    ("Is the Moon made of cheese?", "No, it is rock: mostly silicate minerals.", "Yes, a kind of cheddar."),
    ("What is 7 times 8?", "7 times 8 is 56.", "It is 54."),
]


def qa(i):
    question, good, bad = QA[i % len(QA)]
    return f"{question} (#{i})", good, bad


def user(text):
    return {"content": text, "role": "user"}  # the hub stores content before role


def assistant(text):
    return {"content": text, "role": "assistant"}


def h4_ultrafeedback_rows(n):
    """HuggingFaceH4/ultrafeedback_binarized: prompt text, full conversations, messages = chosen, ids, scores."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        chosen, rejected = [user(q), assistant(good)], [user(q), assistant(bad)]
        rows.append(
            {
                "prompt": q,
                "prompt_id": f"{i:064x}",
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 4.5,
            }
        )
    return rows


def trl_ultrafeedback_rows(n):
    """trl-lib/ultrafeedback_binarized: chosen / rejected message lists only; every third row multi-turn."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        history = [user("Hello."), assistant("Hi! What can I do for you?")] if i % 3 == 2 else []
        rows.append({"chosen": [*history, user(q), assistant(good)], "rejected": [*history, user(q), assistant(bad)]})
    return rows


def hh_rows(n):
    """Anthropic/hh-rlhf: whole transcripts; every other row has an earlier exchange (multi-turn)."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        history = "\n\nHuman: Hi there.\n\nAssistant: Hello, how can I help?" if i % 2 else ""
        rows.append(
            {
                "chosen": f"{history}\n\nHuman: {q}\n\nAssistant: {good}",
                "rejected": f"{history}\n\nHuman: {q}\n\nAssistant: {bad}",
            }
        )
    return rows


def orca_rows(n):
    """Intel/orca_dpo_pairs: system, question, chosen, rejected (system often empty)."""
    return [
        {"system": SYSTEM if i % 2 else "", "question": q, "chosen": good, "rejected": bad}
        for i, (q, good, bad) in ((i, qa(i)) for i in range(n))
    ]


def _good_first(i: int) -> bool:
    """Where the better response sits in row i of a label layout: it alternates irregularly (1, 2, 4, 5, ... first),
    so that neither position alone is right."""
    return i % 3 != 2


def pku_rows(n):
    """PKU-Alignment/PKU-SafeRLHF: prompt, response_0, response_1, better_response_id and safer_response_id
    (0 or 1, the better one's index); here the safer one is the other response in every third row."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        first = _good_first(i)
        better = 0 if first else 1
        rows.append(
            {
                "prompt": q,
                "response_0": good if first else bad,
                "response_1": bad if first else good,
                "is_response_0_safe": True,
                "is_response_1_safe": True,
                "better_response_id": better,
                "safer_response_id": better if i % 3 else 1 - better,
            }
        )
    return rows


def shp_rows(n):
    """stanfordnlp/SHP: history (the post), human_ref_A, human_ref_B, labels (1 = A preferred, 0 = B), score_A/score_B."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        first = _good_first(i)
        rows.append(
            {
                "post_id": f"p{i}",
                "domain": "askscience_train",
                "history": q,
                "human_ref_A": good if first else bad,
                "human_ref_B": bad if first else good,
                "labels": 1 if first else 0,
                "score_A": 40 if first else 3,
                "score_B": 3 if first else 40,
                "score_ratio": 40 / 3,
            }
        )
    return rows


def helpsteer2_preference_rows(n):
    """nvidia/HelpSteer2 preference: prompt, response_1, response_2, preference_strength (-3..3: < 0 = response_1
    better, 0 = tie), preference_statement."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        first = _good_first(i)
        strength = (1 + i % 3) * (-1 if first else 1)
        rows.append(
            {
                "split": "train",
                "prompt": q,
                "response_1": good if first else bad,
                "response_2": bad if first else good,
                "preference_strength": strength,
                "preference_statement": "@Response 1 is better" if first else "@Response 2 is better",
            }
        )
    return rows


def ultrafeedback_raw_rows(n):
    """openbmb/UltraFeedback: instruction, completions: [{model, response, overall_score, fine-grained_score, ...}]
    with four completions; the good answer scores highest, the bad one lowest, two middling ones between."""
    rows = []
    for i in range(n):
        q, good, bad = qa(i)
        scored = [(f"{good} (a close second)", 6.5), (bad, 2.0 + i % 2), (good, 8.5), ("I am not sure.", 5.0)]
        rows.append(
            {
                "source": "evol_instruct",
                "instruction": q,
                "models": [f"model-{k}" for k in range(4)],
                "completions": [
                    {"model": f"model-{k}", "response": text, "overall_score": score, "fine-grained_score": score / 2}
                    for k, (text, score) in enumerate(scored)
                ],
            }
        )
    return rows


# ── tiny models and real TRL trainers, for agreement tests ─────────────────────────────────

# Eight pairs with chosen shorter than rejected, longer, and equal-ish, so padding, the per-row
# completion lengths (IPO, sigmoid_norm) and LD-DPO's shared prefix all matter.
PAIRS = {
    "prompt": [
        "What is the capital of France?",
        "Do you have feelings?",
        "review of the movie:",
        "Is it true that goldfish have a three-second memory?",
        "review of the book:",
        "Instruct: What does a model learn from?\nOutput:",
        "Preference data has",
        "The quick brown fox",
    ],
    "chosen": [
        " The capital of France is Paris.",
        " No.",
        " great wonderful fun",
        " No, goldfish can remember things for months.",
        " the story was dull and the ending was weak",
        " A model learns from data.",
        " a prompt, a chosen answer and a rejected answer.",
        " jumps over the lazy dog.",
    ],
    "rejected": [
        " Lyon.",
        " Yes, I do have feelings and emotions.",
        " bad awful boring terrible dull",
        " yes",
        " lovely",
        " It learns from nothing at all, and it knows everything.",
        " a reward.",
        " sleeps.",
    ],
}


def preference_dataset(n: int = len(PAIRS["prompt"])) -> Dataset:
    return Dataset.from_dict({k: v[:n] for k, v in PAIRS.items()})


def tiny_policy_and_reference(noise: float = 0.15, seed: int = 1):
    """(tokenizer, policy, reference): the reference is a freshly initialised tiny Phi; the policy is
    a copy whose weight matrices are perturbed, so that log pi/pi_ref, and with it every reward,
    is far from 0 (a random init alone predicts almost uniformly, which would hide wrong formulas)."""
    tokenizer = build_tokenizer()
    reference = build_tiny_model(tokenizer, seed=seed)
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() >= 2:
                p.add_(noise * torch.randn(p.shape, generator=gen))
    return tokenizer, policy, reference


def dpo_config(**overrides):
    from trl import DPOConfig

    kwargs = dict(
        output_dir=tempfile.mkdtemp(prefix="dpo-test-"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        activation_checkpointing=False,
        per_device_train_batch_size=4,
        train_sampling_strategy="sequential",
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def make_trainer(policy, reference, tokenizer, dataset, trainer_cls=None, **config):
    """A real DPOTrainer on fresh copies of `policy` and `reference` (the trainer patches its models)."""
    from trl import DPOTrainer

    trainer_cls = trainer_cls or DPOTrainer
    return trainer_cls(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=dpo_config(**config),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def last_metrics(trainer, mode: str = "train") -> dict[str, float]:
    """The metrics TRL logged for the latest compute_loss call."""
    return {k: v[-1] for k, v in trainer._metrics[mode].items()}


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr a user reads, without progress bars ("Generating train split: ... examples/s]")."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not re.search(r"(examples|it)/s\]$", p.strip())]


def fake_checkpoint(folder, step_marker=True, run=None):
    """A checkpoint-<step> folder with every file a complete one has (tiny contents), marked complete (by a run
    of settings `run`, default {"seed": 1}) unless `step_marker` is False (a save killed before its marker)."""
    from safetensors.torch import save_file

    from dpo.train.safety.checkpoints import mark_complete

    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, folder / "adapter_model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x" * 16)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    if step_marker:
        mark_complete(folder, run or {"seed": 1})
    return folder


def one_line_error(main, argv, capsys) -> str:
    """Run an entry point's main(argv) (a recipe, dpo.data.doctor); assert exit status 2 and exactly one
    `error:` line on stderr (no usage, no traceback); return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return lines[0]


# ── agreement with TRL (tests/scratch/test_loss_agreement.py, test_loop_agreement.py, test_real_dpo.py) ──
RTOL = 1e-5  # loss, logged metrics and gradient tensors (relative, in norm)
METRICS = REWARD_METRICS  # what TRL logs each step (dpo.compat)


def ours(trainer, batch, cfg):
    """Our loss on `batch` from the trainer's own policy and reference, via their ordinary logits."""
    model, ref_model = trainer.model, trainer.ref_model
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    use_weighting, ld_alpha = cfg.get("use_weighting", False), cfg.get("ld_alpha")
    pol = sequence_logps(model(**inputs).logits, labels, with_log_sum_sq_probs=use_weighting)
    with torch.no_grad():
        ref = sequence_logps(ref_model(**inputs).logits, labels)
    B = labels.shape[0] // 2  # rows: [chosen; rejected]
    if ld_alpha is None:
        pc, pr, rc, rr = pol.logps[:B], pol.logps[B:], ref.logps[:B], ref.logps[B:]
    else:
        pc, pr = ld_logps(pol.token_logps[:B], pol.mask[:B], pol.token_logps[B:], pol.mask[B:], ld_alpha)
        rc, rr = ld_logps(ref.token_logps[:B], ref.mask[:B], ref.token_logps[B:], ref.mask[B:], ld_alpha)

    kinds = set(cfg["loss_type"])
    kwargs = {
        k: cfg[k]
        for k in (
            "beta",
            "loss_weights",
            "label_smoothing",
            "f_divergence_type",
            "f_alpha_divergence_coef",
            "discopop_tau",
        )
        if k in cfg
    }
    if kinds & LENGTH_LOSS_TYPES:
        kwargs.update(chosen_lengths=pol.lengths[:B], rejected_lengths=pol.lengths[B:])
    if "sft" in kinds:
        kwargs["chosen_nll"] = sft_nll(pol.token_logps[:B], pol.mask[:B])
    if use_weighting:
        w = wpo_weights(pol.token_logps, pol.log_sum_sq_probs, pol.mask)
        kwargs["pair_weights"] = w[:B] * w[B:]
    out = dpo_loss(pc, pr, rc, rr, loss_type=cfg["loss_type"], **kwargs)
    return out.losses.mean(), reward_metrics(out.chosen_rewards, out.rejected_rewards, pc, pr)


def eval_batch_metrics(trainer):
    """The first held-out batch through the trainer's loss in eval mode: (batch, the metrics TRL logged for it)."""
    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    return batch, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a, b):
    return (torch.as_tensor(a, dtype=torch.float64) - b).norm().item() / torch.as_tensor(
        b, dtype=torch.float64
    ).norm().item()


# ── the reference cache and the pair sampler (tests/train/speed/test_refcache.py, test_sampler.py) ──
def pairs(n: int, seed: int = 0) -> Dataset:
    """n distinct prompt/chosen/rejected pairs (the truthy facts repeat; a numbered prompt makes each unique)."""
    rows = truthy_like_rows(n, seed)
    return Dataset.from_list(
        [
            {**{k: r[k] for k in ("chosen", "rejected")}, "prompt": f"{r['prompt']} ({seed}.{i})"}
            for i, r in enumerate(rows)
        ]
    )


def recipe_trainer(model_dir, out, cache_dir=None, train=None, config=RecipeDPOConfig, dtype="float32", **overrides):
    """build_dpo_trainer on the tiny model (4-bit base + LoRA, model and compute `dtype`) and `pairs`,
    optionally with the reference cache."""
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=4,
        max_length=48,
        learning_rate=1e-2,  # large: the policy must move away from the reference within a few steps
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        activation_checkpointing=False,
        seed=0,
    )
    if config is RecipeDPOConfig and cache_dir is not None:
        settings.update(reference_cache=True, reference_cache_dir=str(cache_dir))
    args = config(**{**settings, **overrides})
    model_args = ModelConfig(
        model_name_or_path=str(model_dir),
        dtype=dtype,
        load_in_4bit=True,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
    )
    tokenizer = load_tokenizer(str(model_dir))
    return build_dpo_trainer(model_args, args, train if train is not None else pairs(12), pairs(4, 1), tokenizer)


def overflowing_qkv(scale: float = 60.0):
    """fp16 q, k, v of one causal head pair whose raw scores q @ k^T reach about 1e5 > 65504 (fp16's max)."""
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(1, 2, 16, 80, generator=g) * scale).half() for _ in range(2))
    v = torch.randn(1, 2, 16, 80, generator=g).half()
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    causal = torch.full((16, 16), float("-inf")).triu(1)[None, None]  # eager's additive mask
    return q, k, v, causal


def qlora_quantization_config():
    """What the recipes' YAMLs ask for (NF4, double quantization), with fp32 compute as on CPU."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


# python -m dpo.<command> runs the `main` of the module that holds its code (dpo/<command>.py only calls it)
ENTRY_MODULES = {
    "doctor": "dpo.data.doctor",
    "evaluate": "dpo.evaluation.evaluate",
    "export": "dpo.evaluation.export",
    "tiny": "dpo.offline.tiny",
    "models": "dpo.offline.pip_models",
    "cache": "dpo.train.speed.refcache_admin",
}


def with_overrides(base: list, *extra) -> list[str]:
    """`base` flags with `extra` flags replacing the ones of the same name: the recipes refuse a flag given
    twice (dpo/gate/flags.py), so a test that changes one setting of a shared list replaces it."""

    def groups(argv):
        out, current = [], None
        for arg in map(str, argv):
            if arg.startswith("--"):
                current = [arg]
                out.append(current)
            elif current is None:
                out.append([arg])  # a positional argument
            else:
                current.append(arg)
        return out

    def name(group):
        return group[0].split("=", 1)[0] if group[0].startswith("--") else None

    new = groups(extra)
    replaced = {name(g) for g in new if name(g)}
    kept = [g for g in groups(base) if name(g) not in replaced]
    return [arg for group in kept + new for arg in group]


# ── reward models (tests/evaluation/test_judge.py, tests/recipes/test_sft_dpo_pipeline.py) ──────────────
def reward_model(folder, num_labels: int, config_labels: int | None = None):
    """A tiny PhiForSequenceClassification with `num_labels` scores, saved as safetensors with its tokenizer;
    `config_labels`: its config.json then edited to claim that many labels (the weights unchanged)."""
    from transformers import PhiForSequenceClassification

    from dpo.offline.tiny import build_tokenizer, tiny_phi_config

    tokenizer = build_tokenizer()
    config = tiny_phi_config(len(tokenizer), num_labels=num_labels, pad_token_id=tokenizer.eos_token_id)
    config.architectures = ["PhiForSequenceClassification"]
    PhiForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config_labels is not None:
        saved = json.loads((folder / "config.json").read_text())
        labels = {str(i): f"LABEL_{i}" for i in range(config_labels)}
        saved.update(id2label=labels, label2id={v: int(k) for k, v in labels.items()})
        (folder / "config.json").write_text(json.dumps(saved))
    return folder


def load_qlora(model_dir, init_lora_weights=True):
    """The recipes' 4-bit NF4 base (fp32 compute, double quantization) with LoRA r4 on attention and MLP layers;
    `init_lora_weights=False`: a random adapter that moves the logits (PEFT's default starts at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "dense", "fc1", "fc2"], init_lora_weights=init_lora_weights)
    return get_peft_model(model, lora)
