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
import re
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from dpo.tiny import build_tiny_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Real human preferences: Anthropic HH-RLHF harmless-base test split, the original file (data/hh-rlhf/README.md).
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


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
        gradient_checkpointing=False,
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


def one_line_error(main, argv, capsys) -> str:
    """Run an entry point's main(argv) (a recipe, dpo.doctor); assert exit status 2 and exactly one
    `error:` line on stderr (no usage, no traceback); return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err and "Traceback" not in err
    return lines[0]
