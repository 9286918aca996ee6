"""Tool calls through ``Llama.chat_completion`` with a Llama-3-format tokenizer: a model wired to write a
code-interpreter call ends its turn at ``<|eom_id|>``, and the answer comes back as a structured call with the stop
reason that ended it; the call and its result then extend the dialog."""

import base64
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFBackend
from tokenizers import models, pre_tokenizers, trainers

from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from tokenizer import encode_dialog, load_tokenizer
from tokenizer.hf import char_to_byte, split_then_bytes
from tokenizer.tiktoken_bpe import LLAMA3_PATTERN

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DIALOG = [{"role": "user", "content": "Is 7 prime?"}]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
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


def chain_model(tokenizer, chain: list[int]) -> Transformer:
    """A one-layer model whose next token after ``chain[i]`` is ``chain[i + 1]``: attention and FFN outputs are
    zeroed, so the logits are norm(embedding[t]) @ output.T, and output[next] = embedding[t] makes ``next`` win."""
    assert len(set(chain)) == len(chain)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.vocab_size, multiple_of=16,
                                  max_seq_len=128)).eval()
    with torch.no_grad():
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        embeddings = torch.randn(tokenizer.vocab_size, 64, generator=torch.Generator().manual_seed(0))
        model.tok_embeddings.weight.copy_(embeddings)
        model.output.weight.zero_()
        for token, following in zip(chain, chain[1:]):
            model.output.weight[following] = embeddings[token]
    return model


@pytest.mark.parametrize("end, stop_reason", [("<|eom_id|>", "end_of_message"), ("<|eot_id|>", "end_of_turn")])
def test_a_tool_call_comes_back_structured_with_its_stop_reason(llama3, end, stop_reason):
    prompt = encode_dialog(llama3, DIALOG, builtin_tools=["code_interpreter"])
    code = llama3.encode("print(7)")
    special = llama3.special_tokens
    model = chain_model(llama3, [prompt[-1], special["<|python_tag|>"], *code, special[end]])
    llama = Llama(model, llama3, max_seq_len=128, max_batch_size=2)
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=20, builtin_tools=["code_interpreter"])[0]
    call = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(7)"}}}
    expected = {"role": "assistant", "content": "", "tool_calls": [call], "stop_reason": stop_reason}
    assert answer["generation"] == expected
    # the call and the tool's result extend the dialog, which the assistant then answers
    dialog = DIALOG + [answer["generation"], {"role": "ipython", "content": "7"}]
    extended = encode_dialog(llama3, dialog, builtin_tools=["code_interpreter"])
    assert extended[: len(prompt)] == prompt
    assert llama3.decode(extended[len(prompt):]) == (
        "<|python_tag|>print(7)<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n7<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_without_tools_the_text_is_returned_as_is(llama3):
    prompt = encode_dialog(llama3, DIALOG)
    generated = [llama3.special_tokens["<|python_tag|>"], *llama3.encode("print(7)")]
    llama = Llama(chain_model(llama3, [prompt[-1], *generated]), llama3, max_seq_len=128, max_batch_size=1)
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=3)[0]["generation"]
    assert answer == {"role": "assistant", "content": llama3.decode(generated[:3]), "stop_reason": "out_of_tokens"}
    assert answer["content"].startswith("<|python_tag|>print")


def test_a_streamed_call_is_its_text(llama3):
    prompt = encode_dialog(llama3, DIALOG, builtin_tools=["code_interpreter"])
    code = llama3.encode("print(7)")
    model = chain_model(llama3, [prompt[-1], llama3.special_tokens["<|python_tag|>"], *code,
                                 llama3.special_tokens["<|eom_id|>"]])
    llama = Llama(model, llama3, max_seq_len=128, max_batch_size=1)
    steps = llama.stream_chat_completion([DIALOG], temperature=0, max_gen_len=20, builtin_tools=["code_interpreter"])
    assert "".join(pieces[0] for pieces in steps) == "<|python_tag|>print(7)"
