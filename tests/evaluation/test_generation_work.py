"""The sampler `python -m dpo.evaluate` and the rounds draw their answers with (dpo/evaluation/sampling.py) does
one model forward per generated token, and every forward after the prompt's feeds one new token per row: the KV
cache is in use. Without it, each step would run over the whole sequence so far (quadratic in the answer length).
The work is counted (forwards and the tokens each one is fed), never timed."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model with a LoRA adapter on it, as evaluate holds pi_theta (a PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as the recipes set it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="policy")
    return model.eval(), tokenizer


def counted_forwards(model) -> tuple[list[tuple[int, int]], object]:
    """(the shape of input_ids at each forward of the causal LM, the hook's handle)."""
    shapes = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    return shapes, model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_the_sampler_makes_one_forward_per_generated_token_over_the_kv_cache(policy, do_sample):
    from dpo.evaluation.sampling import Sampling, generate_ids

    model, tokenizer = policy
    prompts = ["Instruct: What is the capital of France?\nOutput:", "Do you have feelings?", "review of the movie:"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    settings = Sampling(max_new_tokens=12, batch_size=8, do_sample=do_sample)
    shapes, handle = counted_forwards(model)
    try:
        answers = generate_ids(model, tokenizer, prompt_ids, settings, seed=0, desc="answers")
    finally:
        handle.remove()
    steps = max(map(len, answers))  # generation steps: the batch runs until its longest answer ends
    assert 1 <= steps <= settings.max_new_tokens
    assert len(shapes) == steps, f"{len(shapes)} forwards for {steps} generated tokens"
    width = max(map(len, prompt_ids))
    assert shapes[0] == (len(prompts), width)  # the prompts once (left-padded to the longest) ...
    assert all(shape == (len(prompts), 1) for shape in shapes[1:]), shapes  # ... then one new token a row


def test_evaluate_takes_its_cpu_threads_from_torch_threads(tmp_path, capsys, no_weights_load):
    """--torch_threads 1 is how a CPU shared with other work evaluates: there two threads that wait on each other
    made each matmul of a generation step 5-15x slower than one (measured under load). It is set before the run
    folder is read (here: a missing one, exit 2), and 0 is refused by the settings gate."""
    from dpo.evaluation.evaluate import main

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for value, expected in (("1", 1), ("0", 1)):  # 0: refused, the threads stay as they were
            with pytest.raises(SystemExit) as stop:
                main([str(tmp_path / "missing"), "--torch_threads", value])
            assert stop.value.code == 2 and torch.get_num_threads() == expected
        err = capsys.readouterr().err.splitlines()
        assert "run folder not found" in err[0] and "torch_threads" in err[1], err
    finally:
        torch.set_num_threads(threads)


def test_evaluate_without_torch_threads_passes_the_settings_gate(tmp_path, capsys, no_weights_load):
    """--torch_threads is optional: left out, torch keeps its own threads. The gate refused its unset value
    ("torch_threads must be >= 1; got null"), so every evaluate without the flag ended there."""
    from dpo.evaluation.evaluate import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "missing")])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and err == [f"error: run folder not found: {tmp_path / 'missing'}"], err


@pytest.fixture(params=["base", "sft_adapter", "4bit_dequantized"])
def run_models(request, tiny_model_dir):
    """pi_theta and pi_ref on one model as evaluate holds them: adapter "policy", and pi_ref the base with adapters
    disabled or (a run from an SFT adapter) adapter "ref"; "4bit_dequantized": the adapters on a 4-bit NF4 base,
    then its layers dequantized for inference, as evaluate does on a CPU (peft's bnb LoRA layers around nn.Linear).
    Random adapters, so that the models answer differently."""
    from helpers import qlora_quantization_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.compat import REFERENCE_ADAPTER
    from dpo.train.speed.dequant import dequantized_4bit_layers

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    four_bit = {"quantization_config": qlora_quantization_config()} if request.param == "4bit_dequantized" else {}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, **four_bit)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="policy")
    if request.param != "base":
        model.add_adapter(REFERENCE_ADAPTER, config)
    if four_bit:
        assert dequantized_4bit_layers(model, available=2**40)[0] > 0
    return model.eval(), tokenizer


@pytest.mark.parametrize("one_loop", [True, False], ids=["one_loop", "three_loops"])
def test_evaluate_answers_with_both_models_greedy_and_sampled_in_one_decode_loop(run_models, one_loop):
    """Evaluate's four generations (greedy and sampled, pi_theta and pi_ref) took four decode loops, each up to
    max_new_tokens forwards over the whole model; then three (the greedy ones shared one, peft's mixed-adapter
    batch); now one: a row per prompt and kind, the sampled rows of each model drawing from a generator seeded as
    its own loop's batch (dpo/evaluation/sampling.py _RowChoice), and each prompt fed once per model (the forward over
    its tokens shared by the model's greedy and sampled rows). The answers are token for token those of four
    separate loops, the sampled ones included (same seeds, same draws). `one_loop` False: the three-loop path
    benchmarks/bench_evaluate.py compares against. Counted: decode loops (forwards fed a whole prompt) and
    forwards, never time."""
    from dpo.evaluation.answers import GENERATION_MODES, answers_of_both, as_model
    from dpo.evaluation.sampling import Sampling, generate_ids

    model, tokenizer = run_models
    prompts = ["Instruct: What is the capital of France?\nOutput:", "Do you have feelings?", "review of the movie:"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    new_tokens, bs = 10, 2  # two batches per model: the pairing of rows into batches (and seeds) is exercised
    separate = {}
    for mode in GENERATION_MODES:
        for name in ("policy", "reference"):
            settings = Sampling(max_new_tokens=new_tokens, batch_size=bs, do_sample=mode == "sampled")
            with as_model(model, name):
                separate[mode, name] = generate_ids(model, tokenizer, prompt_ids, settings, seed=3)
    for mode in GENERATION_MODES:  # else a mix-up of the models or of the modes would pass unseen
        assert separate[mode, "policy"] != separate[mode, "reference"], f"the models agree ({mode}): nothing checked"
    assert separate["greedy", "policy"] != separate["sampled", "policy"], "sampling drew the argmax: nothing checked"

    shapes, handle = counted_forwards(model)
    try:
        answers = answers_of_both(model, tokenizer, prompt_ids, new_tokens, seed=3, bs=bs, one_loop=one_loop)
    finally:
        handle.remove()
    assert answers == separate
    loops = [shape for shape in shapes if shape[1] > 1]  # a loop's first forward reads the prompts
    batches = -(-len(prompts) // bs)
    want = 1 if one_loop else 3
    assert len(loops) == want * batches, f"{len(loops)} decode loops, want {want * batches}"
    # prompts fed per loop: one loop: each once per model, 2 x (2 + 1) (its greedy and sampled rows share that
    # forward's KV cache); three: greedy 2 x (2 + 1), sampled 2 + 1 per model
    assert sorted(shape[0] for shape in loops) == ([2, 4] if one_loop else [1, 1, 2, 2, 2, 4])
    # rows a step feeds one token each: one loop: 4 kinds x (2 + 1)
    assert {shape[0] for shape in shapes if shape[1] == 1} == ({4, 8} if one_loop else {1, 2, 4})
    assert len(shapes) <= len(loops) * new_tokens  # and still one forward per generated token (KV cache)
