"""pi_theta's and pi_ref's answers for `python -m dpo.evaluate`: greedy and sampled, from one decode loop.

Generating a token on a CPU costs about one read of every weight of the model (the matmuls of a step feed a
handful of rows: measured on SmolLM2-135M, 8 in 10 of a step's time is in its matmuls, and 6 rows cost a step
about 1.15x what 3 do). So the four generations (greedy and sampled, of each model) share one decode loop: one
row per prompt and kind, peft's mixed-adapter batch giving each row its model, and the sampled rows drawing
exactly what a loop of their own would (dpo/evaluation/sampling.py `_RowChoice`). A prompt is fed once per model,
its greedy and sampled rows sharing that forward's KV cache (feeding a prompt costs a forward over all its tokens).
Before, the generations took three loops (the greedy ones already shared one) and fed each prompt four times;
`one_loop=False` keeps that path, to compare (benchmarks/bench_evaluate.py).
"""

from __future__ import annotations

GENERATION_MODES = ("greedy", "sampled")


def as_model(model, name: str):
    """Context in which the one loaded model is pi_theta ("policy") or pi_ref ("reference")."""
    from dpo.compat import use_adapter
    from dpo.train.adapters import as_reference

    return use_adapter(model, "policy") if name == "policy" else as_reference(model)


def answers_of_both(model, tokenizer, prompt_ids, max_new_tokens: int, seed: int, bs: int, one_loop=True) -> dict:
    """{(mode, "policy" | "reference"): answers}, each the answers a decode loop of its own gives: batch b of a
    sampled loop draws as after torch.manual_seed(seed + b). One loop for all four (batches of 4 x `bs` rows), or
    with `one_loop` False the path before it (`answers_in_loops`). DoRA (no mixed-adapter batch in peft): 4 loops."""
    from dpo.compat import REFERENCE_ADAPTER
    from dpo.evaluation.sampling import Sampling, generate_ids_per_kind

    if not one_loop or any(getattr(config, "use_dora", False) for config in model.peft_config.values()):
        return answers_in_loops(model, tokenizer, prompt_ids, max_new_tokens, seed, bs)
    reference = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else "__base__"  # peft: no adapter
    adapter = {"policy": "policy", "reference": reference}
    kinds = tuple((adapter[name], mode == "sampled") for mode in GENERATION_MODES for name in adapter)
    settings = Sampling(max_new_tokens=max_new_tokens, batch_size=bs, do_sample=False)
    with as_model(model, "policy"):  # adapters enabled; each row names its own
        desc = "answers: greedy and sampled, policy and reference"
        answers = generate_ids_per_kind(model, tokenizer, prompt_ids, kinds, settings, seed, desc)
    return {(mode, name): answers[adapter[name], mode == "sampled"] for mode in GENERATION_MODES for name in adapter}


def answers_in_loops(model, tokenizer, prompt_ids, max_new_tokens: int, seed: int, bs: int) -> dict:
    """The same answers in 3 decode loops (4 with DoRA): greedy of both models in one, a sampled loop per model."""
    from dpo.compat import REFERENCE_ADAPTER
    from dpo.evaluation.sampling import Sampling, generate_ids, generate_ids_per_adapter

    reference = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else "__base__"
    answers, greedy = {}, Sampling(max_new_tokens=max_new_tokens, batch_size=bs, do_sample=False)
    if not any(getattr(config, "use_dora", False) for config in model.peft_config.values()):
        with as_model(model, "policy"):
            desc, pair = "greedy answers, policy and reference", ("policy", reference)
            both = generate_ids_per_adapter(model, tokenizer, prompt_ids, pair, greedy, seed, desc)
        answers["greedy", "policy"], answers["greedy", "reference"] = both["policy"], both[reference]
    for mode, name in ((m, n) for m in GENERATION_MODES for n in ("policy", "reference")):
        if (mode, name) not in answers:
            settings = Sampling(max_new_tokens=max_new_tokens, batch_size=bs, do_sample=mode == "sampled")
            with as_model(model, name):
                answers[mode, name] = generate_ids(
                    model, tokenizer, prompt_ids, settings, seed, f"{mode} answers, {name}"
                )
    return answers
