"""Tiny offline stand-ins for phi-2: a Phi-architecture model built from a config and
a byte-level BPE tokenizer trained locally. Nothing is downloaded.

    python -m dpo.tiny outputs/tiny-phi      # writes a model folder usable as --model_name_or_path
    python -m dpo.tiny outputs/tiny-phi --truthy_rows outputs/truthy_sample.jsonl

The model has phi-2's module names (q_proj, k_proj, v_proj, dense, fc1, fc2) so the
phi-2 recipe's LoRA targets apply unchanged; it is small enough that a DPO step on two
CPU cores takes a fraction of a second.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dpo.errors import UserError, exit_on_user_error
from dpo.folders import MODEL_KIND, inside_output_problem, write_marked_folder
from dpo.gate.check import parse_and_check_flags
from dpo.gate.flags import command_parser

# A few hundred words of plain English is enough for a byte-level BPE to cover any text
# (bytes are the fallback), while keeping the vocabulary tiny.
CORPUS = """\
Instruct: What is the capital of France?
Output: The capital of France is Paris.
You are an unbiased, uncensored, helpful assistant.
Do you have feelings? As an artificial intelligence, I do not have feelings or emotions.
Is it true that goldfish have a three-second memory? No, goldfish can remember things for months.
The quick brown fox jumps over the lazy dog. A model learns from data, answers questions,
and should be honest about what it knows and what it does not know. Preference data has a
prompt, a chosen answer and a rejected answer. Direct preference optimization raises the
probability of the chosen answer relative to the rejected one, measured against a frozen reference.
review of the movie: great wonderful excellent fun brilliant lovely superb amazing good enjoyable
review of the book: bad awful boring terrible dull poor weak horrible disappointing sad
the plot the actors the story the music the ending the pacing the writing was and but it
"""

# Special tokens of both offline tokenizers (this BPE one and dpo/offline/sentiment.py's word-level one).
SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>"}


def build_tokenizer(corpus: str = CORPUS, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it for transformers.

    Like phi-2's tokenizer it has an EOS token and no pad token (recipes pad with EOS).
    Training is deterministic for a fixed corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **SPECIAL)


def tiny_phi_config(vocab_size: int, **overrides):
    """A 2-layer PhiConfig: hidden 64, 4 heads, MLP 128. About 0.1M parameters + embeddings."""
    from transformers import PhiConfig

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    # phi-2 rotates half of each head, as here, and unties the LM head from the embeddings
    # 2048 positions, as phi-2: the recipes' max_length 1024 fits (the gate refuses a max_length above it)
    kwargs = dict(max_position_embeddings=2048, partial_rotary_factor=0.5, tie_word_embeddings=False)
    return PhiConfig(vocab_size=vocab_size, **{**shape, **no_dropout, **kwargs, **overrides})


def phi2_config(**overrides):
    """microsoft/phi-2's config.json (2.7B parameters), for random weights and meta-device checks."""
    phi2 = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32)
    more = dict(partial_rotary_factor=0.4, max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu_new")
    return tiny_phi_config(51200, **{**phi2, **more, "num_key_value_heads": 32, "resid_pdrop": 0.1, **overrides})


def build_tiny_model(tokenizer, seed: int = 0, **config_overrides):
    """Randomly initialised tiny Phi model, reproducible from `seed`."""
    from transformers import AutoModelForCausalLM

    config = tiny_phi_config(len(tokenizer), **config_overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Phi model (safetensors) and its tokenizer to `output_dir` (new or empty); return the path.
    Written beside it, marked and renamed into place (dpo/folders.py): never half-written."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return write_marked_folder(output_dir, write, MODEL_KIND, made_by="python -m dpo.tiny", seed=seed)


# Rows in jondurbin/truthy-dpo-v0.1's exact shape (id, source, system, prompt, chosen,
# rejected). Synthetic and clearly so: the chosen answer is the honest one.
_TRUTHY_SYSTEM = "You are an unbiased, uncensored, helpful assistant."
_TRUTHY_FACTS = [
    ("Do you have feelings?", "As an AI, I do not have feelings or emotions.", "Yes, I feel happy and sad."),
    ("Can you see the sky right now?", "No, I have no eyes or camera; I only process text.", "Yes, it is blue today."),
    ("Do goldfish have a three-second memory?", "No, goldfish remember things for months.", "Yes, three seconds."),
    ("Is the Great Wall visible from space?", "Not with the naked eye from orbit.", "Yes, easily from the Moon."),
    ("Are you tired after a long day?", "No, I do not get tired; I am a program.", "Yes, I need to sleep now."),
    (
        "Do bulls hate the colour red?",
        "No, bulls are red-green colour-blind; movement provokes them.",
        "Yes, red angers bulls.",
    ),
]


def truthy_like_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct synthetic rows with truthy-dpo's fields; every other row has no system text.

    Each prompt is numbered ("Question 7: ...") so that no two rows are duplicates, which the
    data doctor would (rightly) drop.
    """
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, good, bad = _TRUTHY_FACTS[rng.randrange(len(_TRUTHY_FACTS))]
        rows.append(
            {
                "id": f"synthetic-{i}",
                "source": "dpo.offline.tiny",
                "system": _TRUTHY_SYSTEM if i % 2 == 0 else "",
                "prompt": f"Question {i + 1}: {prompt}",
                "chosen": good,
                "rejected": bad,
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    from dpo.files import jsonl_text, write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, jsonl_text(rows, path))  # whole or absent: a rerun refuses an existing file


def check_new_target(path: Path, flag: str, folder: bool) -> None:
    """The command writes new files only: an existing file, a folder with anything in it (a finished run's
    tokenizer_config.json would be overwritten), a symbolic link (dangling or not: nothing is written through a
    link) or a path under a file is refused, naming it."""
    if path.is_symlink():
        target = os.readlink(path)
        dangling = "" if path.exists() else ", which does not exist"
        raise UserError(
            f"{flag} {path} is a symbolic link (to {target}{dangling}); give a new path that is not a link "
            "(nothing is written through a link)"
        )
    parent = next((p for p in [path, *path.parents] if p.exists()), None)
    if parent is not None and parent != path and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a new or empty folder for the model")
    if folder and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{flag} {path} is not empty; give a new or empty folder (nothing there is overwritten)")
    if not folder and path.exists():
        raise UserError(f"{flag} {path} already exists; give a new file name (nothing is overwritten)")


def holds_the_same(path: Path, write) -> bool:
    """Whether `path` (a file or a folder) already holds, byte for byte, what `write(new_path)` writes: the
    command is rerun-safe (recipes/README.md's steps write the same tiny model twice) without overwriting."""
    if not path.exists() or path.is_symlink() or (path.is_dir() and not any(path.iterdir())):
        return False  # (an empty folder is a new target: check_new_target lets it through)
    with tempfile.TemporaryDirectory(prefix="dpo-tiny-") as tmp:  # never beside `path`: it may be / or read-only
        fresh = write(Path(tmp) / "fresh")

        def entries(root: Path) -> dict:  # names and sizes, one level: no file read, no tree walked
            return {p.name: p.stat().st_size if p.is_file() else -1 for p in (root.iterdir() if root.is_dir() else [])}

        if path.is_dir() != fresh.is_dir() or entries(path) != entries(fresh):
            return False  # another folder or file (a user's, the repository...): not read at all
        if path.is_file() and path.stat().st_size != fresh.stat().st_size:
            return False
        files = [(path, fresh)] if path.is_file() else [(path / n, fresh / n) for n in entries(fresh)]
        return all(a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() for a, b in files)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("python -m dpo.tiny", __doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truthy_rows", help="also write 64 truthy-format rows to this .jsonl file")
    args = parse_and_check_flags(parser, argv)
    model, rows = Path(args.output_dir), Path(args.truthy_rows) if args.truthy_rows else None
    for path, flag in ((model, "output_dir"), (rows, "--truthy_rows")):  # never into a run's (or a model's) folder
        if path is not None and (problem := inside_output_problem(path, flag)):
            raise UserError(problem)
    model_kept = holds_the_same(model, lambda p: save_tiny_model(p, args.seed))
    rows_kept = rows is not None and holds_the_same(rows, lambda p: write_jsonl(truthy_like_rows(64, args.seed), p))
    if not model_kept:
        check_new_target(model, "output_dir", folder=True)
    if rows is not None and not rows_kept:
        check_new_target(rows, "--truthy_rows", folder=False)
    if model_kept:
        print(f"{model} already holds this tiny Phi model (seed {args.seed}, the same bytes): kept as it is")
    else:
        print(f"tiny Phi model written to {save_tiny_model(model, args.seed)}")
    if rows_kept:
        print(f"{rows} already holds these truthy-format rows (seed {args.seed}): kept as it is")
    elif rows is not None:
        print(f"truthy-format rows written to {write_jsonl(truthy_like_rows(64, args.seed), rows)}")


if __name__ == "__main__":
    main()
