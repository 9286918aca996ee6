"""Fill-in-the-middle prompts against a port of Meta's codellama code (its ``Tokenizer`` and
``infilling_prompt_tokens``), on a sentencepiece model trained here with Code Llama's four pieces, and on
transformers' conversion of that model to ``tokenizer.json`` (the port then encoding with transformers' tokenizer,
which splits leading spaces differently from sentencepiece); StarCoder-family names on a BPE."""

import pytest
from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
from transformers import AutoTokenizer

from tokenizer import TokenizerError, load_tokenizer
from tokenizer.fim import FIM_TOKEN_NAMES, fim_tokens, infilling_prompt
from tokenizer.sp import SentencePieceTokenizer

CODE_LLAMA_PIECES = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]  # the order of Code Llama's ids 32007-32010
CASES = [
    ("def f(x):\n    return ", "\n\nprint(f(2))\n"),
    ("x = [", " for i in range(3)]"),  # a suffix that starts with a space
    ("", "    return result\n"),  # an empty prefix
    ("if ok:\n\t", ""),
    ("  text = 'naïve café ", "日本'\n"),
]


class TransformersProcessor:
    """The three calls the port makes of a SentencePieceProcessor, answered by a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, s):
        return self.tokenizer(s, add_special_tokens=False).input_ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def piece_to_id(self, piece):
        return self.tokenizer.convert_tokens_to_ids(piece)

    def bos_id(self):
        return self.tokenizer.bos_token_id


class CodeLlamaTokenizer:
    """A port of meta-llama/codellama's llama/tokenizer.py: the parts ``infilling_prompt_tokens`` uses."""

    def __init__(self, model_proto: bytes | None = None, processor=None):
        if processor is None:
            processor = SentencePieceProcessor()
            processor.LoadFromSerializedProto(model_proto)
        self.sp_model = processor
        self.bos_id = self.sp_model.bos_id()
        self.prefix_id = self.sp_model.piece_to_id("▁<PRE>") or None
        self.middle_id = self.sp_model.piece_to_id("▁<MID>") or None
        self.suffix_id = self.sp_model.piece_to_id("▁<SUF>") or None
        self.eot_id = self.sp_model.piece_to_id("▁<EOT>") or None

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        assert not eos
        return [self.bos_id] * bos + self.sp_model.encode(s)

    def encode_infilling(self, s: str) -> list[int]:
        """Encode a string without an implicit leading space."""
        return self.sp_model.encode("☺" + s)[2:]

    def decode_infilling(self, t: list[int]) -> str:
        """Decode a string without an implicit leading space."""
        return self.sp_model.decode([self.sp_model.piece_to_id("☺")] + t)[1:]


class TransformersCodeLlamaTokenizer(CodeLlamaTokenizer):
    """The port over a transformers tokenizer, where "☺" (a user-defined piece) becomes an added token and so
    encodes alone as one id, not two: Meta's sentinel trick with the sentinel's own ids counted."""

    def __init__(self, tokenizer):
        super().__init__(processor=TransformersProcessor(tokenizer))

    def encode_infilling(self, s: str) -> list[int]:
        return self.sp_model.encode("☺" + s)[len(self.sp_model.encode("☺")) :]


def infilling_prompt_tokens(tokenizer: CodeLlamaTokenizer, pre: str, suf: str, suffix_first: bool = False):
    """A port of meta-llama/codellama's llama/generation.py ``infilling_prompt_tokens``."""
    assert tokenizer.prefix_id is not None and tokenizer.middle_id is not None and tokenizer.suffix_id is not None
    if suffix_first:
        # format as "<PRE> <SUF>{suf} <MID> {pre}"
        return (
            [tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id]
            + tokenizer.encode_infilling(suf)
            + [tokenizer.middle_id]
            + tokenizer.encode(pre, bos=False, eos=False)
        )
    # format as "<PRE> {pre} <SUF>{suf} <MID>"
    return (
        [tokenizer.bos_id, tokenizer.prefix_id]
        + tokenizer.encode(pre, bos=False, eos=False)
        + [tokenizer.suffix_id]
        + tokenizer.encode_infilling(suf)
        + [tokenizer.middle_id]
    )


@pytest.fixture(scope="module")
def code_llama_sp(sp_model):
    """The stdlib sentencepiece model with Code Llama's "☺" (a piece of its own in Llama's vocabulary, which the
    reference's encode_infilling relies on) and the four FIM pieces added by ``with_added_tokens``."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    proto.pieces.add(piece="☺", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    base = SentencePieceTokenizer(proto.SerializeToString(), str(sp_model))
    return base.with_added_tokens(CODE_LLAMA_PIECES)


@pytest.fixture(scope="module")
def code_llama_hf(code_llama_sp, tmp_path_factory):
    """(ours, transformers'): the same vocabulary as transformers converts it to tokenizer.json (a Metaspace
    pre-tokenizer that prepends "▁" and a decoder that strips it), read by our HF backend and by transformers."""
    folder = tmp_path_factory.mktemp("code_llama_sp")
    code_llama_sp.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "hf")
    (folder / "hf" / "tokenizer.model").unlink(missing_ok=True)
    return load_tokenizer(folder / "hf"), AutoTokenizer.from_pretrained(folder / "hf")


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prompt_ids_equal_code_llamas(code_llama_sp, code_llama_hf, case, suffix_first):
    prefix, suffix = CASES[case]
    reference = CodeLlamaTokenizer(code_llama_sp.model_proto)
    pieces = reference.sp_model.encode("☺")
    assert pieces == [reference.sp_model.piece_to_id(p) for p in "▁☺"]  # "▁", then "☺": the port's premise
    expected = infilling_prompt_tokens(reference, prefix, suffix, suffix_first)
    assert infilling_prompt(code_llama_sp, prefix, suffix, suffix_first) == expected

    ours, theirs = code_llama_hf
    assert type(ours).__name__ == "HFTokenizer"
    expected = infilling_prompt_tokens(TransformersCodeLlamaTokenizer(theirs), prefix, suffix, suffix_first)
    assert infilling_prompt(ours, prefix, suffix, suffix_first) == expected


@pytest.mark.parametrize("text", [" = 1\n", "x", "  two spaces", "\tindent", ""])
def test_middle_decodes_like_code_llama(code_llama_sp, code_llama_hf, text):
    ours, theirs = code_llama_hf
    for tokenizer, reference in [
        (code_llama_sp, CodeLlamaTokenizer(code_llama_sp.model_proto)),
        (ours, TransformersCodeLlamaTokenizer(theirs)),
    ]:
        ids = reference.encode_infilling(text)
        assert tokenizer.encode_infill(text) == ids
        assert tokenizer.decode_infill(ids) == reference.decode_infilling(ids) == text


def test_code_llama_tokens_found(code_llama_sp):
    fim = fim_tokens(code_llama_sp)
    reference = CodeLlamaTokenizer(code_llama_sp.model_proto)
    assert (fim.prefix, fim.suffix, fim.middle, fim.end) == (
        reference.prefix_id, reference.suffix_id, reference.middle_id, reference.eot_id
    )
    assert min(fim.prefix, fim.suffix, fim.middle, fim.end) == 1001  # after the 1000 pieces and "☺"


def test_starcoder_names_on_a_bpe(smollm2_gguf_path):
    smollm2 = load_tokenizer(smollm2_gguf_path)
    with pytest.raises(TokenizerError, match=r"no fill-in-the-middle tokens \(looked for Code Llama: ▁<PRE>"):
        fim_tokens(smollm2)
    names = FIM_TOKEN_NAMES["StarCoder"][:3]
    grown = smollm2.with_added_tokens(list(names))
    fim = fim_tokens(grown)
    assert (fim.prefix, fim.suffix, fim.middle, fim.end) == (49152, 49153, 49154, None)
    # no BOS (SmolLM2 adds none) and no implicit space to remove in a byte-level BPE
    expected = [49152, *grown.encode("def f("), 49153, *grown.encode("):\n"), 49154]
    assert infilling_prompt(grown, "def f(", "):\n") == expected
