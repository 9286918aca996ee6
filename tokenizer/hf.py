"""Hugging Face backend: a ``tokenizer.json`` run by the ``tokenizers`` library, with the bos/eos/pad tokens,
``add_bos_token`` and chat template of ``tokenizer_config.json``. GGUF ``gpt2`` vocabularies and tiktoken files are
turned into this backend's byte-level BPE to be saved in the format transformers reads."""

from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from tokenizer.base import Tokenizer, TokenizerError, is_rust_panic
from tokenizer.chat_format import compile_template


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte spelled as a printable character (printable bytes as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@cache
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def spell_bytes(token: bytes) -> str:
    return "".join(byte_to_char()[b] for b in token)


def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split text with a tiktoken-style regex, then spell each piece in the byte-level alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    *,
    special_tokens: list[str] = (),
    ignore_merges: bool = False,
) -> tokenizers.Tokenizer:
    """A GPT-2-style BPE over byte-level spelled tokens; special tokens already in ``vocab`` keep their ids, new
    ones are numbered after it in order."""
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    return backend


def bpe_from_ranks(ranks: dict[bytes, int], pattern: str, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """The tiktoken vocabulary ``ranks`` as an equivalent ``tokenizers`` BPE: each multi-byte token's merge is the
    last step of running BPE on its own bytes with the lower ranks only."""

    def merge_of(token: bytes, rank: int) -> tuple[str, str]:
        parts = [bytes([b]) for b in token]
        while True:
            candidates = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best_rank, i = min(candidates)
            if best_rank >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built by merging two lower-ranked tokens")
        return spell_bytes(parts[0]), spell_bytes(parts[1])

    vocab = {spell_bytes(token): rank for token, rank in ranks.items()}
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    merges = [merge_of(token, rank) for token, rank in by_rank if len(token) > 1]
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does.
    return byte_level_bpe(vocab, merges, split_then_bytes(pattern), special_tokens=special_tokens, ignore_merges=True)


def drop_implicit_space(component: dict | None) -> bool:
    """Edit a ``tokenizer.json`` normalizer, pre-tokenizer or decoder in place so that it neither puts "▁" before
    a text (Llama 2's ``Prepend``, ``Metaspace`` with a prepend scheme) nor strips it when decoding (``Strip``, the
    same ``Metaspace``); True if there was anything to change."""
    if not isinstance(component, dict):
        return False
    changed = False
    if component.get("type") == "Metaspace" and (
        component.get("prepend_scheme", "never") != "never" or component.get("add_prefix_space")
    ):
        component["prepend_scheme"] = "never"
        component.pop("add_prefix_space", None)
        changed = True
    for key in ("normalizers", "pretokenizers", "decoders"):
        if isinstance(component.get(key), list):
            kept = [part for part in component[key] if part.get("type") not in ("Prepend", "Strip")]
            changed |= len(kept) != len(component[key])
            component[key] = kept
            changed |= any([drop_implicit_space(part) for part in kept])
    return changed


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` ({} if there is no such file); anything else is an error naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object {{...}}, got a {type(data).__name__}")
    return data


def read_tokenizer_config(folder: Path) -> dict:
    """``tokenizer_config.json`` of ``folder`` ({} if absent), token entries reduced to their text and the chat
    template taken from ``chat_template.jinja`` or the default of a template list (checked to compile)."""
    path = folder / "tokenizer_config.json"
    config = read_json_object(path)
    try:
        for key in ("bos_token", "eos_token", "pad_token"):
            if isinstance(config.get(key), dict):
                config[key] = config[key]["content"]
            if not isinstance(config.get(key), (str, type(None))):
                raise TypeError(f"{key} must be a string or an object with a 'content' string")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {entry["name"]: entry["template"] for entry in template}.get("default")
        if not isinstance(template, (str, type(None))):
            raise TypeError("chat_template must be a string or a list of {name, template} objects")
    except (KeyError, TypeError) as e:
        raise TokenizerError(f"{path}: {type(e).__name__}: {e}") from None
    if (folder / "chat_template.jinja").is_file():  # transformers >= 4.50 saves the template on its own
        path = folder / "chat_template.jinja"
        template = path.read_text()
    if template is not None:
        compile_template(template, path)
    config["chat_template"] = template
    return config


def generation_eos_ids(folder: Path) -> tuple[int, ...]:
    """The ``eos_token_id`` (an id or a list) of ``folder/generation_config.json``, if any."""
    path = folder / "generation_config.json"
    eos = read_json_object(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(ids)


class HFTokenizer(Tokenizer):
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
        extra_stop_ids: tuple[int, ...] = (),
    ):
        self.source = source
        self.backend = backend
        # A twin that reads control-token text as plain text (tokenizers matches added tokens otherwise).
        self.plain_backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self.plain_backend.encode_special_tokens = True
        added = backend.get_added_tokens_decoder()
        self.added_ids = set(added)
        self.special_tokens = {token.content: i for i, token in added.items() if token.special}
        self.id_to_token = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
        self.vocab_size = max(self.id_to_token) + 1
        self.byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str())["decoder"])
        self.bos_id, self.eos_id, self.pad_id = (
            None if token is None else backend.token_to_id(token) for token in (bos_token, eos_token, pad_token)
        )
        if add_bos is None:  # no config says: follow the file's post-processor
            add_bos = self._post_processor_adds_bos(backend)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.stop_ids = self._find_stop_ids(extra_stop_ids)

    @classmethod
    def from_file(cls, path: Path) -> HFTokenizer:
        """``tokenizer.json`` with the configs beside it."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except BaseException as e:  # tokenizers raises a bare Exception for unreadable files, a Rust panic for some
            if not isinstance(e, Exception) and not is_rust_panic(e):
                raise
            raise TokenizerError(f"{path} is not a valid tokenizers tokenizer.json: {e}") from None
        config = read_tokenizer_config(path.parent)
        return cls(
            backend,
            str(path),
            bos_token=config.get("bos_token"),
            eos_token=config.get("eos_token"),
            pad_token=config.get("pad_token"),
            add_bos=config.get("add_bos_token"),
            chat_template=config["chat_template"],
            extra_stop_ids=generation_eos_ids(path.parent),
        )

    def _post_processor_adds_bos(self, backend: tokenizers.Tokenizer) -> bool:
        return self.bos_id is not None and backend.encode("a").ids[:1] == [self.bos_id]

    def _encode_plain(self, text: str) -> list[int]:
        return self.plain_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def _continuation(self) -> tokenizers.Tokenizer | None:
        """A twin without the implicit leading "▁" of Llama-2-style files, or None when there is none."""
        spec = json.loads(self.plain_backend.to_str())
        for key in ("normalizer", "decoder"):
            if isinstance(spec.get(key), dict) and spec[key].get("type") in ("Prepend", "Strip"):
                spec[key] = None
        changed = [drop_implicit_space(spec.get(key)) for key in ("normalizer", "pre_tokenizer", "decoder")]
        if spec != json.loads(self.plain_backend.to_str()) or any(changed):
            twin = tokenizers.Tokenizer.from_str(json.dumps(spec))
            twin.encode_special_tokens = True
            return twin
        return None

    def encode_infill(self, text: str) -> list[int]:
        if self._continuation is None:
            return self._encode_plain(text)
        return self._continuation.encode(text, add_special_tokens=False).ids

    def decode_infill(self, ids: list[int]) -> str:
        if self._continuation is None:
            return self.decode(ids)
        return self._continuation.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def with_added_tokens(self, names: list[str]) -> HFTokenizer:
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        new = [name for name in dict.fromkeys(names) if self.token_id(name) is None]
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in new])
        return HFTokenizer(
            backend,
            self.source,
            bos_token=self.token_name(self.bos_id),
            eos_token=self.token_name(self.eos_id),
            pad_token=self.token_name(self.pad_id),
            add_bos=self.add_bos,
            chat_template=self.chat_template,
            extra_stop_ids=tuple(self.stop_ids),
        )

    def token_bytes(self, token_id: int) -> bytes:
        token = self.id_to_token.get(token_id, "")
        if self.byte_level and token_id not in self.added_ids:
            return bytes(char_to_byte()[c] for c in token)
        return token.encode()

    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        if self.add_bos and not self._post_processor_adds_bos(backend):
            # transformers adds BOS through the post-processor; make it do what add_bos says.
            bos = self.token_name(self.bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        backend.save(str(out_dir / "tokenizer.json"))
        self._write_configs(out_dir, "PreTrainedTokenizerFast")
