"""Statistics and the reward-model judge behind `python -m dpo.evaluate`.

Intervals are 95%: Wilson score intervals for rates (accuracy, win rate; better than the
normal approximation near 0 and 1 and for small n) and mean +- 1.96 standard errors for means
(margins, KL). The length-controlled win rate follows AlpacaEval 2.0's idea: fit
P(policy wins) = sigmoid(a + b * length difference / its std) and report sigmoid(a), the win
rate the policy would have if both answers were equally long. A policy that wins only by
writing longer answers has a high win rate and a length-controlled one near 0.5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dpo.errors import UserError

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson(rate: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a rate observed over n trials (ties may count as halves)."""
    if n == 0:
        return (0.0, 1.0)
    z2 = Z95 * Z95
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): mean +- 1.96 standard errors."""
    x = torch.as_tensor(values, dtype=torch.float64)
    mean = x.mean().item()
    se = (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("inf")
    return mean, mean - Z95 * se, mean + Z95 * se


def outcomes(policy_scores, reference_scores) -> list[float]:
    """1 where the policy's answer scores higher, 0 where lower, 0.5 on a tie."""
    return [1.0 if p > r else 0.0 if p < r else 0.5 for p, r in zip(policy_scores, reference_scores)]


def length_controlled_win_rate(wins, length_diff, steps: int = 200) -> float:
    """sigmoid(a) of the logistic fit wins ~ sigmoid(a + b * length_diff / std(length_diff)).

    `wins` may hold 0.5 for ties (a soft label). Fitted by Newton's method on two parameters,
    with a tiny ridge on b so a perfectly separable set still converges.
    """
    y = torch.as_tensor(wins, dtype=torch.float64)
    d = torch.as_tensor(length_diff, dtype=torch.float64)
    if d.std() == 0 or len(d) < 2:
        return y.mean().item()  # nothing to control for
    x = torch.stack([torch.ones_like(d), d / d.std()], 1)
    w = torch.zeros(2, dtype=torch.float64)
    ridge = torch.diag(torch.tensor([0.0, 1e-3], dtype=torch.float64))
    for _ in range(steps):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge @ w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + ridge + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w -= step
        if step.abs().max() < 1e-10:
            break
    return torch.sigmoid(w[0]).item()


def win_rates(policy_scores, reference_scores, policy_lengths, reference_lengths) -> dict:
    """Win rate of the policy over the reference with its 95% interval, and the length-controlled win rate."""
    wins = outcomes(policy_scores, reference_scores)
    n = len(wins)
    rate = sum(wins) / n
    low, high = wilson(rate, n)
    diff = [p - r for p, r in zip(policy_lengths, reference_lengths)]
    return {
        "n": n,
        "win_rate": rate,
        "win_rate_low": low,
        "win_rate_high": high,
        "ties": sum(w == 0.5 for w in wins),
        "length_controlled_win_rate": length_controlled_win_rate(wins, diff),
    }


def check_reward_model(name: str, setting: str = "--reward_model") -> None:
    """Before any weights load: `name` must be a sequence-classification model with one score per text
    (its config's architectures and num_labels), in safetensors, whose weights' shapes (read from the
    safetensors headers of a local folder) are the ones its config builds. A causal LM given instead would load
    with a freshly initialised random `score` head and its "win rates" would be noise. `setting`: the name the
    user gave it under (evaluate's --reward_model, the rounds recipe's reward), for the messages."""
    from dpo.train.model_checks import check_safetensors, load_model_config

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{setting} {name} is a file, not a model folder: pass a sequence-classification reward model's folder "
            "(config.json, tokenizer files, model.safetensors) or its hub id"
        )
    config = load_model_config(name, flag=setting)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{setting} {name} is not a reward model: its config names {architectures or 'no architecture'}, "
            "not a *ForSequenceClassification one, so it has no trained score head (transformers would add a random "
            "one). Pass a sequence-classification reward model"
        )
    if config.num_labels != 1:
        raise UserError(
            f"{setting} {name} gives {config.num_labels} scores per text (num_labels {config.num_labels}); "
            "a reward model gives one"
        )
    check_safetensors(name, flag=setting, auto_class="AutoModelForSequenceClassification")
    if path.is_dir():
        check_weight_shapes(path, config, setting)


def saved_shapes(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (file, shape) of a model folder's safetensors weights (model.safetensors, or the shards its
    index names), from the headers alone: no tensor is read. check_safetensors has checked the files first."""
    from safetensors import safe_open

    from dpo.files import confined

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    shapes = {}
    for file in files:
        with safe_open(confined(folder, file, index), framework="pt") as weights:
            for key in weights.keys():
                shapes[key] = (file, list(weights.get_slice(key).get_shape()))
    return shapes


def check_weight_shapes(folder: Path, config, setting: str) -> None:
    """Every saved tensor the config's model also has must have the shape the config gives it (a config edited
    to num_labels 1 over a two-label head's score.weight [2, H] failed inside from_pretrained, after a table of
    mismatches). The model is built on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            expected = AutoModelForSequenceClassification.from_config(config).state_dict()
    except Exception:  # a config transformers cannot build: from_pretrained names the problem
        return
    wrong = [
        (key, file, shape, list(expected[key].shape))
        for key, (file, shape) in saved_shapes(folder).items()
        if key in expected and shape != list(expected[key].shape)
    ]
    if wrong:
        key, file, shape, want = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise UserError(
            f"{setting} {folder}: {key} is {shape} in {file}, but its config.json (num_labels {config.num_labels}) "
            f"makes it {want}{more}: the config does not describe these weights (edited, or from another model); "
            "use the config.json the weights were saved with"
        )


def load_reward_model(name: str, device, setting: str = "--reward_model"):
    """A sequence-classification reward model (hub id or folder; one score per text) and its tokenizer.
    Checked first (check_reward_model); a head missing from its weights, or a tensor of another shape than its
    config gives (a hub model, whose headers are not read before), is refused after loading."""
    from transformers import AutoModelForSequenceClassification

    from dpo.train.model_checks import load_tokenizer

    check_reward_model(name, setting)
    tokenizer = load_tokenizer(name, flag=setting)  # pads with EOS when it has no pad token
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report (a table of mismatched or missing keys): said below in a line
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, use_safetensors=True, num_labels=1, output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["mismatched_keys"]:
        key, saved, built = sorted(info["mismatched_keys"])[0]
        raise UserError(
            f"{setting} {name}: its weights do not fit its config: {key} is {list(saved)} in the weights, its config "
            f"makes it {list(built)}; use the config the weights were saved with"
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"{setting} {name}: its weights lack {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
            "(transformers would initialise them at random): not a trained reward model"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def judge_text(tokenizer, prompt: str, answer: str) -> str:
    """What the reward model reads: its own chat template when it has one, else prompt + answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + answer


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 8, desc=None) -> list[float]:
    """The reward model's scalar score of each (prompt, answer); with `desc`, under a progress bar."""
    from tqdm.auto import tqdm

    out = []
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=desc is None):
        texts = [judge_text(tokenizer, p, a) for p, a in zip(prompts[i : i + batch_size], answers[i : i + batch_size])]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
        out += model(**batch).logits[:, 0].float().tolist()
    return out
