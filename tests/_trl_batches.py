"""Test helper: a tiny preference dataset, a policy/reference pair of tiny Phi models, and real
TRL DPOTrainers built on them, so that our from-scratch DPO can be compared with TRL itself.

TRL internals touched here (pinned TRL 1.16): `trainer._metrics["train"]` holds one value per
`compute_loss` call for each logged metric; `DPOConfig(train_sampling_strategy="sequential")`
makes the dataloader deterministic.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from datasets import Dataset

from dpo.tiny import build_tiny_model, build_tokenizer

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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread. On a small shared CPU, two OpenMP
    threads that wait on each other make every op of these tiny models 10-50x slower; the
    comparisons run TRL and our code under the same setting, so results do not depend on it.
    Imported into a test module, this applies to that module only and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
