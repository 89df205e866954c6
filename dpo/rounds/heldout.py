"""After each round, on held-out prompts: the policy's reward and KL(pi || pi_initial), with 95% intervals.

One answer per prompt is sampled from the policy at temperature 1 with no top-p cut (so the sample is from
pi itself and the Monte-Carlo KL = E_y~pi[log pi(y|x) - log pi_initial(y|x)] is unbiased), scored by the
reward, and scored again by the initial model: the base with adapters disabled, or the starting SFT
adapter when the run began from one (loaded beside the policy as adapter "initial").
"""

from __future__ import annotations

import torch

from dpo.compat import use_adapter
from dpo.evaluation.judge import mean_interval
from dpo.evaluation.sampling import Sampling, completion_text, generate_ids, prompt_token_ids
from dpo.scratch.logps import completion_logps

INITIAL_ADAPTER = "initial"


def initial_model_context(model, sft_adapter: str | None):
    """The context in which the PeftModel `model` computes pi_initial."""
    if sft_adapter is None:
        return use_adapter(model, None)
    if INITIAL_ADAPTER not in model.peft_config:
        from dpo.train.adapters import put_adapter

        put_adapter(model, sft_adapter, INITIAL_ADAPTER)
    return use_adapter(model, INITIAL_ADAPTER)


@torch.no_grad()
def heldout_metrics(model, tokenizer, prompts: list, reward, max_new_tokens: int, seed: int, sft_adapter=None) -> dict:
    """{reward, reward_low, reward_high, kl, kl_low, kl_high, length, n} for `model` (a PeftModel whose
    active adapter is the policy) on `prompts`; `reward(prompts, texts)` scores the answers."""
    settings = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, batch_size=256)
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    completions = generate_ids(model, tokenizer, prompt_ids, settings, seed)
    texts = [completion_text(tokenizer, p, c) for p, c in zip(prompt_ids, completions)]
    pad = tokenizer.pad_token_id
    rewards = reward(prompts, texts, label=lambda i: f"held-out prompt {i + 1}")
    r, r_low, r_high = mean_interval(rewards)
    if hasattr(model, "peft_config"):
        policy = completion_logps(model, prompt_ids, completions, pad)
        with initial_model_context(model, sft_adapter):
            initial = completion_logps(model, prompt_ids, completions, pad)
        kl, kl_low, kl_high = mean_interval((policy - initial).double().tolist())
    else:  # the bare starting model: it is pi_initial
        kl = kl_low = kl_high = 0.0
    return {
        "reward": r,
        "reward_low": r_low,
        "reward_high": r_high,
        "kl": kl,
        "kl_low": kl_low,
        "kl_high": kl_high,
        "length": sum(map(len, completions)) / len(completions),
        "n": len(prompts),
    }
