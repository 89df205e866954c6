"""Tool-calling preference data: assistant tool calls, tool results and the tools offered, checked and
rendered through the chat template as TRL renders them.

    {"prompt":   [{"role": "user", "content": "Weather in Paris?"}],
     "chosen":   [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
                     {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
     "rejected": [{"role": "assistant", "content": "It is sunny in Paris."}],
     "tools":    [{"type": "function", "function": {"name": "get_weather", "description": "...",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}

Messages keep `tool_calls` (assistant turns; `content` may then be empty or null), and `tool_call_id` /
`name` on `tool` turns (a tool's result). `arguments` may be an object or, as OpenAI writes it, a string
holding one; strings are read into objects, which is what chat templates render with `tojson`. The
`tools` column (a list, or a JSON string of one) goes to TRL as JSON text, which TRL's DPOTrainer reads
back and passes to `apply_chat_template(..., tools=...)`; dpo.data.formats.render passes it the same way.

Parquet and Arrow store a column of objects with one type: every row's arguments get the argument names of
every other row's calls (`{"city": "Paris", "query": null}`), and every tool schema the keys of the others. So a
key whose value is null is dropped from arguments and tools given as objects (at any depth): it is what the
format added, and a template would render it. A null that is meant: write the arguments or tools as JSON text,
which is read exactly.

A chat template that renders only role and content (SmolLM2-135M-Instruct's) would silently train on
empty answers: `check_template` renders a probe conversation and refuses such a template in one line,
before weights load; `chat_template_path` (a Jinja file, as TRL's SFTConfig takes it) gives another.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo.errors import UserError

TOOLS_COLUMN = "tools"
TOOL_KEYS = ("tool_call_id", "name")  # kept on `tool` messages where given
CALL_KEYS = ("id", "type")  # a tool call's own keys, beside its "function"
TEMPLATE_SUFFIXES = (".jinja", ".j2")


def _json_object(value, where: str, what: str):
    """`value`, or the JSON it holds when it is a string: OpenAI writes arguments and schemas as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: {what} is text but not JSON ({err.msg}, column {err.colno})") from None
    return value


def without_nulls(value):
    """`value` with every null-valued key of its objects dropped, at any depth (the keys Arrow added)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _tool_call(call, where: str) -> dict:
    """One entry of `tool_calls`: {"type": "function", "function": {"name": text, "arguments": object}}
    (or the function's fields at the top), with the arguments read into an object."""
    nested = isinstance(call, dict) and call.get("function") is not None  # null: a flat call beside nested ones
    function = (call["function"] if nested else call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise UserError(
            f"{where}: expected {{'type': 'function', 'function': {{'name': text, 'arguments': {{...}}}}}}, "
            f"got {call!r:.80}"
        )
    given = function.get("arguments", {})
    arguments = _json_object(given, where, "'arguments'") if isinstance(given, str) else without_nulls(given)
    if not isinstance(arguments, dict):
        raise UserError(f"{where}: 'arguments' must be an object {{name: value}}, got {arguments!r:.60}")
    if nested:
        return {**without_nulls(call), "function": {**without_nulls(function), "arguments": arguments}}
    # the function's fields at the top: they go into "function"; the call's own (id, type) stay on the call, where
    # templates read them (Mistral's renders tool_call.id); null keys are Arrow's (a nested call's "function")
    own = {k: v for k, v in call.items() if k in CALL_KEYS and v is not None}
    inner = {k: v for k, v in call.items() if k not in (*CALL_KEYS, "function") and v is not None}
    return {"type": "function", **own, "function": {**inner, "arguments": arguments}}


def has_calls(message: dict) -> bool:
    """The message holds tool calls: `tool_calls` neither null nor an empty list (both mean none)."""
    return message.get("tool_calls") not in (None, [])


def message_extras(message: dict, role: str, where: str) -> dict:
    """The tool fields of one checked message ({} for a plain one): `tool_calls` of an assistant turn,
    `tool_call_id` / `name` of a tool turn. A key whose value is null counts as absent (Parquet and Arrow
    give every message of a list the keys of the others)."""
    extras = {}
    calls = message.get("tool_calls")
    if has_calls(message):  # an empty list calls nothing: a plain message, as OpenAI's exports write it
        if role != "assistant":
            raise UserError(f"{where}: 'tool_calls' on a '{role}' turn; only assistant turns call tools")
        if not isinstance(calls, list):
            raise UserError(f"{where}: 'tool_calls' must be a list of calls, got {calls!r:.60}")
        extras["tool_calls"] = [_tool_call(call, f"{where}, tool call {j}") for j, call in enumerate(calls, start=1)]
    if role == "tool":
        for key in TOOL_KEYS:
            if (value := message.get(key)) is not None:
                if not isinstance(value, str):
                    raise UserError(f"{where}: '{key}' must be text, got {type(value).__name__} ({value!r:.60})")
                extras[key] = value
    return extras


def tools_field(value, where: str) -> str | None:
    """The tools a row offers, as the JSON text TRL reads (None: no tools; an empty list is none too, as TRL's
    own `apply_chat_template` treats it). Each tool: {"type": "function", "function": {"name": text, ...}}."""
    tools = _json_object(value, where, "the tools") if isinstance(value, str) else without_nulls(value)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise UserError(
            f"{where}: expected a list of tools [{{'type': 'function', 'function': ...}}], got {tools!r:.60}"
        )
    for j, tool in enumerate(tools, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(
                f"{where}, tool {j}: expected {{'type': 'function', 'function': {{'name': text, 'description': text, "
                f"'parameters': {{...}}}}}}, got {tool!r:.80}"
            )
    return json.dumps(tools, ensure_ascii=False)


def offers_tools(value) -> bool:
    """`value` (a tools column's cell, or its JSON text) lists function tools; a column of that name holding
    something else (a text row's own "tools" field) does not."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return isinstance(value, list) and any(isinstance(t, dict) and ("function" in t or "name" in t) for t in value)


def has_tool_messages(*conversations) -> bool:
    """True when a message of these lists is a tool call or a tool's result."""
    return any(m.get("tool_calls") or m["role"] == "tool" for messages in conversations for m in messages)


def pairs_features(columns: dict):
    """Features for to_pairs' output when rows hold tool fields, else None (the library infers them). Each
    message is stored as its own JSON object: Arrow would otherwise give every message every key of the
    others (`tool_calls: None` on a user turn, which templates testing `'tool_calls' in message` render as a
    call) and every call's arguments the argument names of all calls."""
    from datasets import Features, Json, List, Value

    tools = any(t is not None for t in columns.get(TOOLS_COLUMN, []))
    if not tools and not any(
        isinstance(v, list) and has_tool_messages(v) for key in ("prompt", "chosen", "rejected") for v in columns[key]
    ):
        return None
    messages = List(Json())
    return Features(
        {
            "prompt": messages,
            "chosen": messages,
            "rejected": messages,
            TOOLS_COLUMN: Value("string"),
            "row": Value("int64"),
            "problem": Value("string"),
        }
    )


# ── can the template render them? ────────────────────────────────────────────────────────

PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_lookup_weather",
        "description": "probe-tool-description-7731",
        "parameters": {"type": "object", "properties": {"probe_city": {"type": "string"}}, "required": ["probe_city"]},
    },
}
PROBE = [
    {"role": "user", "content": "What is the weather?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "probe_lookup_weather", "arguments": {"probe_city": "Zyxville"}}}
        ],
    },
    {"role": "tool", "name": "probe_lookup_weather", "tool_call_id": "call_1", "content": "probe-result-4417"},
    {"role": "assistant", "content": "It is mild."},
]
# What must appear in the rendered probe: the call's name and argument, the tool's result
PROBE_SHOWS = ("probe_lookup_weather", "probe_city", "Zyxville", "probe-result-4417")
PROBE_TOOL_SHOWS = ("probe-tool-description-7731",)  # and, for rows with tools, the tool offered


def template_problem(tokenizer, template: str | dict, with_tools: bool) -> str | None:
    """Why `template` cannot render tool calls (and, `with_tools`, the tools offered), or None when it can. Named
    templates ({"default": ..., "tool_use": ...}, Hermes style): the one transformers picks, "tool_use" for a
    conversation with tools where there is one, else "default"."""
    if isinstance(template, dict):
        name = "tool_use" if with_tools and "tool_use" in template else "default"
        if not isinstance(template.get(name), str):
            return f"its named templates {sorted(template)} have no '{name}' template to render these rows with"
        problem = template_problem(tokenizer, template[name], with_tools)
        return problem and f"its '{name}' template: {problem}"
    try:
        text = tokenizer.apply_chat_template(
            PROBE, tools=[PROBE_TOOL] if with_tools else None, tokenize=False, chat_template=template
        )
    except Exception as err:  # a Jinja syntax error, or a template that raises on a tool turn
        return f"it fails on a conversation with a tool call ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
    missing = [s for s in PROBE_SHOWS + (PROBE_TOOL_SHOWS if with_tools else ()) if s not in text]
    if missing:
        return f"a probe conversation with a tool call renders without {', '.join(map(repr, missing))}"
    return None


def check_template(tokenizer, template: str, described: str, source: str, row: int, with_tools: bool) -> None:
    """Refuse, in one line, a template that cannot render the tool calls `source` holds (first at `row`)."""
    if problem := template_problem(tokenizer, template, with_tools):
        raise UserError(
            f"{source}: rows hold tool calls or tools (first: row {row}), and {described} cannot render them: "
            f"{problem}; training would see answers without their calls. Give a chat template that renders tools "
            "(the tool-calling template of a Qwen2.5 or Llama-3.1 style model) as a Jinja file: "
            "chat_template_path: <file.jinja> in the YAML, or --chat_template_path <file.jinja>"
        )


def template_for_rows(chat_template_path: str | None, chat: bool, rows: str) -> str | None:
    """The text of `chat_template_path` to render chat rows with (None when it is unset). A chat template renders
    only chat rows (lists of messages): given for text rows (`rows` says which), it would be silently ignored, so
    it is refused in one line, before any weights load."""
    if not chat_template_path:
        return None
    if not chat:
        raise UserError(
            f"chat_template_path {chat_template_path}: {rows} are text, and a chat template renders only chat rows "
            "(lists of messages), so it would be ignored; leave chat_template_path unset"
        )
    return read_chat_template(chat_template_path)


def read_chat_template(path: str) -> str:
    """The text of a chat template file (`chat_template_path`): a Jinja file of UTF-8 text, not empty."""
    file = Path(path).expanduser()
    if file.suffix not in TEMPLATE_SUFFIXES or not file.is_file():
        raise UserError(
            f"chat_template_path {path}: not a chat template file; give an existing Jinja file ending in "
            f"{' or '.join(TEMPLATE_SUFFIXES)}"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"chat_template_path {path}: cannot be read as UTF-8 text ({err})") from None
    if not text.strip():
        raise UserError(f"chat_template_path {path}: the file is empty; give a Jinja chat template")
    return text
