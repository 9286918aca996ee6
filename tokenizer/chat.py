"""Chat formats: a checkpoint's own Jinja chat template (rendered as transformers renders it), else Llama 3's
header format, else Llama 2's ``[INST]`` format (both as Meta's reference code lays them out).

Message contents are always encoded as plain text: control-token text typed by a user ("<|eot_id|>") never becomes
a control token, whatever the format.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenizer.base import Tokenizer

Dialog = list[dict[str, str]]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``dialog`` (a list of {"role", "content"}) in the tokenizer's chat format, ending, with
    ``add_generation_prompt``, where the assistant's answer begins."""
    for message in dialog:
        if not (isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))):
            raise ValueError(f"each message must be a dict with string 'role' and 'content', got {message!r}")
    if tokenizer.chat_template is not None:
        return encode_with_template(tokenizer, dialog, add_generation_prompt)
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return encode_llama3(tokenizer, dialog, add_generation_prompt)
    return encode_llama2(tokenizer, dialog, add_generation_prompt)


def encode_llama2(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> list[int]:
    """Meta's Llama 2 ``chat_completion`` layout: the system prompt folded into the first user message, each
    answered turn as ``<s>[INST] {user} [/INST] {answer} </s>``, the open turn as ``<s>[INST] {user} [/INST]``."""
    roles = [message["role"] for message in dialog]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    alternating = turns == ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2)
    if not turns or not alternating or (add_generation_prompt and turns[-1] != "user"):
        raise ValueError(
            "Llama 2 dialogs are an optional 'system' message, then 'user' and 'assistant' alternating"
            f"{', ending with user' if add_generation_prompt else ''}; got roles {roles}"
        )
    if roles[0] == "system":
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


@cache
def _compile(template: str) -> jinja2.Template:
    """The template in transformers' sandboxed environment, with the helpers it defines."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


def render_template(tokenizer: Tokenizer, dialog: Dialog, add_generation_prompt: bool = True) -> str:
    """The text transformers' ``apply_chat_template(..., tokenize=False)`` gives."""
    tokens = {f"{kind}_token": tokenizer.token_name(getattr(tokenizer, f"{kind}_id")) for kind in ("bos", "eos", "pad")}
    return _compile(tokenizer.chat_template).render(
        messages=dialog, add_generation_prompt=add_generation_prompt, **{k: v for k, v in tokens.items() if v}
    )


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
