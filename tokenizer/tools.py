"""Llama 3.1 tool use: the system lines and tool definitions of a prompt, an assistant's tool calls as the model
writes them, and generated text read back into calls.

The layout is Meta's Llama 3.1 prompt format (meta-llama/llama-models, ``models/llama3_1/prompt_format.md``; the
model card's "Tool use" section) as Meta's Hugging Face chat template for Llama 3.1 writes it:

* the system message starts with ``Environment: ipython`` when tools are offered, ``Tools: brave_search,
  wolfram_alpha`` for the built-in tools (the code interpreter is implied by ``Environment: ipython`` and not
  listed), then ``Cutting Knowledge Date: December 2023`` and ``Today Date: 23 July 2024``;
* custom tools (JSON schemas) are put in the first user message with an instruction to answer with
  ``{"name": function name, "parameters": {...}}``;
* a built-in call is ``<|python_tag|>brave_search.call(query="...")``, a code-interpreter call
  ``<|python_tag|>`` and the code, a custom call the JSON object; the turn ends with ``<|eom_id|>`` (end of
  message: the model waits for the result), which comes back as an ``ipython`` message.

Calls are held in the structure transformers' chat templates use: ``{"type": "function", "function": {"name":
..., "arguments": {...}}}``.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import date as Date

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
CODE_INTERPRETER = "code_interpreter"
PYTHON_TAG = "<|python_tag|>"
CUTTING_KNOWLEDGE_DATE = "December 2023"
CUSTOM_TOOLS_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
TOOL_ROLES = ("ipython", "tool")  # "tool" (transformers' and OpenAI's name) is written as "ipython"


def today() -> str:
    """Today as Meta's llama-models writes it in the system prompt: "%d %B %Y", e.g. "23 July 2024"."""
    return Date.today().strftime("%d %B %Y")


def check_tools(tools: list[dict] | None, builtin_tools: list[str] | None) -> None:
    """Raise ValueError unless ``tools`` are JSON schemas (dicts) and ``builtin_tools`` known built-in names."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"tools must be a list of JSON schemas (dicts), got {tools!r}")
    unknown = [name for name in builtin_tools or () if name not in BUILTIN_TOOLS]
    if unknown or (builtin_tools is not None and not isinstance(builtin_tools, list)):
        raise ValueError(f"builtin_tools must be a list of {', '.join(BUILTIN_TOOLS)}; got {builtin_tools!r}")


def system_preamble(tools: list[dict] | None, builtin_tools: list[str] | None, date: str | None) -> str:
    """The lines Llama 3.1's system message starts with, before the system prompt itself."""
    lines = ""
    if tools or builtin_tools:
        lines += "Environment: ipython\n"
    listed = [name for name in builtin_tools or () if name != CODE_INTERPRETER]
    if listed:
        lines += f"Tools: {', '.join(listed)}\n\n"
    return lines + f"Cutting Knowledge Date: {CUTTING_KNOWLEDGE_DATE}\nToday Date: {date or today()}\n\n"


def custom_tools_preamble(tools: list[dict]) -> str:
    """What precedes the first user message when custom tools are offered: the instruction and each schema."""
    return CUSTOM_TOOLS_INSTRUCTION + "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools)


def call_parts(call: dict) -> tuple[str, dict]:
    """(name, arguments) of a call in transformers' structure; arguments may be a dict or its JSON text."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", {}) if isinstance(function, dict) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise ValueError(
            'a tool call must be {"type": "function", "function": {"name": str, "arguments": {...} or JSON text}}, '
            f"got {call!r}"
        )
    return name, arguments


def render_tool_call(call: dict, builtin_tools: list[str] | None) -> str:
    """A call as the model writes it: ``<|python_tag|>`` and the code for the code interpreter,
    ``<|python_tag|>name.call(key="value", ...)`` for another built-in tool, the JSON object for a custom one."""
    name, arguments = call_parts(call)
    if name == CODE_INTERPRETER:
        return PYTHON_TAG + str(arguments.get("code", ""))
    if name in (builtin_tools or ()):
        # json.dumps quotes a string as Meta writes it ("..."), escaping what would end it early
        args = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in arguments.items())
        return f"{PYTHON_TAG}{name}.call({args})"
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>]+)>(?P<arguments>\{.*?\})</function>", re.DOTALL)
_BUILTIN_CALL = re.compile(r"(?P<name>[A-Za-z_]\w*)\.call\((?P<arguments>.*)\)", re.DOTALL)


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _builtin_arguments(text: str) -> dict | None:
    """``key="value", ...`` read as Python keyword arguments of literal values, or None."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args or any(keyword.arg is None for keyword in call.keywords):
            return None
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError):
        return None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, tool calls) of an assistant's generated text: a built-in call (``brave_search.call(query="...")``),
    code for the interpreter (after ``<|python_tag|>``), a custom JSON call (``{"name": ..., "parameters": ...}``, or
    ``"arguments"``), or ``<function=name>{...}</function>``; content is then "". Any other text is returned as it
    is, with no calls."""
    body = text.strip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG) :].strip()
    if match := _FUNCTION_TAG.fullmatch(body):
        try:
            arguments = json.loads(match["arguments"])
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            return "", [_call(match["name"], arguments)]
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get("parameters", value.get("arguments", {}))
        if isinstance(arguments, dict):
            return "", [_call(value["name"], arguments)]
    if (match := _BUILTIN_CALL.fullmatch(body)) and (arguments := _builtin_arguments(match["arguments"])) is not None:
        return "", [_call(match["name"], arguments)]
    if tagged:
        return "", [_call(CODE_INTERPRETER, {"code": body})]
    return text, []
