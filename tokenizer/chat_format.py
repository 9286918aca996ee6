"""Dialogs and the chat formats that turn them into token ids: a checkpoint's own Jinja chat template (rendered as
transformers renders it), else Llama 3's header format (with Llama 3.1's tool use), else Llama 2's ``[INST]``
format (both as Meta's reference code lays them out).

A dialog is a list of messages ``{"role": ..., "content": ...}``; an assistant message may carry ``tool_calls``
(transformers' structure) and a tool's result comes back as an ``ipython`` (or ``tool``) message. Each format says
which roles it knows and which may follow which (``ChatFormat.follows``); ``check_dialog`` applies that before
anything is encoded, so a format that adds a role (Llama 3.1's ``ipython``) extends the rule instead of writing
another. Message contents are always encoded as plain text: control-token text typed by a user ("<|eot_id|>",
"<|python_tag|>") never becomes a control token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import TypedDict

import jinja2
import jinja2.ext
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenizer.base import Tokenizer, TokenizerError
from tokenizer.tools import (
    PYTHON_TAG, TOOL_ROLES, call_parts, check_tools, custom_tools_preamble, render_tool_call, system_preamble,
)


class Message(TypedDict, total=False):
    role: str
    content: str | dict | list | None  # a dict or list only as a tool's result; None beside tool_calls
    tool_calls: list[dict]  # [{"type": "function", "function": {"name": ..., "arguments": {...}}}]


Dialog = list[Message]
CHAT_RULE = "an optional 'system' message, then 'user' and 'assistant' alternating, starting with 'user'"

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass(frozen=True, eq=False)  # formats are told apart by identity
class ChatFormat:
    """The dialogs a format can encode: which role may follow which (None: the start), and which roles may end a
    dialog that asks for an answer."""

    name: str
    follows: dict = field(
        default_factory=lambda: {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
                                 "assistant": ("user",)}
    )
    answerable_after: tuple[str, ...] = ("user",)
    rule: str = CHAT_RULE
    tools: bool = False  # assistant tool calls and tool results

    def describe(self, add_generation_prompt: bool) -> str:
        ending = " or ".join(f"'{role}'" for role in self.answerable_after)
        return self.rule + (f" and ending with {ending}" if add_generation_prompt else "")


def with_tools(name: str) -> ChatFormat:
    """A format whose assistant may call a tool, the result coming back as an ``ipython`` or ``tool`` message that
    the assistant answers."""
    follows = {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
               "assistant": ("user", *TOOL_ROLES), **dict.fromkeys(TOOL_ROLES, ("assistant",))}
    rule = CHAT_RULE + "; an assistant message with tool_calls may be followed by the result ('ipython' or 'tool')"
    return ChatFormat(name, follows, ("user", *TOOL_ROLES), rule, tools=True)


LLAMA2, LLAMA3, TEMPLATE = ChatFormat("Llama 2"), with_tools("Llama 3"), with_tools("the chat template")


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The format a tokenizer's checkpoint uses: its own template, else Llama 3's if it has the header tokens, else
    Llama 2's."""
    if tokenizer.chat_template is not None:
        return TEMPLATE
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return LLAMA3
    return LLAMA2


def _check_message(message, fmt: ChatFormat, before: Message | None) -> None:
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
        raise ValueError(f"each message must be a dict with string 'role' and 'content', got {message!r}")
    role, content, calls = message["role"], message.get("content"), message.get("tool_calls")
    if calls is not None:
        if not fmt.tools:
            raise ValueError(f"{fmt.name}'s chat format has no tool calls, got {message!r}")
        if role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, got {message!r}")
        if not (isinstance(calls, list) and len(calls) == 1):
            raise ValueError(f"an assistant message calls one tool at a time (Llama 3.1), got tool_calls={calls!r}")
        call_parts(calls[0])
    if role in TOOL_ROLES and fmt.tools and not (before and before.get("tool_calls")):
        raise ValueError(f"a {role!r} message must follow an assistant message with tool_calls")
    if not (
        isinstance(content, str)
        or (calls and content is None)
        or (role in TOOL_ROLES and isinstance(content, (dict, list)))  # a tool's result, written as JSON
    ):
        raise ValueError(f"each message must be a dict with string 'role' and 'content', got {message!r}")


def check_dialog(dialog: Dialog, fmt: ChatFormat = LLAMA2, add_generation_prompt: bool = True) -> None:
    """Raise ValueError unless ``dialog`` is a list of well-formed messages in an order ``fmt`` allows."""
    if not isinstance(dialog, list):
        raise ValueError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    for before, message in zip([None] + dialog, dialog):
        _check_message(message, fmt, before)
    if not dialog:
        raise ValueError(f"empty dialog: {fmt.name} expects {fmt.describe(add_generation_prompt)}")
    roles = [message["role"] for message in dialog]
    in_order = all(role in fmt.follows.get(before, ()) for before, role in zip([None] + roles, roles))
    if not in_order or (add_generation_prompt and roles[-1] not in fmt.answerable_after):
        raise ValueError(
            f"dialog roles {roles} are out of order: {fmt.name} expects {fmt.describe(add_generation_prompt)}"
        )


def encode_dialog(
    tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True, *, tools: list[dict] | None = None,
    builtin_tools: list[str] | None = None, date: str | None = None,
) -> list[int]:
    """Token ids of ``dialog`` in the tokenizer's chat format, ending, with ``add_generation_prompt``, where the
    assistant's answer begins. ``tools`` (JSON schemas of custom tools), ``builtin_tools`` (``brave_search``,
    ``wolfram_alpha``, ``code_interpreter``) and ``date`` ("23 July 2024": Llama 3.1's "Today Date", by default
    today) make Llama 3's format Llama 3.1's tool-use prompt (``tokenizer.tools``); a chat template receives them
    as transformers passes them (``tools``, ``builtin_tools``, ``date_string``)."""
    fmt = chat_format(tokenizer)
    check_tools(tools, builtin_tools)
    if (tools or builtin_tools) and not fmt.tools:
        raise ValueError(f"{fmt.name}'s chat format has no tool calls")
    check_dialog(dialog, fmt, add_generation_prompt)
    if fmt is LLAMA2:
        return encode_llama2(tokenizer, dialog, add_generation_prompt)
    encode = encode_with_template if fmt is TEMPLATE else encode_llama3
    return encode(tokenizer, dialog, add_generation_prompt, tools=tools, builtin_tools=builtin_tools, date=date)


def encode_llama2(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """Meta's Llama 2 ``chat_completion`` layout: the system prompt folded into the first user message, each
    answered turn as ``<s>[INST] {user} [/INST] {answer} </s>``, the open turn as ``<s>[INST] {user} [/INST]``."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    ids = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    if len(dialog) % 2:
        ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


def encode_llama3(
    tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True, *, tools: list[dict] | None = None,
    builtin_tools: list[str] | None = None, date: str | None = None,
) -> list[int]:
    """Meta's Llama 3 layout: ``<|begin_of_text|>``, then per message ``<|start_header_id|>{role}<|end_header_id|>``,
    "\\n\\n", the stripped content and ``<|eot_id|>``; then the assistant's header. With tools or a date, Llama
    3.1's: the system message starts with ``tokenizer.tools.system_preamble``, custom tools go before the first
    user message, an assistant's tool call is written as the model writes it and ends with ``<|eom_id|>``, a
    tool's result is an ``ipython`` message."""
    special = tokenizer.special_tokens

    def header(role: str) -> list[int]:
        start, end = special["<|start_header_id|>"], special["<|end_header_id|>"]
        return [start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n")]

    def text(content) -> str:
        return content.strip() if isinstance(content, str) else json.dumps(content, ensure_ascii=False)

    ids = [special["<|begin_of_text|>"]]
    if tools is not None or builtin_tools is not None or date is not None:  # Llama 3.1's system message
        system = dialog[0]["content"].strip() if dialog[0]["role"] == "system" else ""
        dialog = dialog[1:] if dialog[0]["role"] == "system" else dialog
        preamble = system_preamble(tools, builtin_tools, date)
        ids += header("system") + tokenizer.encode(preamble + system) + [special["<|eot_id|>"]]
        if tools and dialog:
            first = dialog[0]
            dialog = [{**first, "content": custom_tools_preamble(tools) + first["content"].strip()}] + dialog[1:]
    for message in dialog:
        role = "ipython" if message["role"] in TOOL_ROLES else message["role"]
        content = text(message["content"]) if message.get("content") is not None else ""
        ids += header(role) + tokenizer.encode(content)
        if message.get("tool_calls"):
            call = render_tool_call(message["tool_calls"][0], builtin_tools)
            if call.startswith(PYTHON_TAG):  # the tag is the control token; what follows it, plain text
                ids += [special[PYTHON_TAG]]
                call = call[len(PYTHON_TAG) :]
            ids += tokenizer.encode(call) + [special["<|eom_id|>"]]
        else:
            ids.append(special["<|eot_id|>"])
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: no HTML escaping, json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationBlocks(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (marking assistant text for its assistant-token
    mask), rendered as its body: the masks for training are found without markers (``llama.training.chat_data``)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@cache
def _compile(template: str) -> jinja2.Template:
    """The template in transformers' sandboxed environment, with the helpers it defines."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


def compile_template(template: str, source) -> jinja2.Template:
    """``template`` compiled; one that does not compile is refused, naming ``source`` (the file it came from)."""
    try:
        return _compile(template)
    except jinja2.TemplateSyntaxError as e:
        message = f"{source}: the chat template does not compile: {e.message} (its line {e.lineno})"
        raise TokenizerError(message) from None


def render_template(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, builtin_tools: list[str] | None = None,
                    date: str | None = None) -> str:
    """The text transformers' ``apply_chat_template(..., tokenize=False, tools=tools, builtin_tools=...,
    date_string=date)`` gives (``tools`` is always passed, None when there are none, as transformers does)."""
    tokens = {f"{kind}_token": tokenizer.token_name(getattr(tokenizer, f"{kind}_id")) for kind in ("bos", "eos", "pad")}
    extra = {key: value for key, value in (("builtin_tools", builtin_tools), ("date_string", date))
             if value is not None}
    template = compile_template(tokenizer.chat_template, tokenizer.source)
    try:
        return template.render(
            messages=dialog, tools=tools, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in tokens.items() if v}, **extra,
        )
    except Exception as e:  # the template's own raise_exception, or its code failing on this dialog
        raise ValueError(f"the chat template of {tokenizer.source} failed on this dialog: {e}") from None


def encode_with_template(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True,
                         **tool_options) -> list[int]:
    """The checkpoint's chat template, rendered with each content replaced by a sentinel: the template's own text
    may hold control tokens, the contents put back at the sentinels never do. ``tool_options``: tools,
    builtin_tools and date, passed to the template (``render_template``)."""
    cores, masked = [], []
    for i, message in enumerate(dialog):
        if not isinstance(message.get("content"), str):  # a tool's JSON result, or no content beside a tool call
            cores.append(None)
            masked.append(message)
            continue
        # The sentinel keeps the content's outer whitespace, so a template that trims contents trims it too.
        content = message["content"]
        core = content.strip()
        start = content.find(core) if core else len(content)
        cores.append(core)
        masked.append({**message, "content": f"{content[:start]}\ue000{i}\ue001{content[start + len(core):]}"})
    rendered = render_template(tokenizer, masked, add_generation_prompt, **tool_options)

    ids: list[int] = []
    text = ""  # plain text gathered across template parts and contents, encoded in one go as transformers does
    for n, part in enumerate(re.split("\ue000(\\d+)\ue001", rendered)):
        if n % 2:
            text += cores[int(part)]
            continue
        for piece in tokenizer.split_special(part):
            if isinstance(piece, str):
                text += piece
            else:
                ids += tokenizer.encode(text) + [piece]
                text = ""
    ids += tokenizer.encode(text)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)  # the template wrote no BOS and the model expects one: never two
    return ids
