"""Fill-in-the-middle: a vocabulary's FIM tokens and Code Llama's layout of a prefix, a suffix and the middle.

Code Llama (meta-llama/codellama, ``infilling_prompt_tokens``; paper section 2.3) lays out an infilling prompt as

    prefix-suffix-middle (PSM):  [bos, PRE] + enc(prefix) + [SUF] + enc_infill(suffix) + [MID]
    suffix-prefix-middle (SPM):  [bos, PRE, SUF] + enc_infill(suffix) + [MID] + enc(prefix)

and the model writes the middle after it, ``enc_infill(middle)``, then ``EOT``. ``enc_infill`` leaves out the space
a sentencepiece tokenizer implicitly puts before a text (``Tokenizer.encode_infill``), so the suffix and the middle
are encoded as the continuations they are. Training documents (``llama.training.fim``) use the same layout with
the middle and its end appended. Code Llama's tokens are ``▁<PRE>``, ``▁<SUF>``, ``▁<MID>``, ``▁<EOT>``; the
StarCoder family names them ``<fim_prefix>``, ``<fim_suffix>``, ``<fim_middle>`` and ends the middle with EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizer.base import Tokenizer, TokenizerError

# family -> names of (prefix, suffix, middle, end of the middle); None: the middle ends with EOS
FIM_TOKEN_NAMES = {
    "Code Llama": ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"),
    "StarCoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", None),
}


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    end: int | None  # the token that ends the middle (Code Llama's EOT); None: EOS does


def fim_tokens(tokenizer: Tokenizer) -> FimTokens:
    """The FIM tokens of ``tokenizer``'s vocabulary, or a TokenizerError saying what was looked for."""
    for names in FIM_TOKEN_NAMES.values():
        ids = [None if name is None else tokenizer.token_id(name) for name in names]
        if None not in ids[:3]:
            return FimTokens(*ids)
    looked_for = "; ".join(f"{family}: {' '.join(n for n in names if n)}" for family, names in FIM_TOKEN_NAMES.items())
    raise TokenizerError(
        f"tokenizer {tokenizer.source} has no fill-in-the-middle tokens (looked for {looked_for}): infilling needs "
        "a model trained with them (add them with llama.prepare --add_tokens and --model.add_tokens, then train "
        "with --fim_rate)"
    )


def infilling_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The ids of Code Llama's infilling prompt (PSM, or SPM with ``suffix_first``); BOS first when the tokenizer
    adds one to plain text, as Code Llama's does."""
    fim = fim_tokens(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    suffix_ids = tokenizer.encode_infill(suffix)
    if suffix_first:
        return bos + [fim.prefix, fim.suffix] + suffix_ids + [fim.middle] + tokenizer.encode(prefix)
    return bos + [fim.prefix] + tokenizer.encode(prefix) + [fim.suffix] + suffix_ids + [fim.middle]


def fim_document(tokenizer: Tokenizer, prefix: str, middle: str, suffix: str, suffix_first: bool) -> list[int]:
    """A training document cut into ``prefix + middle + suffix``: the infilling prompt, the middle, its end
    (``EOT`` when the vocabulary has one) and EOS."""
    fim = fim_tokens(tokenizer)
    end = [fim.end] if fim.end is not None else []
    return (
        infilling_prompt(tokenizer, prefix, suffix, suffix_first)
        + tokenizer.encode_infill(middle)
        + end
        + tokenizer.encode("", eos=True)
    )
