"""phi-2's architecture with random weights, and truthy-shaped pairs of a given length, for
benchmarks/bench_gpu.py (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def phi2_config(scale: str, tokenizer):
    from dpo.offline.tiny import phi2_config, tiny_phi_config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if scale == "tiny":
        return tiny_phi_config(len(tokenizer), partial_rotary_factor=0.4, max_position_embeddings=2048, **ids)
    return phi2_config(**ids)  # microsoft/phi-2's config.json


BUILT = "random_model.json"  # make_model's record, written last: the folder is whole, and of this scale


def built_model(scale: str, folder: Path) -> bool:
    """True when `folder` holds a whole model make_model built at `scale`, to reuse (a killed build leaves
    no folder there: it is renamed into place whole; another scale's is rebuilt)."""
    try:
        return json.loads((Path(folder) / BUILT).read_text()).get("scale") == scale
    except (OSError, ValueError, AttributeError):
        return False


def make_model(scale: str, folder: Path) -> dict:
    """Random weights of the architecture, built on the GPU when there is one, saved as fp16 safetensors
    (phi-2's hub dtype) with the offline tokenizer (dpo/offline/tiny.py; its 512 ids are a subset of the vocabulary),
    into a staging folder renamed into place. A folder there that make_model did not build is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo.files import json_text
    from dpo.offline.tiny import build_tokenizer

    folder = Path(folder)
    if folder.exists() and not (folder / BUILT).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        sys.exit(
            f"error: {folder} holds no {BUILT} (a model built before the record was kept, or not by this benchmark): "
            "delete it or pick another --workdir"
        )
    tokenizer = build_tokenizer()
    config = phi2_config(scale, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / BUILT).write_text(json_text({"scale": scale}, folder / BUILT) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():  # empty, or ours at another scale or half-used: replaced
        shutil.rmtree(folder)
    os.replace(staging, folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"folder": str(folder), "parameters": params, "config": config.to_dict()}


def synthetic_pairs(tokenizer, n: int, length: int, seed: int = 0):
    """`n` truthy-shaped rows in phi-2's QA format: chosen answers longer than `length` tokens with the
    prompt (TRL cuts them to max_length), rejected ones about 3/4 of it."""
    import random

    from datasets import Dataset

    from dpo.data.formats import phi2_qa_format
    from dpo.offline.tiny import CORPUS, truthy_like_rows

    words = CORPUS.split()
    per_word = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)
    rng = random.Random(seed)

    def answer(start: str, tokens: int) -> str:
        return start + " " + " ".join(rng.choice(words) for _ in range(int(tokens / per_word)))

    rows = []
    for row in truthy_like_rows(n, seed):
        prompt = len(tokenizer(phi2_qa_format(row)["prompt"])["input_ids"])
        chosen, rejected = answer(row["chosen"], 1.1 * length), answer(row["rejected"], 0.75 * length - prompt)
        rows.append(phi2_qa_format({**row, "chosen": chosen, "rejected": rejected}))
    return Dataset.from_list(rows)
