"""Generation: greedy parity with transformers, batching, logprobs, sampling, stopping, streaming, bad input.

Tiny models are random (built by transformers and read through our loader) with a byte-level tokenizer; the
"successor" model is wired by hand to emit a chosen byte cycle, which makes stops and multi-byte characters
happen on purpose. The real SmolLM2 checks its first tokens against transformers on the same GGUF."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llama.checkpoint import load_model
from llama.generation import Llama, Request, SamplingParams
from llama.model import ModelArgs, Transformer
from tokenizer import encode_dialog


class ByteTokenizer:
    """A complete byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then BOS and EOS."""

    vocab_size, bos_id, eos_id, pad_id = 258, 256, 257, None
    stop_ids = frozenset({257})
    special_tokens = {"<s>": 256, "</s>": 257}
    chat_template = None
    add_bos = True
    source = "bytes"

    def encode(self, text, bos=False, eos=False, allow_special=False):
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
PROMPTS = ["Hello", "The capital of France is", "a", "0123456789 0123456789 012"]

HF_CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}


def hf_tiny(kind, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        max_position_embeddings=96, rms_norm_eps=1e-5, initializer_range=0.3, **HF_CONFIGS[kind],
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_and_ours(request, tmp_path_factory):
    """The same random weights in transformers and (through an HF folder and our loader) in our model."""
    hf = hf_tiny(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_model(folder)


def hf_greedy(hf, prompt, n):
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=TOK.eos_id, pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt) :].tolist()
    return out[: out.index(TOK.eos_id)] if TOK.eos_id in out else out


def test_greedy_batch_matches_transformers(hf_and_ours):
    hf, model = hf_and_ours
    llama = Llama(model, TOK, max_seq_len=64, max_batch_size=3)  # 4 prompts: two chunks
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    ours, _ = llama.generate(prompts, max_gen_len=20, temperature=0)
    assert ours == [hf_greedy(hf, p, 20) for p in prompts]


def test_batch_equals_one_by_one(hf_and_ours):
    _, model = hf_and_ours
    llama = Llama(model, TOK, max_seq_len=64, max_batch_size=4)
    batched = llama.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True)
    alone = [llama.text_completion([p], temperature=0, max_gen_len=12, logprobs=True)[0] for p in PROMPTS]
    assert [r["generation"] for r in batched] == [r["generation"] for r in alone]
    for b, a in zip(batched, alone):
        assert b["tokens"] == a["tokens"]
        torch.testing.assert_close(b["logprobs"], a["logprobs"], rtol=0, atol=1e-5)


def test_echoed_logprobs_match_transformers_log_softmax(hf_and_ours):
    hf, model = hf_and_ours
    llama = Llama(model, TOK, max_seq_len=64, max_batch_size=4)
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    tokens, logprobs = llama.generate(prompts, max_gen_len=8, temperature=0, logprobs=True, echo=True)
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        assert toks[: len(prompt)] == prompt and len(lps) == len(toks)
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([toks])).logits[0, :-1].float(), dim=-1)
        expected = reference.gather(-1, torch.tensor(toks[1:])[:, None])[:, 0]
        assert lps[0] == 0.0  # the first token has no context (Meta's convention)
        torch.testing.assert_close(torch.tensor(lps[1:]), expected, rtol=0, atol=1e-4)


def test_seed_makes_sampling_reproducible(hf_and_ours):
    _, model = hf_and_ours
    never_stops = ByteTokenizer()
    never_stops.stop_ids = frozenset()  # so that every draw is seen
    llama = Llama(model, never_stops, max_seq_len=64, max_batch_size=2)
    prompts = [TOK.encode("Hello", bos=True)] * 2
    first, _ = llama.generate(prompts, max_gen_len=24, temperature=1.0, top_p=1.0, seed=7)
    again, _ = llama.generate(prompts, max_gen_len=24, temperature=1.0, top_p=1.0, seed=7)
    other, _ = llama.generate(prompts, max_gen_len=24, temperature=1.0, top_p=1.0, seed=8)
    assert first == again and first != other
    assert first[0] != first[1]  # rows draw their own samples


def test_top_k_1_and_tiny_top_p_are_greedy(hf_and_ours):
    _, model = hf_and_ours
    llama = Llama(model, TOK, max_seq_len=64, max_batch_size=4)
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    greedy, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    assert llama.generate(prompts, max_gen_len=10, temperature=1.0, top_k=1)[0] == greedy
    assert llama.generate(prompts, max_gen_len=10, temperature=1.0, top_p=1e-6)[0] == greedy


# ------------------------------------------------------------------------- a model wired to emit a byte cycle


def successor_model(text: str, then_eos: bool = False, max_seq_len: int = 64) -> Transformer:
    """A one-layer model whose next token is always the successor of the current one in the cycle made of
    ``text``'s UTF-8 bytes (all distinct), optionally followed by EOS. Attention and FFN outputs are zeroed, so
    logits are norm(embedding[t]) @ output.T, and output[successor(t)] = embedding[t] makes the successor win."""
    cycle = list(text.encode()) + [TOK.eos_id] * then_eos
    assert len(set(cycle)) == len(cycle)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=TOK.vocab_size, multiple_of=16,
                                  max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        embeddings = torch.randn(TOK.vocab_size, 64)
        model.tok_embeddings.weight.copy_(embeddings)
        model.output.weight.zero_()
        for token, successor in zip(cycle, cycle[1:] + cycle[:1]):
            model.output.weight[successor] = embeddings[token]
    return model


CYCLE = "好😀é中"  # 3 + 4 + 2 + 3 distinct bytes


def test_stream_holds_back_split_characters_and_joins_to_the_completion():
    llama = Llama(successor_model(CYCLE), TOK, max_seq_len=64)
    whole = llama.text_completion(["好"], temperature=0, max_gen_len=24)[0]["generation"]
    assert whole == "😀é中好" * 2
    pieces = [step[0] for step in llama.stream_text_completion(["好"], temperature=0, max_gen_len=24)]
    assert "".join(pieces) == whole
    assert len(pieces) == 8 and not any("\ufffd" in p for p in pieces)  # one piece per complete character


def test_stop_id_ends_generation():
    llama = Llama(successor_model("好😀", then_eos=True), TOK, max_seq_len=64)
    tokens, _ = llama.generate([TOK.encode("好", bos=True)], max_gen_len=30, temperature=0)
    assert tokens == [list("😀".encode())]  # EOS itself is not returned


@pytest.mark.parametrize("stop, expected", [(["中"], "😀é"), (["é中好", "xyz"], "😀")])
def test_stop_strings_cut_the_text_streamed_or_not(stop, expected):
    llama = Llama(successor_model(CYCLE), TOK, max_seq_len=64)
    result = llama.text_completion(["好"], temperature=0, max_gen_len=40, stop=stop)[0]["generation"]
    streamed = "".join(s[0] for s in llama.stream_text_completion(["好"], temperature=0, max_gen_len=40, stop=stop))
    assert result == streamed == expected


def test_max_gen_len_defaults_to_the_rest_of_the_context():
    llama = Llama(successor_model(CYCLE, max_seq_len=32), TOK, max_seq_len=2048)
    assert llama.max_seq_len == 32  # capped by the model's context
    tokens, _ = llama.generate([TOK.encode("好", bos=True)], temperature=0)
    assert len(tokens[0]) == 32 - 4


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda l: l.text_completion([]), "no prompts"),
        (lambda l: l.text_completion(["x" * 40]), "has 41 tokens, more than max_seq_len=32"),
        (lambda l: l.generate([[]]), "prompt 0 is empty"),
        (lambda l: l.text_completion(["a"], temperature=-0.1), "temperature"),
        (lambda l: l.text_completion(["a"], top_p=0), "top_p"),
        (lambda l: l.text_completion(["a"], top_p=1.5), "top_p"),
        (lambda l: l.text_completion(["a"], top_k=-1), "top_k"),
        (lambda l: l.stream_text_completion(["a"], top_k=-1), "top_k"),  # at the call, not at the first step
        (lambda l: l.chat_completion([[{"role": "assistant", "content": "hi"}]]), "out of order"),
        (lambda l: l.chat_completion([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]),
         "out of order"),
        (lambda l: l.chat_completion([[]]), "empty dialog"),
        (lambda l: l.chat_completion([]), "no dialogs"),
    ],
)
def test_bad_input_is_refused_before_any_work(call, message):
    llama = Llama(successor_model(CYCLE, max_seq_len=32), TOK, max_seq_len=32)
    with pytest.raises(ValueError, match=message):
        call(llama)


def test_tokenizer_larger_than_the_model_is_refused():
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=100, max_seq_len=16))
    with pytest.raises(ValueError, match="has 258 tokens, model the model has 100"):
        Llama(model, TOK)


# ------------------------------------------------------------------------- the real SmolLM2-135M-Instruct

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Translate 'good morning' into Japanese.",  # answers in CJK, with characters split across tokens
    "Write one emoji that means happy.",  # answers in emoji (4-byte characters)
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return Llama.build(smollm2_gguf_path, max_seq_len=256, max_batch_size=8)


@pytest.fixture(scope="module")
def smollm2_answers(smollm2):
    """Greedy answers (token ids) to CHAT_QUESTIONS, generated as one left-padded batch."""
    prompts = [encode_dialog(smollm2.tokenizer, [{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
    return prompts, smollm2.generate(prompts, max_gen_len=24, temperature=0)[0]


def test_smollm2_greedy_matches_transformers_on_the_same_gguf(smollm2, smollm2_answers, smollm2_gguf_path):
    path = smollm2_gguf_path
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for prompt, tokens in zip(*smollm2_answers):
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
        assert tokens == [t for t in expected[: len(tokens) + 1] if t not in smollm2.tokenizer.stop_ids]


def test_smollm2_streams_cjk_and_emoji_whole(smollm2, smollm2_answers):
    dialogs = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[2:4]]
    whole = [smollm2.tokenizer.decode(tokens) for tokens in smollm2_answers[1][2:4]]  # chat_completion's text
    steps = list(smollm2.stream_chat_completion(dialogs, temperature=0, max_gen_len=24))
    for i, text in enumerate(whole):
        pieces = [step[i] for step in steps]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces[:-1])  # only a length cut may leave a half character
    assert any("\u3040" <= c <= "\u30ff" for c in whole[0])  # kana
    assert any(ord(c) >= 0x1F300 for c in whole[1])  # emoji


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_greedy_on_cuda_matches_transformers(tmp_path):
    hf = hf_tiny("gqa")
    hf.save_pretrained(tmp_path)
    ours = Llama(load_model(tmp_path, device="cuda", dtype=torch.float32), TOK, max_seq_len=64, max_batch_size=4)
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    tokens, _ = ours.generate(prompts, max_gen_len=12, temperature=0)  # one left-padded batch on the GPU
    assert tokens == [hf_greedy(hf, p, 12) for p in prompts]  # transformers in fp32 on the CPU


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_compiled_decode_gives_the_eager_tokens(quantize, device):
    from torch._dynamo.utils import counters

    # head_dim 64: on CPU decode attention runs in our kernel (where it is built) in both paths; dim 128 and FFN
    # 512 let tinygemm take every int4 linear on CUDA
    with torch.device(device):
        model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=258, max_seq_len=64))
    model.init_weights(std=0.3, seed=0)
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS]
    eager = Llama(copy.deepcopy(model), TOK, max_seq_len=64, max_batch_size=4, quantize=quantize)
    compiled = Llama(model, TOK, max_seq_len=64, max_batch_size=4, quantize=quantize, compile=True)
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    expected, _ = eager.generate(prompts, max_gen_len=16, temperature=0)
    for _ in range(2):  # on CUDA: recording the graphs, then replaying them
        assert compiled.generate(prompts, max_gen_len=16, temperature=0)[0] == expected
    assert compiled.generate(prompts[:1], max_gen_len=16, temperature=0)[0] == expected[:1]  # another batch size
    # 3 rows decode in the graph of 4 (batch sizes are bucketed): no new graph, and the padding row disturbs nothing
    graphs = counters["stats"]["unique_graphs"]
    assert compiled.generate(prompts[:3], max_gen_len=16, temperature=0)[0] == expected[:3]
    assert counters["stats"]["unique_graphs"] == graphs and compiled.engine.buckets == [1, 2, 4]
    assert counters["inductor"]["cudagraph_skips"] == cudagraph_skips  # on CUDA, the step ran as CUDA graphs
    # rows that finish one by one (the last slot first) leave 3, then 2, then 1 busy rows: the step runs over 4, 2
    # and 1 rows, batch sizes it already has graphs for (or one more: 2), not one per count of busy rows
    graphs = counters["stats"]["unique_graphs"]
    lengths = [16, 12, 8, 4]
    assert compiled.generate(prompts, max_gen_len=16, temperature=0)[0] == expected
    ragged = [compiled.generate([p], max_gen_len=n, temperature=0)[0][0] for p, n in zip(prompts, lengths)]
    requests = [Request(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in zip(prompts, lengths)]
    assert [r.tokens for r in compiled.complete(requests)] == ragged
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_compiled_models_in_one_process_keep_their_own_graphs():
    # The compiled step skips Dynamo's guards on the module's tensors; a second model (another shape, another
    # quantisation) must still get graphs of its own rather than the first model's.
    prompts = [TOK.encode(p, bos=True) for p in PROMPTS[:2]]
    outputs = []
    for dim, quantize in [(64, None), (96, "int8")]:
        model = Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, max_seq_len=64))
        model.init_weights(std=0.3, seed=dim)
        eager = Llama(copy.deepcopy(model), TOK, max_seq_len=64, max_batch_size=2, quantize=quantize)
        compiled = Llama(model, TOK, max_seq_len=64, max_batch_size=2, quantize=quantize, compile=True)
        expected, _ = eager.generate(prompts, max_gen_len=12, temperature=0)
        assert compiled.generate(prompts, max_gen_len=12, temperature=0)[0] == expected
        outputs.append(expected)
    assert outputs[0] != outputs[1]
