"""The DPO paper's controlled-sentiment experiment (IMDb, section 6.1) in miniature, offline.

    python recipes/dpo_sentiment_tiny.py          # the whole pipeline (`make demo`); see that file
    python -m dpo.offline.sentiment                       # print a few prompts, reviews and their rewards

This module holds the task and phases 1-2 (pi_ref, preference pairs); phase 4 (evaluation,
report) is dpo/offline/sentiment_eval.py.

The paper: prompts are prefixes of IMDb reviews, pi_ref is GPT-2 fine-tuned on the reviews,
preference pairs are two samples from pi_ref labelled by a sentiment classifier (the
ground-truth reward), and DPO should raise that reward for the least KL from pi_ref.

Here the language is small enough to learn from scratch in seconds on a CPU:

    prompt      "review of sequel:"                    (one of 24 topics)
    completion  " superb acting, dull plot, loud music."   (1-4 "<adjective> <aspect>" phrases)
    reward      r(x, y) = (#positive words - #negative words) / #words      in [-1, 1]

Every word of the vocabulary is positive, negative or neutral (aspects, "review", "of",
neutral adjectives), so r can be computed by hand: the completion above has 6 words, one
positive and one negative: r = 0. A well-formed review tops out at 0.5 (every adjective
positive); only ungrammatical text ("great great great.") scores higher, which is the reward
hacking the KL term of DPO is there to prevent. `well_formed` checks the grammar.

The unlabeled reviews that pi_ref is trained on have a topic-dependent tone: each topic has a
seeded probability that an adjective is positive (0.15 to 0.85), so pi_ref's reward depends on
the prompt, as a review's opening does in IMDb. A quarter of the topics never appear in a
preference pair: evaluation is on those held-out prompts.

Everything here is deterministic given its seed: the task, the SFT corpus, the samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from dpo.errors import UserError, release_held_warnings
from dpo.files import json_text
from dpo.folders import MARKER, MODEL_KIND, marker_problem, read_marker, write_marked_folder
from dpo.offline.tiny import SPECIAL, build_tiny_model

# ── the language ───────────────────────────────────────────────────────────────────────────
POSITIVE = ("great", "wonderful", "superb", "brilliant", "lovely", "excellent", "charming", "delightful")
NEGATIVE = ("awful", "dull", "boring", "terrible", "poor", "weak", "bland", "clumsy")
NEUTRAL = ("long", "short", "loud", "quiet", "typical", "modern", "simple", "familiar")  # neutral adjectives
ASPECTS = ("plot", "acting", "music", "ending", "pacing", "story", "cast", "dialogue", "visuals", "humour")
TOPICS = (
    "film",
    "novel",
    "album",
    "play",
    "musical",
    "sequel",
    "documentary",
    "series",
    "comedy",
    "thriller",
    "western",
    "cartoon",
    "opera",
    "podcast",
    "game",
    "ballet",
    "remake",
    "drama",
    "horror",
    "romance",
    "mystery",
    "biopic",
    "anime",
    "sitcom",
)
PUNCTUATION = (":", ",", ".")
_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)
_WORD = re.compile(r"[a-z]+")
_PHRASE = rf"(?:{'|'.join(POSITIVE + NEGATIVE + NEUTRAL)}) (?:{'|'.join(ASPECTS)})"
_WELL_FORMED = re.compile(rf"\s*{_PHRASE}(?:, {_PHRASE})*\.\s*")


def reward(completion: str) -> float:
    """Ground-truth reward: net positive-word rate, (#positive - #negative) / #words; 0 if no words."""
    words = _WORD.findall(completion.lower())
    if not words:
        return 0.0
    return (sum(w in _POS for w in words) - sum(w in _NEG for w in words)) / len(words)


def n_words(completion: str) -> int:
    """Completion length in words (punctuation not counted), as `reward` counts them."""
    return len(_WORD.findall(completion.lower()))


def well_formed(completion: str) -> bool:
    """True for "<adjective> <aspect>(, <adjective> <aspect>)*." — the grammar of the SFT corpus."""
    return _WELL_FORMED.fullmatch(completion) is not None


def prompt_for(topic: str) -> str:
    """The prompt for a topic, "review of <topic>:"."""
    return f"review of {topic}:"


@dataclass(frozen=True)
class SentimentTask:
    """One seeded instance of the task: each topic's tone, and which topics are held out."""

    seed: int = 0
    heldout_topics: int = 6  # of 24: never seen in a preference pair, used for evaluation
    min_phrases: int = 1
    max_phrases: int = 4  # 4 phrases: 8 words, 3 commas, a full stop = 12 tokens, then EOS
    neutral_rate: float = 0.2  # share of adjectives that are neutral in the SFT corpus

    def __post_init__(self):
        if not 1 <= self.heldout_topics < len(TOPICS):
            raise UserError(f"heldout_topics must be between 1 and {len(TOPICS) - 1}, got {self.heldout_topics}")
        if not 1 <= self.min_phrases <= self.max_phrases:
            raise UserError(f"need 1 <= min_phrases <= max_phrases, got {self.min_phrases}, {self.max_phrases}")

    @cached_property  # computed once per task: review() reads it for every generated review
    def positivity(self) -> dict[str, float]:
        """P(an opinionated adjective is positive) for each topic, uniform in [0.15, 0.85]."""
        rng = random.Random(f"positivity-{self.seed}")
        return {t: round(rng.uniform(0.15, 0.85), 3) for t in TOPICS}

    @cached_property
    def splits(self) -> dict[str, tuple[str, ...]]:
        """Topics for preference pairs ("train") and for evaluation ("heldout"), a seeded split."""
        topics = list(TOPICS)
        random.Random(f"split-{self.seed}").shuffle(topics)
        return {
            "train": tuple(sorted(topics[self.heldout_topics :])),
            "heldout": tuple(sorted(topics[: self.heldout_topics])),
        }

    def review(self, topic: str, rng: random.Random) -> str:
        """One review in the SFT corpus's style: " <adj> <aspect>, <adj> <aspect>." (leading space)."""
        p = self.positivity[topic]
        phrases = []
        for aspect in rng.sample(ASPECTS, rng.randint(self.min_phrases, self.max_phrases)):
            pool = NEUTRAL if rng.random() < self.neutral_rate else POSITIVE if rng.random() < p else NEGATIVE
            phrases.append(f"{rng.choice(pool)} {aspect}")
        return " " + ", ".join(phrases) + "."

    def sft_rows(self, n: int, seed: int = 0) -> list[dict]:
        """`n` unlabeled reviews over all 24 topics, as SFTTrainer prompt/completion rows.

        The held-out topics are in here on purpose: pi_ref has read reviews of every topic (as
        GPT-2 on IMDb has); what it has never seen is a *preference* about them.
        """
        rng = random.Random(f"sft-{self.seed}-{seed}")
        rows = []
        for _ in range(n):
            topic = rng.choice(TOPICS)
            rows.append({"prompt": prompt_for(topic), "completion": self.review(topic, rng)})
        return rows

    def prompts(self, split: str, n: int, seed: int = 0) -> list[str]:
        """`n` prompts drawn (with replacement, seeded) from the topics of `split`."""
        rng = random.Random(f"prompts-{split}-{self.seed}-{seed}")
        return [prompt_for(rng.choice(self.splits[split])) for _ in range(n)]


# ── tokenizer and model ─────────────────────────────────────────────────────────────────────
def build_word_tokenizer():
    """One token per word or punctuation mark: 66 tokens. EOS, no pad token (pad with EOS, as phi-2).

    A byte-level BPE (dpo/offline/tiny.py) would split words into pieces a from-scratch model must first
    learn to assemble; with whole words, every token the model learns is a word of the task.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL.values(), "review", "of", *PUNCTUATION, *TOPICS, *ASPECTS, *POSITIVE, *NEGATIVE, *NEUTRAL]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "plot," -> "plot", ","
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **SPECIAL)


def build_sentiment_model(tokenizer, seed: int = 0):
    """A randomly initialised 2-layer Phi model (dpo/offline/tiny.py's config: hidden 64, 4 heads, MLP 128).

    About 0.1M parameters: phi-2's architecture and module names, so the phi-2 recipe's LoRA
    targets and 4-bit loading apply unchanged.
    """
    return build_tiny_model(tokenizer, seed=seed, max_position_embeddings=64)


def decode(tokenizer, ids) -> str:
    """Token ids -> " great plot, dull music." (specials dropped, no space before punctuation)."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return " " + text.strip()


# ── phase 1: SFT, pi_ref ────────────────────────────────────────────────────────────────────
def train_reference(task: SentimentTask, output_dir, settings, training_args) -> tuple[Path, list[float]]:
    """SFT a from-scratch tiny Phi model (word tokenizer) on unlabeled reviews with TRL's SFTTrainer.

    `settings` carries the recipe's sft_examples, sft_steps, sft_batch_size and sft_learning_rate
    (recipes/dpo_sentiment_tiny.py's ScriptArguments); `training_args` its seed and precision.
    Saves model.safetensors, config and tokenizer to `output_dir`; returns (output_dir, logged losses). The
    folder is trained and saved in a staging folder beside it, marked (every file's sha256, dpo/folders.py) and
    renamed into place: a kill leaves no half-written model where a later run would reuse it.
    """
    release_held_warnings()  # the work starts: warnings held while the run was checked now show (dpo/errors.py)
    tokenizer = build_word_tokenizer()
    losses = []

    def write(staging: Path) -> None:
        losses.extend(_train_reference_into(staging, task, tokenizer, settings, training_args))

    expected = reference_settings(task, settings, training_args)
    write_marked_folder(
        output_dir, write, MODEL_KIND, made_by="dpo.offline.sentiment.train_reference",
        settings=expected, settings_sha256=_sha256(expected),
    )  # fmt: skip
    return Path(output_dir), losses


SETTINGS_SOURCE = "the settings a pi_ref was trained with (its marker)"


def reference_settings(task: SentimentTask, settings, training_args) -> dict:
    """What decides the model `train_reference` trains, as its marker records it: the task (its fields and each
    topic's tone, which benchmarks/rounds_offpolicy.py's opposite-tone task changes), the SFT settings, the seed
    and the precision. (JSON values: what the marker reads back compares equal.)"""
    decided = {
        **{f"task_{k}": v for k, v in dataclasses.asdict(task).items()},
        "task_tone": task.positivity,
        **{k: getattr(settings, k) for k in ("sft_examples", "sft_steps", "sft_batch_size", "sft_learning_rate")},
        **{k: getattr(training_args, k) for k in ("seed", "use_cpu", "bf16", "fp16")},
    }
    return json.loads(json_text(decided, SETTINGS_SOURCE))


def _sha256(settings: dict) -> str:
    return hashlib.sha256(json_text(settings, SETTINGS_SOURCE, sort_keys=True).encode()).hexdigest()


def reference_problem(folder, task: SentimentTask, settings, training_args) -> str | None:
    """Why `folder` is not a whole model `train_reference` trained with these settings, for a caller that would
    reuse it: not finished or a file changed (dpo/folders.py marker_problem), no settings recorded (trained
    before they were), or the settings that differ, each named; None when it is one."""
    if problem := marker_problem(folder, MODEL_KIND):
        return problem
    record, expected = read_marker(folder, MODEL_KIND), reference_settings(task, settings, training_args)
    if record.get("settings_sha256") == _sha256(expected):
        return None
    recorded = record.get("settings")
    if not isinstance(recorded, dict):
        return f"{Path(folder) / MARKER} records no training settings (trained before they were recorded)"
    differ = [
        k if isinstance(v, dict) else f"{k} {recorded.get(k)} there, {v} here"
        for k, v in expected.items()
        if recorded.get(k) != v
    ]
    return f"trained with other settings: {', '.join(differ) or 'its marker does not match its settings_sha256'}"


def reused_or_trained_reference(task, folder, settings, training_args, refused: str, replace: bool = False):
    """pi_ref in `folder`, checked before anything is trained: (folder, None) when it is whole and trained with
    these settings (reference_problem), (folder, losses) when absent and trained now, or, with `replace`, when it
    is not (the old one is replaced: marked as ours). Otherwise UserError: `refused` is the advice, after the
    problem. A run trained on the old pi_ref is never left without it."""
    folder = Path(folder)
    if folder.exists():
        if (problem := reference_problem(folder, task, settings, training_args)) is None:
            return folder, None
        if not replace:
            raise UserError(
                f"{folder} is not a whole pi_ref written by this recipe with these settings ({problem}): {refused}"
            )
    return train_reference(task, folder, settings, training_args)


def _train_reference_into(folder: Path, task, tokenizer, settings, training_args) -> list[float]:
    """SFT pi_ref into `folder` (train_reference's staging folder); returns the logged losses."""
    from datasets import Dataset

    from dpo.compat import SFTConfig, SFTTrainer

    seed, steps = training_args.seed, settings.sft_steps
    args = SFTConfig(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        activation_checkpointing=False,  # a 0.1M-parameter model: activations are nothing
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        fp16=training_args.fp16,
        max_length=64,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    model = build_sentiment_model(tokenizer, seed=seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(task.sft_rows(settings.sft_examples, seed)),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(folder))  # model.safetensors + config + tokenizer
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# ── sampling and log-probs (pure torch: exactly softmax sampling, no hidden logits processors) ──
@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 512):
    """Ancestral samples at temperature 1 (no top-k/top-p), so they come from pi itself and
    the Monte-Carlo KL estimate is unbiased. Returns (prompt_ids, completion_ids) lists; a
    completion ends with its EOS, or is cut at max_new_tokens."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same samples on any device
    eos, device = tokenizer.eos_token_id, next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompt_ids, completion_ids = [], []
    for start in range(0, len(prompts), batch_size):
        batch = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[eos] * (width - len(b)) + b for b in batch], device=device)  # left-pad the prompts
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):  # no KV cache: ~20 positions, recomputing them is cheap
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            probs = logits[:, -1].float().softmax(-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            token = torch.where(done, eos, token)  # finished rows keep emitting EOS (dropped below)
            new.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done |= token == eos
            if done.all():
                break
        new = torch.stack(new, 1).tolist()
        for b, row in zip(batch, new):
            prompt_ids.append(b)
            completion_ids.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return prompt_ids, completion_ids


# ── phase 2: preference pairs from pi_ref, labelled by the ground-truth reward ───────────────
def preference_pairs(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> tuple[list[dict], int]:
    """Two samples per prompt; the higher-reward one is chosen. Ties carry no preference and are
    dropped (the paper's classifier never ties). Returns (rows for DPOTrainer, number of ties)."""
    doubled = [p for p in prompts for _ in range(2)]
    _, completions = sample(model, tokenizer, doubled, max_new_tokens, seed)
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        a, b = decode(tokenizer, completions[2 * i]), decode(tokenizer, completions[2 * i + 1])
        ra, rb = reward(a), reward(b)
        if ra == rb:
            ties += 1
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, ties


def pair_sets(
    model, tokenizer, task: SentimentTask, train_prompts: int, heldout_prompts: int, max_new_tokens: int, seed: int
) -> dict:
    """Training pairs on the training topics and held-out pairs on the held-out topics."""
    train, ties = preference_pairs(model, tokenizer, task.prompts("train", train_prompts, seed), max_new_tokens, seed)
    heldout, _ = preference_pairs(
        model, tokenizer, task.prompts("heldout", heldout_prompts, seed), max_new_tokens, seed + 1
    )
    return {"train": train, "heldout": heldout, "ties": ties}


if __name__ == "__main__":
    task = SentimentTask()
    rng = random.Random(0)
    print("topics held out:", ", ".join(task.splits["heldout"]))
    for topic in ("film", "opera", "sitcom"):
        for _ in range(2):
            text = task.review(topic, rng)
            print(f"{prompt_for(topic)}{text:45s} positivity {task.positivity[topic]:.2f}  reward {reward(text):+.3f}")
