"""Dialogs and the chat formats that turn them into token ids: a checkpoint's own Jinja chat template (rendered as
transformers renders it), else Llama 3's header format, else Llama 2's ``[INST]`` format (both as Meta's reference
code lays them out).

A dialog is a list of messages ``{"role": ..., "content": ...}``. Each format says which roles it knows and which
may follow which (``ChatFormat.follows``); ``check_dialog`` applies that before anything is encoded, so a format
that adds a role (Llama 3.1's ``ipython``) extends the rule instead of writing another. Message contents are always
encoded as plain text: control-token text typed by a user ("<|eot_id|>") never becomes a control token.
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


class Message(TypedDict):
    role: str
    content: str


Dialog = list[Message]

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

    def describe(self, add_generation_prompt: bool) -> str:
        rule = "an optional 'system' message, then 'user' and 'assistant' alternating, starting with 'user'"
        return rule + (" and ending with 'user'" if add_generation_prompt else "")


LLAMA2, LLAMA3, TEMPLATE = ChatFormat("Llama 2"), ChatFormat("Llama 3"), ChatFormat("the chat template")


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The format a tokenizer's checkpoint uses: its own template, else Llama 3's if it has the header tokens, else
    Llama 2's."""
    if tokenizer.chat_template is not None:
        return TEMPLATE
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return LLAMA3
    return LLAMA2


def check_dialog(dialog: Dialog, fmt: ChatFormat = LLAMA2, add_generation_prompt: bool = True) -> None:
    """Raise ValueError unless ``dialog`` is a list of well-formed messages in an order ``fmt`` allows."""
    if not isinstance(dialog, list):
        raise ValueError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    for message in dialog:
        if not (isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))):
            raise ValueError(f"each message must be a dict with string 'role' and 'content', got {message!r}")
    if not dialog:
        raise ValueError(f"empty dialog: {fmt.name} expects {fmt.describe(add_generation_prompt)}")
    roles = [message["role"] for message in dialog]
    in_order = all(role in fmt.follows.get(before, ()) for before, role in zip([None] + roles, roles))
    if not in_order or (add_generation_prompt and roles[-1] not in fmt.answerable_after):
        raise ValueError(
            f"dialog roles {roles} are out of order: {fmt.name} expects {fmt.describe(add_generation_prompt)}"
        )


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``dialog`` in the tokenizer's chat format, ending, with ``add_generation_prompt``, where the
    assistant's answer begins."""
    fmt = chat_format(tokenizer)
    check_dialog(dialog, fmt, add_generation_prompt)
    encode = {TEMPLATE: encode_with_template, LLAMA3: encode_llama3, LLAMA2: encode_llama2}[fmt]
    return encode(tokenizer, dialog, add_generation_prompt)


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


def encode_llama3(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """Meta's Llama 3 layout: ``<|begin_of_text|>``, then per message ``<|start_header_id|>{role}<|end_header_id|>``,
    "\\n\\n", the stripped content and ``<|eot_id|>``; then the assistant's header."""
    special = tokenizer.special_tokens

    def header(role: str) -> list[int]:
        start, end = special["<|start_header_id|>"], special["<|end_header_id|>"]
        return [start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n")]

    ids = [special["<|begin_of_text|>"]]
    for message in dialog:
        ids += header(message["role"]) + tokenizer.encode(message["content"].strip()) + [special["<|eot_id|>"]]
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


def render_template(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> str:
    """The text transformers' ``apply_chat_template(..., tokenize=False)`` gives."""
    tokens = {f"{kind}_token": tokenizer.token_name(getattr(tokenizer, f"{kind}_id")) for kind in ("bos", "eos", "pad")}
    template = compile_template(tokenizer.chat_template, tokenizer.source)
    try:
        return template.render(
            messages=dialog, add_generation_prompt=add_generation_prompt, **{k: v for k, v in tokens.items() if v}
        )
    except Exception as e:  # the template's own raise_exception, or its code failing on this dialog
        raise ValueError(f"the chat template of {tokenizer.source} failed on this dialog: {e}") from None


def encode_with_template(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """The checkpoint's chat template, rendered with each content replaced by a sentinel: the template's own text
    may hold control tokens, the contents put back at the sentinels never do."""
    cores, masked = [], []
    for i, message in enumerate(dialog):
        # The sentinel keeps the content's outer whitespace, so a template that trims contents trims it too.
        content = message["content"]
        core = content.strip()
        start = content.find(core) if core else len(content)
        cores.append(core)
        masked.append({**message, "content": f"{content[:start]}\ue000{i}\ue001{content[start + len(core):]}"})
    rendered = render_template(tokenizer, masked, add_generation_prompt)

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
