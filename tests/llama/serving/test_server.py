"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 at a free port (in a thread of the
test process), called through the official ``openai`` client and raw HTTP (httpx). The model is a tiny random Llama
(transformers' weights read by our loader) with a byte-level tokenizer; reference outputs come from ``Llama`` on a
second copy of the same weights, and logprobs from transformers' own forward of those weights."""

from __future__ import annotations

import copy
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import psutil
import pytest
import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import load_model
from llama.generation import Llama, Request, SamplingParams
from llama.model import ModelArgs, Transformer
from llama.serving import create_app
from llama.serving.app import assistant_message
from tokenizer import encode_dialog, load_tokenizer
from tokenizer.fim import fim_tokens, infilling_prompt


class ByteTokenizer:
    """A complete byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then BOS and EOS (Llama 2's chat format)."""

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

    def token_id(self, text):
        return self.special_tokens.get(text)


TOK = ByteTokenizer()
MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory):
    """A random 2-layer Llama (GQA) saved by transformers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_SEQ_LEN, rms_norm_eps=1e-5, initializer_range=0.3,
    )
    folder = tmp_path_factory.mktemp("tiny-hf")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def tiny_llama(folder, **options) -> Llama:
    return Llama(load_model(folder), TOK, max_seq_len=MAX_SEQ_LEN, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(llm: Llama, **options):
    """Serve ``llm`` on 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``) and the scheduler once the engine
    is warm."""
    app = create_app(llm, "tiny", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.app.state.server.scheduler.warm.is_set()):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.app.state.server.scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=30)


KEY = "test-key"
NO_EOS = {str(TOK.eos_id): -100}  # the random model may pick EOS; long requests must not stop early
PROMPTS = ["Hello", "The capital of France is", "a", "0123456789 0123456789 012", "Once upon a time, there",
           "xyz", "Roses are red, violets", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def reference(tiny_hf_folder):
    """``Llama`` on its own copy of the weights: what a request gives alone, outside the server."""
    return tiny_llama(tiny_hf_folder, max_batch_size=1)


@pytest.fixture(scope="module")
def server(tiny_hf_folder):
    llm = tiny_llama(tiny_hf_folder, max_batch_size=4, prefill_chunk=16)  # prompts over 16 tokens take steps
    with running_server(llm, api_key=KEY, max_body_bytes=64 << 10) as (url, _):
        yield url, llm


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def post(url, path, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def metric(url, name) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def alone(reference, prompt: str | list[int], n: int, **sampling) -> Request:
    """The greedy request run by ``Llama`` alone (EOS biased away, as the server's requests here)."""
    prompt = TOK.encode(prompt, bos=True) if isinstance(prompt, str) else prompt
    params = SamplingParams(temperature=0, max_tokens=n, logit_bias={TOK.eos_id: -100}, **sampling)
    (request,) = reference.complete([Request(prompt, params)])
    assert len(request.tokens) == n
    return request


# ------------------------------------------------------------------------------------------------ the API


def test_streamed_text_equals_the_whole_text_with_a_stop_string_split_over_tokens(client, reference):
    prompt = PROMPTS[1]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, logit_bias=NO_EOS)
    text = whole.choices[0].text
    assert text == TOK.decode(alone(reference, prompt, 40).tokens)
    # a stop string of two printable characters from the middle: byte tokens bring it one character at a time
    start = next(i for i in range(8, len(text) - 2)
                 if text[i : i + 2].isprintable() and "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    cut = text[: text.find(stop)]
    for kind in ("completions", "chat"):
        if kind == "completions":
            options = dict(prompt=prompt, max_tokens=40, temperature=0, logit_bias=NO_EOS, stop=[stop, "never"])
            create = client.completions.create
            joined = lambda chunks: "".join(c.choices[0].text for c in chunks if c.choices)  # noqa: E731
            plain = lambda r: r.choices[0].text  # noqa: E731
        else:
            options = dict(messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0,
                           logit_bias=NO_EOS)
            create = client.chat.completions.create
            joined = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
            plain = lambda r: r.choices[0].message.content  # noqa: E731
        result = create(model="tiny", **options)
        chunks = list(create(model="tiny", stream=True, stream_options={"include_usage": True}, **options))
        assert joined(chunks) == plain(result)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == result.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == result.usage.completion_tokens
        if kind == "completions":
            # streamed, the stop string's first character arrived a token before the second: had it been sent,
            # the joined stream would hold it
            assert plain(result) == cut and result.choices[0].finish_reason == "stop"
        else:
            assert chunks[0].choices[0].delta.role == "assistant"


def test_n_choices_with_a_seed_are_reproducible(client):
    options = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=3, logit_bias=NO_EOS)
    first = [c.text for c in client.completions.create(seed=5, **options).choices]
    assert first == [c.text for c in client.completions.create(seed=5, **options).choices]
    assert first != [c.text for c in client.completions.create(seed=6, **options).choices]
    assert len(set(first)) == 3  # each choice draws its own samples


def test_logprobs_equal_llama_generate_and_transformers(client, reference, tiny_hf_folder):
    prompt = TOK.encode(PROMPTS[3], bos=True)
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=5,
                                       echo=True, logit_bias=NO_EOS)
    tokens, logprobs = reference.generate([prompt], max_gen_len=10, temperature=0, logprobs=True, echo=True)
    choice = result.choices[0]
    assert choice.text == TOK.decode(tokens[0])
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), torch.tensor(logprobs[0][1:]),
                               rtol=0, atol=1e-5)
    hf = LlamaForCausalLM.from_pretrained(tiny_hf_folder).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([tokens[0]])).logits[0, :-1].float(), -1)
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]),
                               expected.gather(-1, torch.tensor(tokens[0][1:])[:, None])[:, 0], rtol=0, atol=1e-4)
    top = expected.topk(5, dim=-1)
    for position, entry in enumerate(choice.logprobs.top_logprobs[1:]):  # prompt and completion positions
        # byte tokens >= 128 all read as U+FFFD, so compare the values (and the texts where they are distinct)
        assert len(entry) == len(set(TOK.decode([t]) for t in top.indices[position].tolist()))
        for token, value in zip(top.indices[position].tolist(), top.values[position].tolist()):
            if TOK.decode([token]) != "\ufffd":
                assert entry[TOK.decode([token])] == pytest.approx(value, abs=1e-4)

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=3, logit_bias=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted([t.logprob for t in entry.top_logprobs], reverse=True)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the chosen is the likeliest


def test_penalties_bias_and_min_p_follow_openai(client, tiny_hf_folder):
    prompt = TOK.encode("abcabcabc", bos=True)
    length = 48  # long enough for the greedy path to come back to tokens it chose before
    # penalties as OpenAI defines them, applied step by step to transformers' logits of the same weights
    hf = LlamaForCausalLM.from_pretrained(tiny_hf_folder).eval()
    def reference(frequency, presence):
        tokens, counts, logprobs = list(prompt), torch.zeros(TOK.vocab_size), []
        for _ in range(length):
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, -1]
            adjusted = logits - frequency * counts - presence * (counts > 0)
            adjusted[TOK.eos_id] -= 100
            tokens.append(int(adjusted.argmax()))
            counts[tokens[-1]] += 1
            logprobs.append(float(torch.log_softmax(logits, -1)[tokens[-1]]))  # the model's own, as reported
        return tokens[len(prompt) :], logprobs

    expected, plain = reference(0.7, 1.5), reference(0, 0)
    assert expected[0] != plain[0]
    penalized = client.completions.create(model="tiny", prompt=prompt, max_tokens=length, temperature=0, logprobs=0,
                                          frequency_penalty=0.7, presence_penalty=1.5, logit_bias=NO_EOS)
    assert penalized.choices[0].text == TOK.decode(expected[0])
    # byte tokens >= 128 all read as U+FFFD: the logprobs tell the chosen tokens apart
    assert penalized.choices[0].logprobs.token_logprobs == pytest.approx(expected[1], abs=1e-4)

    forced = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=0,
                                       logit_bias={str(ord("z")): 100})
    assert forced.choices[0].text == "zzzzz"
    # min_p 1 keeps only the most likely token: sampling at any temperature is greedy
    sampled = client.completions.create(model="tiny", prompt=prompt, max_tokens=length, temperature=1.5, seed=3,
                                        logit_bias=NO_EOS, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == TOK.decode(plain[0])


def test_usage_counts_prompts_choices_and_cached_tokens(client):
    prompts = [TOK.encode(PROMPTS[1], bos=True), TOK.encode(PROMPTS[4], bos=True)]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=7, n=2, temperature=0.5, seed=1,
                                       logit_bias=NO_EOS)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.usage.prompt_tokens == sum(map(len, prompts))
    assert result.usage.completion_tokens == 4 * 7 and result.usage.total_tokens == sum(map(len, prompts)) + 28
    assert all(c.finish_reason == "length" for c in result.choices)


def test_concurrent_greedy_requests_equal_each_alone(client, reference):
    lengths = [5 + 4 * i for i in range(8)]

    def ask(i):
        return client.completions.create(model="tiny", prompt=PROMPTS[i] * (1 + i % 3), max_tokens=lengths[i],
                                         temperature=0, logit_bias=NO_EOS).choices[0].text

    one_by_one = [ask(i) for i in range(8)]
    assert one_by_one[2] == TOK.decode(alone(reference, PROMPTS[2] * 3, lengths[2]).tokens)
    with ThreadPoolExecutor(8) as pool:  # 8 at once on 4 slots: some wait, prompts prefill in chunks
        together = list(pool.map(ask, range(8)))
    assert together == one_by_one


def test_a_request_sent_while_a_long_one_decodes_gets_its_first_token_first(client):
    long_stream = client.completions.create(model="tiny", prompt="Long", max_tokens=MAX_SEQ_LEN - 8, temperature=0,
                                            logit_bias=NO_EOS, stream=True)
    chunks = iter(long_stream)
    next(chunks)  # the long one is decoding
    short_answered = {}

    def short():
        for chunk in client.completions.create(model="tiny", prompt="Short", max_tokens=3, temperature=0,
                                               stream=True):
            short_answered.setdefault("first", time.perf_counter())

    thread = threading.Thread(target=short)
    thread.start()
    finish = None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = time.perf_counter()
    thread.join()
    assert short_answered["first"] < finish


# ------------------------------------------------------------------------------------------------ cancellation


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_stops_its_generation(server, stream):
    url, llm = server
    body = {"prompt": "Go on", "max_tokens": MAX_SEQ_LEN - 10, "temperature": 0, "logit_bias": NO_EOS,
            "stream": stream}
    seen = []

    def watch():  # the engine request of this HTTP request, as soon as it holds a slot
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            seen.extend(slot.request for slot in llm.engine.slots if slot.request is not None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if stream:
        with httpx.stream("POST", url + C, json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
            next(response.iter_lines())
    else:
        with pytest.raises(httpx.TimeoutException):
            post(url, C, body, timeout=0.05)
    watcher.join()
    (request,) = seen
    deadline = time.monotonic() + 5
    while not request.done:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert request.finish_reason == "cancelled" and len(request.tokens) < body["max_tokens"] // 2


def test_cut_off_requests_free_their_slots_and_memory(server, reference):
    url, llm = server
    rng = random.Random(0)

    def one(i, cut):
        body = {"model": "tiny", "prompt": PROMPTS[i % 8], "max_tokens": MAX_SEQ_LEN - 30, "temperature": 0,
                "logit_bias": NO_EOS, "stream": i % 2 == 0, "logprobs": 2}
        headers = {"Authorization": f"Bearer {KEY}"}
        if not cut:
            body["max_tokens"] = 4
            response = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
            assert response.status_code == 200
            return False
        if body["stream"]:  # read a few chunks, then hang up
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as response:
                for n, line in enumerate(response.iter_lines()):
                    assert '"finish_reason": null' in line or not line
                    if n >= rng.randint(1, 20):
                        return True
        try:  # hang up after a random wait (queued or running)
            httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=rng.uniform(0.01, 0.15))
        except httpx.TimeoutException:
            return True
        return False

    def round_of_50():
        before = metric(url, "llama_client_disconnects_total")
        cuts = [i % 4 < 2 for i in range(50)]
        with ThreadPoolExecutor(10) as pool:
            cut_off = sum(pool.map(one, range(50), cuts))
        deadline = time.monotonic() + 30
        while any(slot.request is not None for slot in llm.engine.slots) or llm.engine.waiting:
            assert time.monotonic() < deadline, "slots still busy after every client left"
            time.sleep(0.05)
        assert cut_off == sum(cuts)  # each hung up before its end
        assert metric(url, "llama_client_disconnects_total") - before == cut_off
        assert metric(url, "llama_active_slots") == 0 and metric(url, "llama_queue_depth") == 0

    round_of_50()
    rss = psutil.Process().memory_info().rss
    round_of_50()
    assert psutil.Process().memory_info().rss - rss < 16 << 20  # flat: no growth per request
    response = post(url, "/v1/completions", {"prompt": PROMPTS[5], "max_tokens": 9, "temperature": 0,
                                             "logit_bias": NO_EOS})
    assert response.json()["choices"][0]["text"] == TOK.decode(alone(reference, PROMPTS[5], 9).tokens)


# ------------------------------------------------------------------------------------------------ errors


def is_error_body(response) -> bool:
    error = response.json()["error"]
    return set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
BAD = [
    (C, b'{"prompt": "a",', 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, b'{"prompt": "\\ud800 lone surrogate"}', 400, None),
    (C, {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    (C, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    (C, {"prompt": "a", "n": 1.5}, 400, "n"),
    (C, {"prompt": 7}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": [1, 99999]}, 400, "prompt"),
    (C, {}, 400, "prompt"),
    (C, {"prompt": "a", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
    (C, {"prompt": "x" * MAX_SEQ_LEN}, 400, "prompt"),
    (C, {"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    (C, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "a", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "a", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "a", "n": 0}, 400, "n"),
    (C, {"prompt": "a", "n": 1000}, 400, "n"),
    (C, {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "a", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    (C, {"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (C, {"prompt": "a", "logit_bias": {"99999": 1}}, 400, "prompt"),
    (C, {"prompt": "a", "stop": ""}, 400, "stop"),
    (C, {"prompt": "a", "stop": [1]}, 400, "stop"),
    (C, {"prompt": "a", "suffix": "b"}, 400, "suffix"),  # a vocabulary without FIM tokens
    (C, {"prompt": "a", "suffix": 5}, 400, "suffix"),
    (C, {"prompt": "a", "suffix": "b", "echo": True}, 400, "echo"),
    (C, {"prompt": "a", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "a", "frobnicate": True}, 400, "frobnicate"),
    (C, {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": "a" * (70 << 10)}, 413, None),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}, {"role": "user", "content": "b"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "a", "tool_calls": [{"id": "1"}]}]}, 400,
     "messages.0.tool_calls.0.type"),
    (CHAT, {"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}]}, 400, "messages[0].tool_calls"),
    (CHAT, {"messages": USER + [{"role": "tool", "tool_call_id": "call_1", "content": "4"}]}, 400,
     "messages[1].tool_call_id"),
    (CHAT, {"messages": [{"role": "user", "content": "a", "name": "bob"}]}, 400, "messages[0].name"),
    (CHAT, {"messages": USER, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),  # Llama 2
    (CHAT, {"messages": USER, "tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools[0].function.name"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, 400,
     "tools[0].function.parameters"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, 400,
     "tools[0].function.strict"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, 400,
     "tools[0].function.x"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, 400,
     "tools[1].function.name"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "tools": []}, 400, "tools"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_the_error_body_and_the_server_keeps_serving(server, path, body, status, param):
    url, _ = server
    response = post(url, path, body)
    assert response.status_code == status, response.text
    assert is_error_body(response) and response.json()["error"]["param"] == param
    assert post(url, C, {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_body_over_the_limit_is_refused_without_a_declared_length(server):
    url, _ = server
    body = json.dumps({"prompt": "a" * (70 << 10)}).encode()
    chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))  # sent chunked: no Content-Length
    response = httpx.post(url + C, content=chunks, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413 and is_error_body(response)
    assert post(url, C, {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_openai_defaults_of_unimplemented_fields_are_accepted(server):
    url, _ = server
    body = {"prompt": "a", "max_tokens": 2, "suffix": None, "best_of": 1, "user": "u", "top_k": -1}
    assert post(url, C, body).status_code == 200
    chat = {"messages": USER, "max_tokens": 2, "tools": None, "tool_choice": "none",
            "response_format": {"type": "text"},
            "parallel_tool_calls": True, "store": False, "messages_extra": None}
    response = post(url, CHAT, chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages_extra"
    del chat["messages_extra"]
    assert post(url, CHAT, chat).status_code == 200
    assert httpx.get(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405


def test_api_key_is_wanted_on_every_route_but_health(server):
    url, _ = server
    routes = [("GET", "/v1/models"), ("POST", C), ("POST", CHAT), ("POST", "/tokenize"), ("POST", "/detokenize"),
              ("GET", "/metrics"), ("GET", "/health/ready"), ("GET", "/v1/unknown")]
    wrong = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Bearer {KEY}x"},
             {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY}, {"X-API-Key": KEY}]
    for headers in wrong:
        for method, path in routes:
            response = httpx.request(method, url + path, headers=headers, json={"prompt": "a"})
            assert response.status_code == 401 and is_error_body(response), (headers, path)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(url + "/health/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_tokenize_shows_the_chat_formats_ids_and_detokenize_inverts(server):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    tokens = post(url, "/tokenize", {"messages": messages}).json()["tokens"]
    assert tokens == TOK.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]", bos=True)  # Llama 2's layout
    assert post(url, "/tokenize", {"prompt": "hé"}).json()["tokens"] == TOK.encode("hé", bos=True)
    assert post(url, "/detokenize", {"tokens": tokens}).json()["prompt"] == TOK.decode(tokens)


def test_a_full_queue_answers_429_with_retry_after(tiny_hf_folder):
    llm = tiny_llama(tiny_hf_folder, max_batch_size=1)
    with running_server(llm, max_queue=1) as (url, scheduler):
        unstuck, step = threading.Event(), llm.engine.step
        llm.engine.step = lambda: (unstuck.wait(), step())  # hold the engine: what is sent stays in place
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, url, C, {"prompt": "a", "max_tokens": 2}, key=None) for _ in range(2)]
            deadline = time.monotonic() + 10
            while scheduler.outstanding < 2:  # one for the slot, one for the queue
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = post(url, C, {"prompt": "a", "max_tokens": 2}, key=None)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1" and is_error_body(refused)
            llm.engine.step = step
            unstuck.set()
            assert [f.result().status_code for f in held] == [200, 200]
        assert post(url, C, {"prompt": "a", "max_tokens": 2}, key=None).status_code == 200  # room again


def test_ready_is_503_while_the_engine_is_stuck(tiny_hf_folder):
    llm = tiny_llama(tiny_hf_folder, max_batch_size=1)
    with running_server(llm, ready_deadline_s=0.5) as (url, _):
        assert httpx.get(url + "/health/ready").status_code == 200
        unstuck, step = threading.Event(), llm.engine.step
        llm.engine.step = lambda: (unstuck.wait(), step())  # the next step hangs, as a wedged device would
        response = httpx.get(url + "/health/ready", timeout=10)
        assert response.status_code == 503 and is_error_body(response) and "Retry-After" in response.headers
        assert httpx.get(url + "/health").status_code == 200  # liveness: the process still answers
        llm.engine.step = step
        unstuck.set()
        assert httpx.get(url + "/health/ready", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------ prefix reuse


def test_a_second_chat_turn_reuses_the_history_and_gives_the_same_tokens(client, server, reference):
    url, _ = server
    history = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="tiny", messages=history, max_tokens=12, temperature=0,
                                           logit_bias=NO_EOS)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And another?"}]
    before = metric(url, "llama_prefix_cache_hit_tokens_total")
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=12, temperature=0,
                                            logit_bias=NO_EOS, logprobs=True)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the whole first prompt, at least, was not prefilled again
    assert metric(url, "llama_prefix_cache_hit_tokens_total") - before == cached
    # without reuse: the reference has never seen this history
    expected = alone(reference, encode_dialog(TOK, history), 12, logprobs=True)
    assert expected.reused_tokens < first.usage.prompt_tokens
    assert second.choices[0].message.content == TOK.decode(expected.tokens)
    torch.testing.assert_close(torch.tensor([t.logprob for t in second.choices[0].logprobs.content]),
                               torch.tensor(expected.logprobs), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ tensor parallel


@pytest.fixture(scope="module")
def tiny_smollm2_tokenizer_checkpoint(tmp_path_factory, smollm2_gguf_path):
    """A random 2-layer model (8 query / 2 KV heads) with SmolLM2's real tokenizer and chat template, as an HF
    folder that ``python -m llama.serve`` loads."""
    from llama.checkpoint import save_hf
    from llama.model import ModelArgs, Transformer
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf_path)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                                  hidden_dim=128, max_seq_len=128))
    model.init_weights(std=0.2, seed=0)  # a large std makes the greedy path depend on every weight
    folder = tmp_path_factory.mktemp("tp") / "ckpt"
    save_hf(model, folder, tokenizer=tokenizer)
    return folder


@contextmanager
def serve_command(ckpt, nproc: int):
    """``python -m llama.serve`` in its own process (under torchrun with ``nproc`` > 1); yields its base URL."""
    import subprocess
    import sys

    port = free_port()
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = [*launcher, "-m", "llama.serve", str(ckpt), "--port", str(port), "--max-batch-size", "2",
               "--max-seq-len", "128", "--served-model-name", "tiny", "--log-level", "warning"]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_two_tensor_parallel_processes_serve_the_tokens_of_one(tiny_smollm2_tokenizer_checkpoint):
    prompts = ["def fibonacci(n):", "The capital of France is Paris, and the capital of Italy is"]

    def answers(url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(2) as pool:  # both at once: the batch runs split over the ranks
            completions = list(pool.map(lambda p: client.completions.create(
                model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text, prompts))
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[1]}],
                                              max_tokens=16, temperature=0)
        return completions + [chat.choices[0].message.content]

    with serve_command(tiny_smollm2_tokenizer_checkpoint, 1) as url:
        single = answers(url)
        # the chat template's ids, as transformers renders and encodes them: one <|im_start|> opening, no second
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tiny_smollm2_tokenizer_checkpoint)
        messages = [{"role": "user", "content": prompts[1]}]
        tokens = httpx.post(url + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokens == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    with serve_command(tiny_smollm2_tokenizer_checkpoint, 2) as url:
        parallel = answers(url)
    assert parallel == single and all(single)


# ------------------------------------------------------------------------------------------------ infilling


FIM_CASES = [("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"), ("", " + 1\n"), ("x = 1\n", "")]


@pytest.fixture(scope="module")
def fim_server(fim_tokenizers):
    """A tiny random model over a vocabulary with Code Llama's FIM pieces, EOT's output row made twice that of a
    token only the first case's middle holds (so it stops at EOT), and ``Llama`` on a copy of it."""
    _, tokenizer = fim_tokenizers
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                                  multiple_of=32, max_seq_len=128))
    model.init_weights(std=0.3, seed=0)
    reference = Llama(copy.deepcopy(model), tokenizer, max_seq_len=128, max_batch_size=1)
    free = [reference.generate([infilling_prompt(tokenizer, *case)], max_gen_len=12, temperature=0)[0][0]
            for case in FIM_CASES]
    only_first = next(t for t in free[0][1:] if all(t not in middle for middle in free[1:]))
    with torch.no_grad():  # the output layer only: the reference's cached keys and values stay valid
        for copy_of in (model, reference.model):
            copy_of.output.weight[fim_tokens(tokenizer).end] = 2 * copy_of.output.weight[only_first]
    with running_server(Llama(model, tokenizer, max_seq_len=128, max_batch_size=2)) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), reference, tokenizer


def test_suffix_fills_in_the_middle_as_text_infilling(fim_server):
    client, reference, tokenizer = fim_server
    reasons = []
    for prefix, suffix in FIM_CASES:
        expected = reference.text_infilling([prefix], [suffix], temperature=0, max_gen_len=12, logprobs=True)[0]
        options = dict(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
        whole = client.completions.create(**options)
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **options))
        assert whole.choices[0].text == expected["generation"]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["generation"]
        assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(
            infilling_prompt(tokenizer, prefix, suffix))
        assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(expected["tokens"])
        reasons.append(whole.choices[0].finish_reason)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reasons[-1]
    assert reasons[0] == "stop" and "length" in reasons  # the first middle ends at EOT, before max_tokens


def test_an_infilled_middle_keeps_its_leading_space(fim_server):
    """The middle is decoded as a continuation: a first piece "▁self" reads " self" (sentencepiece's decode
    would drop the space)."""
    client, _, tokenizer = fim_server
    (piece,) = tokenizer.encode_infill(" self")
    result = client.completions.create(model="tiny", prompt="def f(x):\n   ", suffix=" x\n", max_tokens=2,
                                       temperature=0, logit_bias={str(piece): 100})
    assert result.choices[0].text == tokenizer.decode_infill([piece, piece]) == " self self"


def test_suffix_is_refused_without_fim_tokens_or_with_token_prompts(server, fim_server):
    url, _ = server
    response = post(url, C, {"prompt": "def f(", "suffix": "):\n"})
    assert response.status_code == 400 and is_error_body(response)
    assert response.json()["error"]["param"] == "suffix"
    assert "no fill-in-the-middle tokens" in response.json()["error"]["message"]
    client, _, tokenizer = fim_server
    with pytest.raises(openai.BadRequestError, match="prompt must be text"):
        client.completions.create(model="tiny", prompt=tokenizer.encode("def f("), suffix="):\n")


# ------------------------------------------------------------------------------------------------ tool calls


WRAP = {"type": "function", "function": {
    "name": "wrap", "description": "Wrap the text at a width",
    "parameters": {"type": "object", "properties": {"width": {"type": "string"}}, "required": ["width"]},
}}
QUESTION = [{"role": "user", "content": "Wrap this text at 70 columns."}]
JSON_CALL = '{"name": "wrap", "parameters": {"width": "70"}}'  # Llama 3.1's custom call
# What the chain model writes: Llama 3.1's built-in call syntax, which the parser reads for any tool (a JSON call
# would need the same token twice, a quote, which a chain model cannot write)
CALL_TEXT = '<|python_tag|>wrap.call(width= "70")'


def distinct_spelling(tokenizer, text: str) -> list[int]:
    """Ids of tokens, no two alike, that spell ``text`` (a chain model writes each token once)."""
    pieces = {}
    for i in range(tokenizer.vocab_size):
        pieces.setdefault(tokenizer.decode([i]), i)

    def spell(at: int, used: frozenset) -> list[int] | None:
        if at == len(text):
            return []
        for end in range(len(text), at, -1):  # longest pieces first
            token = pieces.get(text[at:end])
            if token is not None and token not in used and (rest := spell(end, used | {token})) is not None:
                return [token, *rest]
        return None

    return spell(0, frozenset())


@pytest.fixture(scope="module")
def tools_server(llama3_tokenizer, chain_model):
    """A Llama-3-format model that answers any dialog with ``CALL_TEXT`` and ``<|eom_id|>``, served, and ``Llama``
    on a copy of it."""
    tokenizer = llama3_tokenizer
    header_end = encode_dialog(tokenizer, QUESTION)[-1]  # every prompt ends with the assistant header's "\n\n"
    call = distinct_spelling(tokenizer, CALL_TEXT)
    model = chain_model(tokenizer, [header_end, *call, tokenizer.special_tokens["<|eom_id|>"]], max_seq_len=1024)
    reference = Llama(copy.deepcopy(model), tokenizer, max_seq_len=1024, max_batch_size=1)
    with running_server(Llama(model, tokenizer, max_seq_len=1024, max_batch_size=2)) as (url, _):
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), reference, tokenizer


def test_a_tool_call_comes_back_in_openais_shape_as_chat_completion_reads_it(tools_server):
    url, client, reference, tokenizer = tools_server
    expected = reference.chat_completion([QUESTION], temperature=0, max_gen_len=40, tools=[WRAP])[0]["generation"]
    assert expected["tool_calls"] == [{"type": "function", "function": {"name": "wrap",
                                                                        "arguments": {"width": "70"}}}]
    result = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WRAP], max_tokens=40,
                                            temperature=0)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "wrap"
    assert json.loads(call.function.arguments) == {"width": "70"}
    # the prompt is the one chat_completion builds: Llama 3.1's tool-use layout, the schema as sent
    prompt = encode_dialog(tokenizer, QUESTION, tools=[WRAP])
    assert post(url, "/tokenize", {"messages": QUESTION, "tools": [WRAP]}, key=None).json()["tokens"] == prompt
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(distinct_spelling(tokenizer, CALL_TEXT))
    # the reply and the tool's result go back as the README shows: the history is Llama 3.1's ipython turn
    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22}'}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=[WRAP], max_tokens=40,
                                           temperature=0)
    dialog = QUESTION + [expected, {"role": "ipython", "content": '{"temperature": 22}'}]
    assert again.usage.prompt_tokens == len(encode_dialog(tokenizer, dialog, tools=[WRAP]))

    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WRAP], max_tokens=40,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and not any(d.content for d in deltas)
    (streamed,) = [call for d in deltas for call in d.tool_calls or ()]
    assert streamed.index == 0 and streamed.function.name == "wrap" and streamed.id.startswith("call_")
    assert json.loads(streamed.function.arguments) == {"width": "70"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_an_offered_call_the_answer_is_content(tools_server):
    """tool_choice "none" leaves the tools out of the prompt and reads no call; a call to a tool not offered
    stays text."""
    url, client, _, tokenizer = tools_server
    other = {"type": "function", "function": {"name": "get_time"}}
    for tools, choice, prompt in [([WRAP], "none", encode_dialog(tokenizer, QUESTION)),
                                  ([other], "auto", encode_dialog(tokenizer, QUESTION, tools=[other]))]:
        options = dict(model="tiny", messages=QUESTION, tools=tools, tool_choice=choice, max_tokens=40, temperature=0)
        result = client.chat.completions.create(**options)
        assert result.choices[0].message.content == CALL_TEXT and result.choices[0].message.tool_calls is None
        assert result.choices[0].finish_reason == "stop" and result.usage.prompt_tokens == len(prompt)
        chunks = list(client.chat.completions.create(stream=True, **options))
        contents = [c.choices[0].delta.content or "" for c in chunks]
        assert "".join(contents) == CALL_TEXT and chunks[-1].choices[0].finish_reason == "stop"
        if choice == "auto":
            assert contents == ["", CALL_TEXT]  # with tools offered the answer is sent once known not to be a call


def test_a_call_and_its_result_in_the_history_are_rendered_as_llama_31s(tools_server):
    url, client, _, tokenizer = tools_server
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "wrap", "arguments": '{"width": "70"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"temperature": 22}'},
    ]
    ids = post(url, "/tokenize", {"messages": history, "tools": [WRAP]}, key=None).json()["tokens"]
    call = {"type": "function", "function": {"name": "wrap", "arguments": {"width": "70"}}}
    dialog = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "ipython", "content": '{"temperature": 22}'}]
    assert ids == encode_dialog(tokenizer, dialog, tools=[WRAP])
    question = encode_dialog(tokenizer, QUESTION, tools=[WRAP])
    assert tokenizer.decode(ids[len(question):]) == (
        f"{JSON_CALL}<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n"
        '{"temperature": 22}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    )
    result = client.chat.completions.create(model="tiny", messages=history, tools=[WRAP], max_tokens=40,
                                            temperature=0)
    assert result.usage.prompt_tokens == len(ids)


def bad_history(call: dict | None = None, result: dict | None = None, calls: int = 1) -> list[dict]:
    assistant_call = {"id": "call_7", "type": "function",
                      "function": {"name": "wrap", "arguments": '{"width": "70"}', **(call or {})}}
    return QUESTION + [{"role": "assistant", "content": None, "tool_calls": [assistant_call] * calls},
                       {"role": "tool", "tool_call_id": "call_7", "content": "22", **(result or {})}]


BAD_TOOLS = [
    (bad_history({"name": "get_time"}), "messages[1].tool_calls[0].function.name"),
    (bad_history({"arguments": "[1]"}), "messages[1].tool_calls[0].function.arguments"),
    (bad_history({"arguments": "{width"}), "messages[1].tool_calls[0].function.arguments"),
    (bad_history(calls=2), "messages[1].tool_calls"),
    (bad_history(result={"tool_call_id": "call_8"}), "messages[2].tool_call_id"),
    (bad_history(result={"tool_call_id": None}), "messages[2].tool_call_id"),
    (QUESTION + [{"role": "tool", "tool_call_id": "call_7", "content": "22"}], "messages[1].tool_call_id"),
    (bad_history(result={"role": "assistant"}), "messages[2].tool_call_id"),
    ([{**QUESTION[0], "tool_calls": bad_history()[1]["tool_calls"]}], "messages[0].tool_calls"),
]


@pytest.mark.parametrize("messages, param", BAD_TOOLS, ids=[param for _, param in BAD_TOOLS])
def test_bad_tool_histories_are_refused_naming_the_field(tools_server, messages, param):
    url, *_ = tools_server
    response = post(url, CHAT, {"messages": messages, "tools": [WRAP], "max_tokens": 2}, key=None)
    assert response.status_code == 400 and is_error_body(response), response.text
    assert response.json()["error"]["param"] == param
    good = {"messages": bad_history(), "tools": [WRAP], "max_tokens": 2}
    assert post(url, CHAT, good, key=None).status_code == 200


def test_assistant_message_reads_each_call_form_and_leaves_other_text():
    def call(name, arguments):
        return {"name": name, "arguments": arguments}

    cases = [
        (JSON_CALL, ["wrap"], call("wrap", {"width": "70"})),
        (CALL_TEXT, ["wrap"], call("wrap", {"width": "70"})),
        ('<function=wrap>{"width": "9"}</function>', ["wrap"], call("wrap", {"width": "9"})),
        ('<|python_tag|>brave_search.call(query="Paris")', ["brave_search"], call("brave_search", {"query": "Paris"})),
        ("<|python_tag|>print(7)", ["code_interpreter"], call("code_interpreter", {"code": "print(7)"})),
        (JSON_CALL, ["get_time"], None),  # not offered
        (JSON_CALL, [], None),  # no tools
        ("It is sunny.", ["wrap"], None),
    ]
    for text, tools, expected in cases:
        message = assistant_message(text, tools)
        if expected is None:
            assert message == {"role": "assistant", "content": text}
            continue
        (made,) = message.pop("tool_calls")
        assert message == {"role": "assistant", "content": None} and made["type"] == "function"
        assert made["id"].startswith("call_") and len(made["id"]) == len("call_") + 24
        assert {"name": made["function"]["name"], "arguments": json.loads(made["function"]["arguments"])} == expected


def test_a_chat_template_gets_the_tools_and_a_returned_call_as_transformers_renders_them(smollm2_gguf_path, tmp_path):
    """SmolLM2's template concatenates contents: a call sent back with null content (as OpenAI clients send it)
    is passed with "" (as ``chat_completion`` answers); the ids equal transformers' ``apply_chat_template`` of the
    same dialog and tools."""
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(smollm2_gguf_path)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tokenizer.vocab_size, hidden_dim=128,
                                  max_seq_len=256))
    model.init_weights(std=0.2, seed=0)
    with running_server(Llama(model, tokenizer, max_seq_len=256, max_batch_size=1)) as (url, _):
        ids = post(url, "/tokenize", {"messages": bad_history(), "tools": [WRAP]}, key=None).json()["tokens"]
        reply = post(url, CHAT, {"messages": bad_history(), "tools": [WRAP], "max_tokens": 2}, key=None)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(ids)
    call = {"type": "function", "function": {"name": "wrap", "arguments": {"width": "70"}}}
    dialog = QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "22"}]
    tokenizer.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert ids == hf.apply_chat_template(dialog, tools=[WRAP], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def test_the_engine_thread_steps_with_the_threads_it_is_given(tiny_hf_folder, monkeypatch):
    """``llama.serve`` loads the model with one intra-op thread and gives the engine thread all of them: a thread's
    count is its own (a new thread starts from the default), so the scheduler sets it where the engine steps."""
    llm = tiny_llama(tiny_hf_folder, max_batch_size=1)
    wanted, seen, step = torch.get_num_threads() + 1, [], llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda: (seen.append(torch.get_num_threads()), step())[1])
    with running_server(llm, threads=wanted) as (url, _):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=60)
    assert answer.status_code == 200 and seen and set(seen) == {wanted}
    assert torch.get_num_threads() == wanted - 1  # this thread's own count is left alone
