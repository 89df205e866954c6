"""The Ollama Modelfile written beside a GGUF export: `ollama create NAME -f out.Modelfile`.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja chat template, so the Jinja template is
rendered on marker messages and cut into what each role's message is wrapped in (a prefix before the
content, a suffix after it), the generation prompt and any default system prompt (SmolLM2 adds one
when the conversation has none: it becomes SYSTEM). The parts are accepted only if re-assembling them
reproduces the Jinja rendering of a conversation with every role; otherwise (a template with logic
beyond wrapping each message) no TEMPLATE is written and Ollama takes the Jinja template that the GGUF
file itself carries (`tokenizer.chat_template`), which the Modelfile says.
"""

from __future__ import annotations

S, U, A = "\x02system\x03", "\x02user\x03", "\x02assistant\x03"  # markers no template produces itself


def _render(tokenizer, messages: list[tuple[str, str]], generation: bool) -> str:
    conversation = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)


def _between(text: str, start: str | None, end: str | None) -> str:
    begin = text.index(start) + len(start) if start else 0
    return text[begin : text.index(end, begin) if end else len(text)]


def template_parts(tokenizer) -> dict | None:
    """{role: (prefix, suffix)}, the generation prompt and the default system prompt; None when the
    template is not a wrapping of each message (or there is none)."""
    if not tokenizer.chat_template:
        return None
    try:
        with_reply = _render(tokenizer, [("user", U), ("assistant", A)], False)
        generation = _render(tokenizer, [("user", U)], True)[len(_render(tokenizer, [("user", U)], False)) :]
        assistant_suffix = _between(with_reply, A, None)
        user_suffix = _between(with_reply, U, A).removesuffix(generation)
        turns = _render(tokenizer, [("user", U), ("assistant", A), ("user", U)], False)
        user_prefix = _between(turns, A, U).removeprefix(assistant_suffix)
        system = _render(tokenizer, [("system", S), ("user", U)], False)
        system_prefix, system_suffix = _between(system, None, S), _between(system, S, U).removesuffix(user_prefix)
        default = _between(with_reply, None, U).removesuffix(user_prefix)
        default_system = None
        if default:  # the template's own system message when none is given
            if not (default.startswith(system_prefix) and default.endswith(system_suffix)):
                return None
            default_system = default[len(system_prefix) : len(default) - len(system_suffix)]
            if not default_system:
                return None
        parts = {
            "system": (system_prefix, system_suffix),
            "user": (user_prefix, user_suffix),
            "assistant": (generation, assistant_suffix),
            "generation": generation,
            "default_system": default_system,
        }
    except Exception:  # jinja's TemplateError (a template that rejects a role or an order), a marker not found
        return None
    sample = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]
    if assemble(parts, sample) != _render(tokenizer, sample, True):
        return None
    return parts


def assemble(parts: dict, messages: list[tuple[str, str]]) -> str:
    """What the Go template written by `go_template` renders for `messages`, in Python."""
    system = [content for role, content in messages if role == "system"]
    system = system[0] if system else parts["default_system"]
    text = ""
    if system:
        text += parts["system"][0] + system + parts["system"][1]
    for role, content in messages:
        if role != "system":
            text += parts[role][0] + content + parts[role][1]
    return text + parts["generation"]


def go_template(parts: dict) -> str:
    """Ollama's TEMPLATE for the parts: .System (from SYSTEM or the user's), then each message, then the
    generation prompt. Written on one line: `{{-` would trim the newlines the parts end with."""
    (sp, ss), (up, us), (ap, as_) = parts["system"], parts["user"], parts["assistant"]
    return (
        f"{{{{ if .System }}}}{sp}{{{{ .System }}}}{ss}{{{{ end }}}}"
        f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{up}{{{{ .Content }}}}{us}'
        f'{{{{ else if eq .Role "assistant" }}}}{ap}{{{{ .Content }}}}{as_}{{{{ end }}}}{{{{ end }}}}'
        f"{parts['generation']}"
    )


def modelfile_text(tokenizer, gguf_name: str, check: dict) -> str:
    lines = [
        "# Ollama: ollama create my-model -f THIS_FILE   (written by python -m dpo.export --gguf)",
        f"# {gguf_name}: {check['gguf_type']}, sha256 {check.get('sha256', '?')}; read back by transformers: "
        f"{check['tensors']} tensors within the format's rounding, logits within float32 noise of the merged "
        f"model's architecture ({check['max_logit_noise']:.2g}); rounding moved them by {check['max_logit_rounding']:.3g}",
        f"FROM ./{gguf_name}",
    ]
    parts = template_parts(tokenizer)
    if parts and '"""' not in go_template(parts):
        lines.append("# the tokenizer's chat template, as Ollama's Go template (dpo/evaluation/modelfile.py)")
        lines.append(f'TEMPLATE """{go_template(parts)}"""')
        if parts["default_system"]:
            lines.append(f'SYSTEM """{parts["default_system"]}"""')
        stop = parts["assistant"][1].strip()
        if stop:
            lines.append(f'PARAMETER stop "{stop}"')
    elif tokenizer.chat_template:
        lines.append("# no TEMPLATE: Ollama reads the chat template the GGUF file carries (tokenizer.chat_template)")
    else:
        lines.append("# the model has no chat template: prompt it with plain text")
    return "\n".join(lines) + "\n"
