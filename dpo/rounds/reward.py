"""The reward that ranks sampled answers: a Python function 'module:function' taking (prompt, completion)
-> float, or a sequence-classification reward model read through its own chat template.

A reward model is checked before its weights load (dpo.evaluation.judge.check_reward_model: a
*ForSequenceClassification architecture, one score, safetensors): a causal LM given instead would get a
random score head, and its rankings would be noise. The text it scores is shown once in the log, so a
template that does not fit (another model's special tokens, no assistant turn) is seen, not silent.
"""

from __future__ import annotations

import importlib
import math
import numbers
from pathlib import Path

import torch

from dpo.errors import UserError
from dpo.log import log
from dpo.rounds.settings import FUNCTION


def _as_messages(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def reward_model_text(tokenizer, prompt, answer: str) -> str:
    """What the reward model reads: the conversation and the answer through its own chat template, else
    the prompt's text followed by the answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*_as_messages(prompt), {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant: " + answer
    return prompt + answer


class FunctionReward:
    """A Python function (prompt, completion) -> float."""

    def __init__(self, spec: str):
        module_name, name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"reward {spec}: cannot import {module_name} ({err}); is it on PYTHONPATH?") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise UserError(f"reward {spec}: {module_name} has no function {name}")
        self.spec, self.function = spec, function

    def describe(self) -> str:
        return f"the function {self.spec}(prompt, completion)"

    def __call__(self, prompts: list, answers: list[str]) -> list[float]:
        scores = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            value = self.function(prompt, answer)
            # any real number: int, float, numpy's floats and ints (a NumPy-based reward returns np.float32)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise UserError(
                    f"reward {self.spec} returned {value!r} for answer {i + 1} ({answer[:40]!r}); it must return a "
                    "finite number"
                )
            scores.append(float(value))
        return scores


class ModelReward:
    """A sequence-classification reward model and its tokenizer (loaded by `load`, after `check`)."""

    def __init__(self, name: str, batch_size: int = 8):
        from dpo.evaluation.judge import check_reward_model

        check_reward_model(name, "reward")  # before any weights load; also: safetensors only
        self.name, self.batch_size, self.model, self.tokenizer, self.shown = name, batch_size, None, None, False

    def describe(self) -> str:
        return f"the reward model {self.name}"

    def load(self, device) -> None:
        from dpo.evaluation.judge import load_reward_model

        if self.model is None:
            self.model, self.tokenizer = load_reward_model(self.name, device, "reward")

    @torch.no_grad()
    def __call__(self, prompts: list, answers: list[str]) -> list[float]:
        self.load(torch.device("cpu"))
        texts = [reward_model_text(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        if texts and not self.shown:
            template = (
                "its own chat template" if getattr(self.tokenizer, "chat_template", None) else "no chat template"
            )
            log(f"reward model {self.name} ({template}) reads, e.g.: {texts[0]!r}")
            self.shown = True
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True)
            scores += self.model(**batch.to(device)).logits[:, 0].float().tolist()
        return scores


def make_reward(spec: str):
    """The reward named by the `reward` setting; a model is checked (not loaded) here."""
    if FUNCTION.fullmatch(spec) and not Path(spec).expanduser().exists():
        return FunctionReward(spec)
    return ModelReward(spec)
