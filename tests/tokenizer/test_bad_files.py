"""Tokenizer files that parse but are not what they should be, and text that is not text: each refused with the
file (or the text's position) named and what was expected, including panics of the Rust libraries underneath."""

import base64
import json
import shutil

import pytest

from llama.checkpoint.embedded import default_checkpoint
from llama.training.shards import prepare
from tokenizer import TokenizerError, encode_dialog, load_tokenizer
from tokenizer.corpus import CorpusError
from tokenizer.tiktoken_bpe import TiktokenTokenizer

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


@pytest.fixture
def hf_folder(tmp_path):
    """SmolLM2's tokenizer files, to be damaged one at a time."""
    for name in HF_FILES:
        shutil.copy(default_checkpoint() / name, tmp_path / name)
    return tmp_path


def edit_json(file, change):
    """``change`` edits the parsed JSON in place, or returns what replaces it."""
    data = json.loads(file.read_text())
    replaced = change(data)
    file.write_text(json.dumps(data if replaced is None else replaced))


@pytest.mark.parametrize("name, change, message", [
    ("tokenizer_config.json", lambda c: [c], r"tokenizer_config.json: expected a JSON object \{...\}, got a list"),
    ("tokenizer_config.json", lambda c: c.update(eos_token=2),
     "tokenizer_config.json: TypeError: eos_token must be a string or an object with a 'content' string"),
    ("tokenizer_config.json", lambda c: c.update(chat_template=7),
     "tokenizer_config.json: TypeError: chat_template must be a string or a list"),
    ("tokenizer_config.json", lambda c: c.update(chat_template="{% for m in messages %}{{ m.content }"),
     r"tokenizer_config.json: the chat template does not compile: unexpected '}' \(its line 1\)"),
    ("generation_config.json", lambda c: [c], r"generation_config.json: expected a JSON object \{...\}, got a list"),
    ("generation_config.json", lambda c: c.update(eos_token_id="2"),
     "generation_config.json: eos_token_id must be a token id or a list of them, got '2'"),
], ids=["config_list", "eos_not_text", "template_not_text", "template_syntax", "generation_list", "eos_not_id"])
def test_json_of_the_wrong_shape_is_named(hf_folder, name, change, message):
    edit_json(hf_folder / name, change)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(hf_folder)


def test_broken_json_and_template_files_are_named(hf_folder):
    (hf_folder / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(TokenizerError, match="generation_config.json is not valid JSON: Expecting value"):
        load_tokenizer(hf_folder)
    (hf_folder / "generation_config.json").unlink()
    (hf_folder / "chat_template.jinja").write_text("{% if messages %}never closed")
    with pytest.raises(TokenizerError, match="chat_template.jinja: the chat template does not compile: Unexpected end"):
        load_tokenizer(hf_folder)


def test_a_template_that_fails_on_a_dialog_names_the_tokenizer(hf_folder):
    template = "{{ raise_exception('no') if messages|length > 1 }}{{ messages[0].content }}"
    edit_json(hf_folder / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    tokenizer = load_tokenizer(hf_folder)
    assert encode_dialog(tokenizer, [{"role": "user", "content": "hi"}]) == tokenizer.encode("hi")
    dialog = [{"role": role, "content": "hi"} for role in ("user", "assistant", "user")]
    with pytest.raises(ValueError, match=r"the chat template of .*tokenizer.json failed on this dialog: no$"):
        encode_dialog(tokenizer, dialog)


# ------------------------------------------------------------------------------------------------- tiktoken


def tiktoken_lines(pairs) -> str:
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in pairs)


BYTES = [(bytes([b]), b) for b in range(256)]


@pytest.mark.parametrize("extra, message", [
    ([(b"ab", 5)], "line 257 repeats the token or rank of line 6"),
    ([(b"ab", 256), (b"ab", 257)], "line 258 repeats the token or rank of line 257"),
], ids=["rank_twice", "token_twice"])
def test_a_tiktoken_file_with_duplicates_is_named(tmp_path, extra, message):
    (tmp_path / "tokenizer.model").write_text(tiktoken_lines(BYTES + extra))
    with pytest.raises(TokenizerError, match=f"tokenizer.model is not a tiktoken BPE file .*: {message}"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_a_panic_in_tiktoken_becomes_an_error_naming_the_source():
    """tiktoken's Rust core panics on ranks it cannot use; the panic derives from BaseException, so it would pass
    through ``except Exception`` (and end a server's request loop)."""
    ranks = dict(BYTES) | {b"ab": 5}  # two tokens of rank 5
    with pytest.raises(TokenizerError, match="my.model: tiktoken cannot use this vocabulary: Encoder and decoder"):
        TiktokenTokenizer(ranks, "my.model")


# ------------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def tiktoken_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text(tiktoken_lines(BYTES))
    return path


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_a_lone_surrogate_is_refused_with_its_position(kind, sp_model, tiktoken_model):
    path = {"hf": default_checkpoint(), "sentencepiece": sp_model, "tiktoken": tiktoken_model}[kind]
    tokenizer = load_tokenizer(path)
    with pytest.raises(ValueError, match="text holds a lone surrogate, U[+]DC80 at index 3: not valid Unicode text"):
        tokenizer.encode("abc\udc80def")
    assert tokenizer.decode(tokenizer.encode("abc\ufffddef")) == "abc\ufffddef"  # the replacement character is text


def test_a_jsonl_document_with_a_lone_surrogate_is_named_with_its_line(tmp_path, sp_model):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n')
    with pytest.raises(CorpusError, match=r"docs.jsonl:2: 'text': text holds a lone surrogate, U\+D800 at index 4"):
        prepare([str(tmp_path / "docs.jsonl")], str(sp_model), tmp_path / "shards")
