"""Bad input gets one clear error naming the file and what was expected."""

import pytest

from tokenizer import TokenizerError, check_fits, encode_dialog, load_tokenizer


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer: looked for tokenizer.json, tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("tokenizer.model", b"\x08\x96\x01 certainly not a protobuf \xff\xfe", "not a valid sentencepiece model"),
        ("tokenizer.model", b"SGVsbG8= 0\nV29ybGQ= 1\nnot base64!\n", "not a tiktoken BPE file"),
        ("tokenizer.json", b'{"version": "1.0", "model": ', "not a valid tokenizers tokenizer.json"),
        ("model.gguf", b"GGUF\x03\x00\x00\x00truncated", "not a readable GGUF file"),
    ],
    ids=["sentencepiece", "tiktoken", "tokenizer_json", "gguf"],
)
def test_corrupt_files(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=expected) as error:
        load_tokenizer(tmp_path / name)
    assert str(tmp_path / name) in str(error.value)


@pytest.mark.parametrize(
    "roles",
    [["assistant", "user"], ["user", "user"], ["system", "user", "assistant"], ["user", "system"], ["system"], []],
)
def test_llama2_dialog_roles_out_of_order(sp_model, roles):
    tokenizer = load_tokenizer(sp_model)
    with pytest.raises(ValueError, match="alternating"):
        encode_dialog(tokenizer, [{"role": role, "content": "hi"} for role in roles])


def test_malformed_message(sp_model):
    with pytest.raises(ValueError, match="'role' and 'content'"):
        encode_dialog(load_tokenizer(sp_model), [{"role": "user"}])


def test_tokenizer_larger_than_model(sp_model):
    tokenizer = load_tokenizer(sp_model)  # 1000 tokens
    check_fits(tokenizer, 1024, "padded")  # a padded embedding is fine
    with pytest.raises(TokenizerError, match=r"tokenizer .*tokenizer.model has 1000 tokens, model tiny has 512"):
        check_fits(tokenizer, 512, "tiny")
