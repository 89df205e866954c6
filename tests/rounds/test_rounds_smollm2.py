"""The rounds recipe on the real model path, offline: SmolLM2-135M-Instruct (tests/conftest.py: smollm2_dir) in
4-bit + LoRA answers real Anthropic HH-RLHF prompts (data/hh-rlhf/), a sequence-classification reward model
built here (a tiny Llama with SmolLM2's tokenizer and a chat template of its own, safetensors) scores the
answers; two rounds, the second one run by asking the finished one-round folder for more.

Kept within `make test` time: 8 short single-turn prompts (4 per round), K = 3, 8 new tokens, one DPO step a
round, one intra-op thread."""

import gzip
import json

import pytest
import torch
import yaml
from helpers import HH_FILE, load_recipe

from dpo.files import file_sha256
from dpo.rounds.pairing import make_pairs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# The reward model's own template: nothing like SmolLM2's <|im_start|>role ... <|im_end|> turns, so the log
# and the scores tell which template the reward model read.
RM_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
K = 3


def short_hh_rows(path, n: int = 8, longest: int = 60) -> None:
    """The first `n` rows of the real HH-RLHF file with a single human turn of at most `longest` characters,
    written unchanged (HH's own chosen/rejected layout: the recipe's loader reads the prompts out of it)."""
    rows = []
    with gzip.open(HH_FILE, "rt") as f:
        for line in f:
            row = json.loads(line)
            head = row["chosen"].split("\n\nAssistant:")[0]
            if row["chosen"].count("\n\nHuman:") == 1 and len(head) <= longest + len("\n\nHuman: "):
                rows.append(row)
            if len(rows) == n:
                break
    assert len(rows) == n
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def reward_model(smollm2_dir, folder):
    """A tiny LlamaForSequenceClassification (one score, random weights: the scores only need to differ between
    texts) with SmolLM2's tokenizer and RM_TEMPLATE, saved as safetensors; returns its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = RM_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def settings(smollm2_dir, prompts, reward, output_dir) -> dict:
    return {
        "model_name_or_path": str(smollm2_dir),
        "prompts": str(prompts),
        "reward": str(reward),
        "rounds": 1,
        "prompts_per_round": 4,
        "samples_per_prompt": K,
        "max_new_tokens": 8,
        "generation_batch_size": 12,
        "eval_prompts": 2,  # 8 prompts: 2 held out, 6 to train on (round 2's slice wraps around)
        "min_pairs": 2,
        "test_size": 0.25,
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "max_length": 128,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "num_train_epochs": 1,
        "activation_checkpointing": False,
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "torch_threads": 1,
        "output_dir": str(output_dir),
    }


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(folder):
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def scores(folder, texts: list[str]) -> list[float]:
    """The reward model's scores of `texts`, computed here without the recipe's code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_two_rounds_of_smollm2_on_hh_prompts_with_a_local_reward_model(smollm2_dir, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    prompts, rm, out = tmp_path / "hh.jsonl", tmp_path / "rm", tmp_path / "run"
    short_hh_rows(prompts)
    rm_tokenizer = reward_model(smollm2_dir, rm)
    config = tmp_path / "rounds.yaml"
    config.write_text(yaml.safe_dump(settings(smollm2_dir, prompts, rm, out)))
    recipe = load_recipe("dpo_rounds")

    summary = recipe.main(["--config", str(config)])  # round 1
    log = capsys.readouterr()
    log = log.out + log.err
    # Both chat templates applied, each shown once: the policy continues SmolLM2's, the reward model reads its own.
    [policy_line] = [line for line in log.splitlines() if "continues, e.g.:" in line]
    assert "<|im_start|>user\\n" in policy_line and policy_line.endswith("<|im_start|>assistant\\n'")
    [reward_line] = [line for line in log.splitlines() if "reads, e.g.:" in line]
    assert "[USER] " in reward_line and "[ASSISTANT] " in reward_line and "<|im_start|>" not in reward_line

    samples = jsonl(out / "round-1" / "samples.jsonl")
    assert len(samples) == 4 and all(len(s["answers"]) == K for s in samples)
    assert all(isinstance(s["prompt"], list) and s["prompt"][-1]["role"] == "user" for s in samples)
    # The stored rewards are the reward model's scores of its own template's text, not of the policy's.
    policy_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    conversations = [
        [*s["prompt"], {"role": "assistant", "content": a["text"]}] for s in samples for a in s["answers"]
    ]
    stored = [a["reward"] for s in samples for a in s["answers"]]
    own = scores(rm, [rm_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations])
    # float32, the same weights and text batched with padding (recipe) or one at a time (here): summation order only;
    # relative to the largest score, never elementwise (a score near 0 has no relative precision); the 1e-5 leaves
    # ~80 float32 ulps for another CPU's summation order
    gap = max(abs(a - b) for a, b in zip(stored, own))
    assert len(stored) == len(own) and gap <= 1e-5 * max(1.0, max(map(abs, own)))
    theirs = scores(rm, [policy_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations])
    assert stored != pytest.approx(theirs, rel=1e-3)
    # Pairing: the rule's pairs of these samples, never a text with itself.
    pairs = jsonl(out / "round-1" / "pairs.jsonl")
    expected, counts = make_pairs(samples, "max_min", 0.0, seed=0 + 1000 * 1)
    assert pairs == expected and summary["rounds"][0]["pairs"] == counts and counts["kept"] >= 2
    assert all(p["chosen"] != p["rejected"] and p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert (out / "round-1" / "run_complete.json").is_file() and summary["rounds"][0]["dpo_steps"] == 1

    # Asked for two rounds, the finished folder runs only round 2, from round 1's adapter; round 1 stays as it was.
    round_1 = snapshot(out / "round-1")
    summary = recipe.main(["--config", str(config), "--rounds", "2"])
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and snapshot(out / "round-1") == round_1
    assert "round 1: done earlier" in capsys.readouterr().out
    assert (out / "round-2" / "run_complete.json").is_file() and len(jsonl(out / "round-2" / "samples.jsonl")) == 4
    assert json.loads((out / "rounds.json").read_text())["rounds"][1] == summary["rounds"][1]

    # The same command again: nothing left to do, and no weights load to find that out.
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded for a finished run")

    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    again = recipe.main(["--config", str(config), "--rounds", "2"])
    assert again["rounds"] == summary["rounds"] and snapshot(out / "round-1") == round_1
