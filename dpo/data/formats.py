"""How a preference pair becomes the text and the tokens the model sees.

    prompt_format="chat"   prompt/chosen/rejected are message lists; TRL renders them with the
                           tokenizer's chat template (PLAIN_CHAT_TEMPLATE when it has none:
                           `ensure_chat_template`).
    prompt_format="text"   plain strings, joined as they are: TRL trains on prompt + chosen + EOS.
                           Text rows are formatted by `plain_text_format` or a recipe's own
                           (`phi2_qa_format`).

`render` and `count_tokens` do what TRL's DPOTrainer does with a pair (chat template or text +
EOS, prompt and prompt+answer tokenized separately), so the data doctor's lengths are the ones
TRL trains on; tests/data/test_doctor.py checks them against DPOTrainer's own dataset preparation.
The counting itself (`count_tokens`, long texts in windows) is dpo/data/tokens.py.
"""

from __future__ import annotations

import functools
import json
import sys

from datasets import Dataset

from dpo.data.tokens import common_prefix_length, count_tokens  # noqa: F401  (callers import them from here)

# The documented fallback for a tokenizer without a chat template (base models: phi-2, pythia,
# gpt2). It is Anthropic HH's transcript format, so HH data looks as it was written; every
# assistant turn ends with EOS, which teaches the model to stop. The generation prompt is
# "\n\nAssistant:" with no trailing space: the reply's leading space then starts the first
# answer token, and the prompt's tokens are a prefix of prompt+answer tokens. Saved with the
# tokenizer in output_dir, so inference formats prompts the same way.
#   <system>\n\nHuman: <user>\n\nAssistant: <assistant><eos>\n\nHuman: ...\n\nAssistant:
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\n\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ '\n\n' + message['role'] | capitalize + ': ' + message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)


# ── text formats for text rows ─────────────────────────────────────────────────────────


def plain_text_format(row: dict) -> dict:
    """Text rows in text format: the strings as they are, the system text (if any) opening the prompt.

    <system>\\n\\n<prompt> | <chosen> | <rejected>; TRL appends EOS to each answer.
    """
    system = row.get("system") or ""
    return {
        "prompt": f"{system}\n\n{row['prompt']}" if system.strip() else row["prompt"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
    }


def phi2_qa_format(row: dict) -> dict:
    """phi-2's documented QA format; the system text, when present, opens the instruction.

    Instruct: <system>\\n\\n<prompt>\\nOutput: <answer>

    phi-2 has no chat template. The answer starts with a space after "Output:", and TRL
    appends the EOS token to each completion.
    """
    system = (row.get("system") or "").strip()
    instruction = f"{system}\n\n{row['prompt'].strip()}" if system else row["prompt"].strip()
    return {
        "prompt": f"Instruct: {instruction}\nOutput:",
        "chosen": " " + row["chosen"].strip(),
        "rejected": " " + row["rejected"].strip(),
    }


# ── chat templates ─────────────────────────────────────────────────────────────────────


def is_chat(pairs: Dataset) -> bool:
    """True when the pairs are message lists (chat format), False for plain strings."""
    feature = pairs.features["chosen"]
    return getattr(feature, "dtype", None) not in ("string", "large_string")


def chat_template_for(tokenizer) -> str:
    """The chat template pairs are rendered with: the tokenizer's own, or PLAIN_CHAT_TEMPLATE with a
    warning when it has none. Changes nothing; the caller decides where the template goes."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    print(
        "warning: the tokenizer has no chat template; using the plain Human/Assistant template "
        "(dpo/data/formats.py: PLAIN_CHAT_TEMPLATE, saved with the tokenizer). For a chat model, pass its own "
        "tokenizer; for data already formatted as text, set prompt_format: text",
        file=sys.stderr,
        flush=True,
    )
    return PLAIN_CHAT_TEMPLATE


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template PLAIN_CHAT_TEMPLATE (chat_template_for), for scripts
    that keep one tokenizer throughout; True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = chat_template_for(tokenizer)
    return True


# ── rendering and token counts, exactly as TRL's DPOTrainer does them ──────────────────


def render(prompt, chosen, rejected, tokenizer, tools: str | None = None) -> tuple[str, str, str]:
    """(prompt text, prompt+chosen text, prompt+rejected text) as TRL builds them.

    Chat format: the chat template, with the generation prompt after the prompt, and the row's `tools`
    (the JSON text of dpo/data/tools.py) passed as DPOTrainer's tokenize_fn passes them. Text: the
    strings joined, EOS appended to each answer unless it already ends with it.
    """
    if isinstance(chosen, str):
        eos = getattr(tokenizer, "eos_token", None) or ""
        return prompt, prompt + _with_eos(chosen, eos), prompt + _with_eos(rejected, eos)
    if tokenizer is None:
        return (
            _render_plain(prompt, True),
            _render_plain(prompt + chosen, False),
            _render_plain(prompt + rejected, False),
        )
    apply = functools.partial(tokenizer.apply_chat_template, tokenize=False, tools=tools_argument(tools))
    return (apply(prompt, add_generation_prompt=True), apply(prompt + chosen), apply(prompt + rejected))


def tools_argument(tools: str | None):
    """A row's `tools` (the JSON text of dpo/data/tools.py) as apply_chat_template takes them, as TRL reads the
    column back."""
    return json.loads(tools) if isinstance(tools, str) else tools


def _with_eos(text: str, eos: str) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def _render_plain(messages: list[dict], add_generation_prompt: bool) -> str:
    """PLAIN_CHAT_TEMPLATE in Python, for character counts when no tokenizer is given (no EOS); tool calls
    are counted as their JSON (the plain template itself cannot render them: dpo/data/tools.py)."""
    out = []
    for m in messages:
        content = m["content"] + (json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else "")
        if m["role"] == "system":
            out.append(content)
        else:
            name = {"user": "Human", "assistant": "Assistant"}.get(m["role"], m["role"].capitalize())
            out.append(f"\n\n{name}: {content}")
    return "".join(out) + ("\n\nAssistant:" if add_generation_prompt else "")
