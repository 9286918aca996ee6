"""The generation engine (``llama.generation.engine``): what a request gets does not depend on what else runs.

A request's tokens are the same whether it runs alone on a fresh engine or joins a batch whose other rows sit at
other positions, sample with other settings, were prefilled in chunks, or reuse a slot's kept prefix. Cancelling
frees a slot at once, and a request the engine cannot serve is refused before any work.

Models are tiny and random (``init_weights(std=0.3)`` gives peaked, far-from-tied logits, so greedy tokens do not
flip on float noise), with a byte-level tokenizer. Most engines here have no stop ids, so that requests run to
their ``max_tokens``."""

import copy
import dataclasses
import math

import pytest
import torch

from llama.generation import Llama
from llama.generation.engine import Engine, Request
from llama.generation.sampling import SamplingParams
from llama.model import ModelArgs, Transformer


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
MAX_SEQ_LEN = 64


def tiny_model(seed=0, head_dim=16) -> Transformer:
    # head_dim 64 decodes through our CPU attention kernel (where it is built), 16 through SDPA
    dim = 4 * head_dim if head_dim == 16 else 2 * head_dim
    n_heads = dim // head_dim
    args = ModelArgs(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_heads // 2, vocab_size=258,
                     max_seq_len=MAX_SEQ_LEN)
    model = Transformer(args).eval()
    model.init_weights(std=0.3, seed=seed)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine_for(model, max_batch_size=4, stop_ids=frozenset(), **options) -> Engine:
    return Engine(model, stop_ids, max_batch_size, MAX_SEQ_LEN, decode_text=TOK.decode, **options)


def prompt(text: str) -> list[int]:
    return TOK.encode(text, bos=True)


def greedy(text: str, max_tokens=12, **options) -> Request:
    return Request(prompt(text), SamplingParams(temperature=0.0, max_tokens=max_tokens), **options)


def run_all(engine: Engine, requests: list[Request], limit=300) -> list[Request]:
    """Submit ``requests`` and step until they are done (a bounded ``engine.run``: a broken engine fails, not hangs)."""
    for request in requests:
        engine.submit(request)
    for _ in range(limit):
        if all(request.done for request in requests):
            return requests
        engine.step()
    raise AssertionError(f"requests still not done after {limit} steps")


def alone(model, request: Request, **engine_options) -> Request:
    """A new request of ``request``'s prompt and settings, run by itself on a fresh engine."""
    request = Request(list(request.prompt), copy.deepcopy(request.sampling), echo_logprobs=request.echo_logprobs)
    return run_all(engine_for(model, **engine_options), [request])[0]


def outcome(request: Request):
    return request.tokens, request.finish_reason


def step_until_idle(engine: Engine, limit=200):
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError(f"the engine is still busy after {limit} steps")


# ------------------------------------------------------------------------------------ rows at different positions


def staggered(engine: Engine, requests: list[Request]) -> None:
    """requests[0] starts alone; after three steps the others join the batch it is decoding, at other positions."""
    first, *later = requests
    engine.submit(first)
    for _ in range(3):
        engine.step()
    assert len(first.tokens) == 3
    for request in later:
        engine.submit(request)
    engine.step()  # the newcomers are prefilled (and sample their first token) while the first decodes
    engine.step()  # now all of them decode in one step, each at its own position
    positions = [len(slot.cached) for slot in engine.slots if slot.request is not None]
    assert len(positions) == len(requests) and len(set(positions)) == len(requests), positions
    step_until_idle(engine)


STAGGERED = ["Hello", "The capital of France is", "a"]


@pytest.mark.parametrize("head_dim", [16, 64])
def test_rows_at_different_positions_decode_together_as_each_does_alone(head_dim):
    model = tiny_model(seed=head_dim, head_dim=head_dim)
    requests = [greedy(text, max_tokens=12) for text in STAGGERED]
    expected = [outcome(alone(model, r)) for r in requests]
    staggered(engine_for(model), requests)
    assert [outcome(r) for r in requests] == expected
    assert all(len(tokens) == 12 for tokens, _ in expected)


def test_compiled_decode_step_gives_the_eager_tokens_with_rows_joining_mid_way(model):
    requests = [greedy(text, max_tokens=10) for text in STAGGERED]
    expected = [outcome(alone(model, r)) for r in requests]  # eager, each alone
    staggered(engine_for(copy.deepcopy(model), compile=True), requests)
    assert [outcome(r) for r in requests] == expected


# ------------------------------------------------------------------------------------ per-row sampling


def argmax_decoding(model, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens by full cache-free forwards: the reference for greedy decoding."""
    tokens, out = list(tokens), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
            tokens.append(out[-1])
    return out


def first_new_ascii_char(tokens: list[int], start: int) -> tuple[int, str]:
    """(k, c): the first token from ``start`` on that is a printable ASCII character not seen before it."""
    for k in range(start, len(tokens) - 1):
        c = chr(tokens[k])
        if 32 < tokens[k] < 127 and c not in TOK.decode(tokens[:k]):
            return k, c
    raise AssertionError(f"no new ASCII character in {tokens}")


def test_each_row_samples_with_its_own_settings_as_it_does_alone(model):
    sampled = [
        SamplingParams(temperature=0.8, top_k=20, top_p=1.0, max_tokens=16, seed=11),
        SamplingParams(temperature=1.3, top_p=0.9, max_tokens=16, seed=12),
    ]
    # Plain sampling (no top-k or top-p) with a stop string: a character that the row, run without it, produces
    # after a few tokens and not before. Alone, nothing sorts its probabilities; here the other rows' top-k and top-p
    # do, and it must draw the same tokens all the same.
    plain = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=16, seed=13)
    unstopped = alone(model, Request(prompt("stop"), plain))
    k, stop = first_new_ascii_char(unstopped.tokens, start=3)
    requests = [
        greedy("greedy row", max_tokens=16),
        Request(prompt("sampled row"), sampled[0]),
        Request(prompt("another sampled row"), sampled[1]),
        Request(prompt("stop"), dataclasses.replace(plain, stop=[stop])),
    ]
    expected = [outcome(alone(model, r)) for r in requests]
    run_all(engine_for(model), requests)
    assert [outcome(r) for r in requests] == expected
    assert requests[0].tokens == argmax_decoding(model, prompt("greedy row"), 16)
    assert requests[3].tokens == unstopped.tokens[: k + 1] and requests[3].finish_reason == "stop"
    assert stop in TOK.decode(requests[3].tokens)
    # the sampled rows did sample: the same prompts give other tokens greedily, and other seeds give others still
    for request, params in zip(requests[1:3], sampled):
        assert request.tokens != alone(model, Request(request.prompt, SamplingParams(0.0, max_tokens=16))).tokens
        reseeded = dataclasses.replace(params, seed=params.seed + 100)
        assert request.tokens != alone(model, Request(request.prompt, reseeded)).tokens


def test_requests_without_a_seed_draw_their_streams_from_the_engine_seed(model):
    def run(seed):
        requests = [Request(prompt(t), SamplingParams(temperature=1.0, max_tokens=8)) for t in ("x", "y")]
        run_all(engine_for(model, seed=seed), requests)
        return [r.tokens for r in requests]

    assert run(1) == run(1) != run(2)


# ------------------------------------------------------------------------------------ prefix reuse


def test_a_prompt_extending_a_finished_request_reuses_its_slot(model):
    engine = engine_for(model, max_batch_size=2)
    other, first = greedy("something else", max_tokens=4), greedy("Once upon a time", max_tokens=8)
    run_all(engine, [other, first])  # first runs in slot 1
    assert engine.slots[1].cached[: len(first.prompt)] == first.prompt
    # the conversation goes on: the prompt is the first's prompt, its completion, and a new turn
    follow_up = greedy("", max_tokens=8)
    follow_up.prompt = first.prompt + first.tokens + TOK.encode(" and then")
    engine.submit(follow_up)
    engine.step()
    assert engine.slots[1].request is follow_up  # the slot that holds the shared prefix
    assert follow_up.reused_tokens >= len(first.prompt)
    step_until_idle(engine)
    fresh = alone(model, follow_up, prefix_cache=False)
    assert fresh.reused_tokens == 0
    assert outcome(follow_up) == outcome(fresh)


def test_a_repeated_prompt_reuses_all_but_its_last_token(model):
    engine = engine_for(model, max_batch_size=1)
    first, again = greedy("Repeat after me", max_tokens=6), greedy("Repeat after me", max_tokens=6)
    for request in (first, again):
        run_all(engine, [request])
    # the last prompt token is fed again: its logits give the first new token
    assert again.reused_tokens == len(again.prompt) - 1
    assert outcome(again) == outcome(first)


def test_a_reset_forgets_what_free_slots_keep(model):
    engine = engine_for(model, max_batch_size=1)
    first, again = greedy("Repeat after me", max_tokens=6), greedy("Repeat after me", max_tokens=6)
    run_all(engine, [first])
    engine.reset()
    run_all(engine, [again])
    assert again.reused_tokens == 0
    assert outcome(again) == outcome(first)


def test_without_prefix_cache_nothing_is_reused(model):
    engine = engine_for(model, max_batch_size=1, prefix_cache=False)
    first, again = greedy("Repeat after me", max_tokens=6), greedy("Repeat after me", max_tokens=6)
    for request in (first, again):
        run_all(engine, [request])
    assert again.reused_tokens == 0 and engine.slots[0].cached == []
    assert outcome(again) == outcome(first)


# ------------------------------------------------------------------------------------ chunked prefill

CHUNKED = ["Hello", "The capital of France is", "a", "0123456789 0123456789 012"]


def test_chunked_prefill_gives_the_tokens_and_prompt_logprobs_of_whole_prompt_prefill(model):
    def run(**options):
        requests = [greedy(text, max_tokens=8) for text in CHUNKED]
        requests[1].echo_logprobs = True  # logprobs of every prompt token, chunk after chunk
        return run_all(engine_for(model, **options), requests)

    chunked, whole = run(prefill_chunk=3), run()
    assert [outcome(r) for r in chunked] == [outcome(r) for r in whole]
    assert len(chunked[1].prompt_logprobs) == len(chunked[1].prompt)
    torch.testing.assert_close(chunked[1].prompt_logprobs, whole[1].prompt_logprobs, rtol=0, atol=1e-5)


def test_a_request_submitted_during_a_long_chunked_prefill_gets_tokens_before_it_ends(model):
    engine = engine_for(model, prefill_chunk=3)
    long = Request(prompt("x" * 40) + list(range(65, 85)), SamplingParams(temperature=0.0, max_tokens=3))
    short = greedy("hi", max_tokens=6)
    engine.submit(long)
    engine.step()
    engine.step()
    engine.submit(short)
    engine.step()  # its whole prompt fits one chunk: prefilled beside the long prompt's next chunk
    assert short.tokens
    assert not long.tokens and len(engine.slots[0].cached) < len(long.prompt)  # still prefilling
    for _ in range(5):
        engine.step()
    assert short.done and len(short.tokens) == 6
    assert not long.done  # the short one decoded all its tokens while the long one was prefilled
    step_until_idle(engine)
    assert outcome(long) == outcome(alone(model, long))
    assert outcome(short) == outcome(alone(model, short))


# ------------------------------------------------------------------------------------ cancelling


def test_cancel_frees_the_slot_at_once_and_the_others_go_on(model):
    engine = engine_for(model, max_batch_size=2)
    doomed, kept = greedy("doomed", max_tokens=20), greedy("kept", max_tokens=20)
    engine.submit(doomed)
    engine.submit(kept)
    engine.step()
    engine.step()
    engine.cancel(doomed)
    assert doomed.finish_reason == "cancelled"
    assert all(slot.request is not doomed for slot in engine.slots)
    assert sum(slot.request is None for slot in engine.slots) == 1  # free for the next request at once
    tokens = list(doomed.tokens)
    step_until_idle(engine)
    assert doomed.tokens == tokens
    assert outcome(kept) == outcome(alone(model, kept))


def test_cancel_takes_a_waiting_request_out_of_the_queue(model):
    engine = engine_for(model, max_batch_size=1)
    running, waiting = greedy("running", max_tokens=4), greedy("waiting", max_tokens=4)
    engine.submit(running)
    engine.submit(waiting)
    engine.step()
    engine.cancel(waiting)
    assert waiting.finish_reason == "cancelled" and not engine.waiting
    step_until_idle(engine)
    assert waiting.tokens == [] and running.finish_reason == "length"


def test_cancelling_one_of_two_identical_requests_cancels_that_one(model):
    # Requests are told apart by identity: equal fields do not make the queue confuse them.
    engine = engine_for(model, max_batch_size=1)
    first, second = greedy("same", max_tokens=4), greedy("same", max_tokens=4)
    engine.submit(first)
    engine.submit(second)
    engine.cancel(second)
    step_until_idle(engine)
    assert (first.finish_reason, len(first.tokens)) == ("length", 4)
    assert (second.finish_reason, second.tokens) == ("cancelled", [])


def test_closing_a_stream_early_cancels_its_requests(model):
    llama = Llama(model, TOK, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    # no stop ids in play: greedy rows of 30 tokens, three rows for two slots (one waits)
    requests = [greedy(text, max_tokens=30) for text in ("one", "two", "three")]
    stream = llama.stream(requests)
    next(stream)
    stream.close()
    assert [r.finish_reason for r in requests] == ["cancelled"] * 3
    assert not llama.engine.busy
    assert all(len(r.tokens) < 30 for r in requests)


# ------------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Request([]), "is empty"),
        (lambda: Request(list(range(MAX_SEQ_LEN + 1))), f"has {MAX_SEQ_LEN + 1} tokens, more than max_seq_len"),
        (lambda: Request([1, 258]), "outside the vocabulary"),
        (lambda: Request([-1, 2]), "outside the vocabulary"),
        (lambda: Request([1, 2.0]), "outside the vocabulary"),
        (lambda: Request([1], SamplingParams(temperature=math.nan)), "temperature"),
        (lambda: Request([1], SamplingParams(temperature=-0.5)), "temperature"),
        (lambda: Request([1], SamplingParams(temperature=math.inf)), "temperature"),
        (lambda: Request([1], SamplingParams(top_p=0.0)), "top_p"),
        (lambda: Request([1], SamplingParams(top_p=1.5)), "top_p"),
        (lambda: Request([1], SamplingParams(top_k=-1)), "top_k"),
        (lambda: Request([1], SamplingParams(max_tokens=-1)), "max_gen_len"),
        (lambda: Request([1], SamplingParams(stop=["ok", ""])), "stop"),
    ],
    ids=[
        "empty", "too-long", "id-past-vocab", "negative-id", "float-id", "temperature-nan", "temperature-negative",
        "temperature-inf", "top_p-0", "top_p-above-1", "top_k-negative", "max_tokens-negative", "empty-stop",
    ],
)
def test_bad_requests_are_refused_before_any_work(model, make, message):
    # bad settings are refused as soon as SamplingParams is built; bad prompts when the request is submitted
    engine = engine_for(model)
    with pytest.raises(ValueError, match=message):
        engine.submit(make())
    assert not engine.busy


@pytest.mark.parametrize(
    "field, value", [("temperature", math.nan), ("top_p", 0.0), ("top_k", -3), ("stop", ("",))]
)
def test_settings_spoiled_after_construction_are_refused_at_submission(model, field, value):
    request = Request([1, 2, 3])
    setattr(request.sampling, field, value)
    engine = engine_for(model)
    with pytest.raises(ValueError, match=field):
        engine.submit(request)
    assert not engine.busy


def test_run_refuses_a_bad_request_before_queueing_any(model):
    engine = engine_for(model)
    with pytest.raises(ValueError, match="is empty"):
        next(engine.run([greedy("fine"), Request([])]))
    assert not engine.busy  # the good request was not left in the queue either
