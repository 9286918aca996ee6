"""Fixtures shared by the generation and serving tests: a sentencepiece vocabulary with Code Llama's FIM pieces, a
Llama-3-format tokenizer, and a model wired to write a given sequence of tokens."""

import base64
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFBackend
from tokenizers import models, pre_tokenizers, trainers

from llama.model import ModelArgs, Transformer
from tokenizer import load_tokenizer
from tokenizer.hf import char_to_byte, split_then_bytes
from tokenizer.tiktoken_bpe import LLAMA3_PATTERN
from tokenizer.train import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def fim_tokenizers(tmp_path_factory):
    """(plain, with Code Llama's FIM pieces): a 600-piece sentencepiece model trained on two stdlib files."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    train([str(STDLIB / "textwrap.py"), str(STDLIB / "shlex.py")], vocab_size=600, output=str(prefix))
    plain = load_tokenizer(prefix.with_suffix(".model"))
    return plain, plain.with_added_tokens(["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"])


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """A Llama-3-format tokenizer.model (tiktoken ranks, Meta's 256 special tokens) of a 600-token BPE."""
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = split_then_bytes(LLAMA3_PATTERN)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train([str(STDLIB / "textwrap.py"), str(STDLIB / "shlex.py")], trainer)
    vocab = backend.get_vocab()
    ranks = sorted(((bytes(char_to_byte()[c] for c in t), i) for t, i in vocab.items()), key=lambda x: x[1])
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
    return load_tokenizer(path)


def _chain_model(tokenizer, chain: list[int], max_seq_len: int = 128) -> Transformer:
    """A one-layer model whose next token after ``chain[i]`` is ``chain[i + 1]``: attention and FFN outputs are
    zeroed, so the logits are norm(embedding[t]) @ output.T, and output[next] = embedding[t] makes ``next`` win."""
    assert len(set(chain)) == len(chain)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.vocab_size, multiple_of=16,
                                  max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        embeddings = torch.randn(tokenizer.vocab_size, 64, generator=torch.Generator().manual_seed(0))
        model.tok_embeddings.weight.copy_(embeddings)
        model.output.weight.zero_()
        for token, following in zip(chain, chain[1:]):
            model.output.weight[following] = embeddings[token]
    return model


@pytest.fixture(scope="session")
def chain_model():
    """``chain_model(tokenizer, chain, max_seq_len=128)``: see ``_chain_model``."""
    return _chain_model
