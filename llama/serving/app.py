"""The OpenAI-compatible HTTP server (FastAPI): routes, streaming, errors, API keys, metrics.

``create_app(llm, ...)`` serves a loaded ``Llama``: its tokenizer and chat format encode the requests, its engine
(stepped by ``llama.serving.scheduler`` in a background thread) generates. Every failure is answered with one body,
``{"error": {"message", "type", "param", "code"}}``; bad input gets a 4xx naming what was wrong and never stops
the server. No prompt or completion text is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama.generation import Llama
from llama.generation.engine import Request
from llama.generation.sampling import SamplingParams, row_seeds
from llama.generation.text import stable_text
from llama.serving.metrics import Metrics
from llama.serving.protocol import (
    APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad_request, error_body,
    logit_bias_ids, prompt_list, refuse_unimplemented, stop_list, tool_choice, tool_names,
)
from llama.serving.scheduler import QueueFull, Scheduler
from tokenizer import Dialog, TokenizerError, encode_dialog
from tokenizer.chat_format import chat_format
from tokenizer.fim import fim_tokens, infilling_prompt
from tokenizer.tools import parse_tool_calls

log = logging.getLogger("llama.serving")

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
RETRY_AFTER_S = 1
OPEN_ROUTES = ("/health",)  # answered without an API key (liveness)
CLIENT_CLOSED = 499  # nginx's status for a request whose client left (no one reads it; /metrics counts it)


# ------------------------------------------------------------------------------------------------ the gate


class Gate:
    """ASGI middleware in front of every route: the API key (constant-time comparison), the body size limit
    (the body is read here, up to the limit), and requests counted by route and status."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status.get("code", 0))).inc()

    async def _gate(self, scope, receive, send):
        if self.api_key is not None and scope["path"] not in OPEN_ROUTES and not self._authorized(scope):
            error = APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                             "authentication_error", code="invalid_api_key")
            return await _send_error(error, scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _send_error(self._too_large(), scope, receive, send)
        body, more = [], True
        while more:  # chunked bodies too: read it all, up to the limit
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_body_bytes:
                return await _send_error(self._too_large(), scope, receive, send)
        if not _valid_unicode(b"".join(body)):
            error = bad_request("invalid JSON: a string holds a lone UTF-16 surrogate (not Unicode text)")
            return await _send_error(error, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over the limit of {self.max_body_bytes} bytes",
                        code="request_too_large")


def _valid_unicode(body: bytes) -> bool:
    """False for JSON whose strings hold an escaped lone surrogate ("\\ud800"): valid JSON, but no text."""
    if b"\\u" not in body:
        return True
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    except ValueError:  # not JSON: the route's validation says so
        pass
    return True


async def _send_error(error: APIError, scope, receive, send) -> None:
    await _error_response(error)(scope, receive, send)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


# ------------------------------------------------------------------------------------------------ a generation


class Generation:
    """The engine requests (choices) of one HTTP request and what their text is so far; ``decode`` turns their
    tokens into text (an infilled middle is decoded as the continuation it is)."""

    def __init__(self, server: Server, requests: list[Request], echo_texts: list[str], prompt_tokens: int,
                 decode=None):
        self.server, self.requests, self.echo_texts, self.prompt_tokens = server, requests, echo_texts, prompt_tokens
        self.decode = decode or server.tokenizer.decode
        self.updates: asyncio.Queue = asyncio.Queue()
        self.handles = server.scheduler.submit(requests, self.updates)
        self.arrived = time.perf_counter()
        self.counts = [0] * len(requests)  # settled tokens of each choice
        self.reasons: list[str | None] = [None] * len(requests)
        self.first_token_at: list[float | None] = [None] * len(requests)
        self.emitted = [""] * len(requests)  # text already streamed
        self.emitted_tokens = [0] * len(requests)

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    async def next_updates(self) -> set[int]:
        """Wait for progress; returns the choices that made some (every update already queued is taken)."""
        changed = set()
        update = await self.updates.get()
        while True:
            index, count, reason = update
            self.counts[index], self.reasons[index] = count, reason
            if count and self.first_token_at[index] is None:
                self.first_token_at[index] = time.perf_counter()
                self.server.metrics.ttft.observe(self.first_token_at[index] - self.arrived)
            if reason is not None:
                self._finished(index)
            changed.add(index)
            if self.updates.empty():
                return changed
            update = self.updates.get_nowait()

    def _finished(self, index: int) -> None:
        metrics, request = self.server.metrics, self.requests[index]
        if self.reasons[index] == "cancelled":
            return
        now = time.perf_counter()
        metrics.e2e.observe(now - self.arrived)
        if self.counts[index] > 1:
            metrics.tpot.observe((now - self.first_token_at[index]) / (self.counts[index] - 1))
        metrics.prompt_tokens.inc(len(request.prompt))
        metrics.prefix_cache_tokens.inc(request.reused_tokens)
        metrics.generation_tokens.inc(self.counts[index])

    async def wait(self, http_request: HTTPRequest) -> bool:
        """Until every choice is done (True), or the client leaves, which cancels them (False)."""
        disconnected = asyncio.ensure_future(_disconnect(http_request))
        try:
            while not self.done:
                progress = asyncio.ensure_future(self.next_updates())
                await asyncio.wait({progress, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not progress.done():
                    progress.cancel()
                    return False
                progress.result()
            return True
        finally:
            disconnected.cancel()
            self.close()

    def close(self) -> None:
        """Cancel what is left (the client went away)."""
        if not self.done:
            self.server.scheduler.cancel(self.handles)
            self.server.metrics.disconnects.inc()
            self.reasons = [reason or "cancelled" for reason in self.reasons]

    def check_failures(self) -> None:
        if "error" in self.reasons:
            raise APIError(500, "internal error while generating; see the server log", "internal_error")

    def text(self, index: int) -> str:
        """The choice's text: settled so far, or whole once done (cut at a stop string)."""
        request = self.requests[index]
        tokens = request.tokens[: self.counts[index]]
        return stable_text(self.decode(tokens), request.sampling.stop, self.reasons[index] is not None)

    def new_text(self, index: int) -> str:
        text = self.text(index)
        new, self.emitted[index] = text[len(self.emitted[index]) :], text
        return new

    def usage(self) -> dict:
        completion = sum(self.counts)
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.reused_tokens for r in self.requests)},
        }


async def _disconnect(http_request: HTTPRequest) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------------------ the server


class Server:
    """What the routes share: the model's tokenizer, the scheduler, the metrics, the served name."""

    def __init__(self, llm: Llama, model_name: str, max_queue: int, metrics: Metrics, threads: int | None = None):
        self.tokenizer, self.max_seq_len, self.model_name = llm.tokenizer, llm.max_seq_len, model_name
        self.metrics = metrics
        self.engine = llm.engine
        self.vocab_size = llm.model.args.vocab_size
        self.probe_prompt = [llm.tokenizer.bos_id if llm.tokenizer.bos_id is not None else 0]
        self.scheduler = Scheduler(llm.engine, max_queue, metrics, warmup_prompt=self.probe_prompt, threads=threads)
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           "not_found_error", "model", "model_not_found")

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # -------------------------------------------------------------------------------------- building requests

    def sampling(self, body, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                 stop_ids: tuple[int, ...] = ()) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0),
                max_tokens=max_tokens,
                stop=tuple(stop_list(body.stop)),
                logprobs=logprobs,
                min_p=body.min_p or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=logit_bias_ids(body.logit_bias),
                top_logprobs=top_logprobs,
                stop_ids=stop_ids,
            )
        except ValueError as error:
            raise bad_request(str(error)) from None

    def requests(self, prompts: list[list[int]], body, max_tokens: int | None, sampling: SamplingParams,
                 echo_logprobs: bool = False) -> list[Request]:
        """``n`` requests per prompt (choice i * n + j), each checked; the context must hold prompt and max_tokens."""
        n = body.n or 1
        seeds = row_seeds(body.seed, len(prompts) * n)
        requests = []
        for i, prompt in enumerate(prompts):
            name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if len(prompt) >= self.max_seq_len:
                raise bad_request(f"{name} has {len(prompt)} tokens: no room left in the context of "
                                  f"{self.max_seq_len} tokens", param="prompt")
            if max_tokens is not None and len(prompt) + max_tokens > self.max_seq_len:
                raise bad_request(f"{name} has {len(prompt)} tokens and max_tokens is {max_tokens}: over the context "
                                  f"of {self.max_seq_len} tokens", param="max_tokens")
            for j in range(n):
                params = SamplingParams(**{**vars(sampling), "seed": seeds[i * n + j]})
                request = Request(list(prompt), params, echo_logprobs=echo_logprobs)
                try:
                    self.engine.check(request, name)
                except ValueError as error:
                    raise bad_request(str(error), param="prompt") from None
                requests.append(request)
        return requests

    def generation(self, requests: list[Request], echo_texts: list[str], prompt_tokens: int,
                   decode=None) -> Generation:
        try:
            return Generation(self, requests, echo_texts, prompt_tokens, decode)
        except QueueFull as error:
            raise APIError(429, str(error), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def infilling_prompts(self, prompts: list[str | list[int]], suffix: str) -> tuple[list[list[int]], tuple[int, ...]]:
        """Code Llama's prefix-suffix-middle prompt of each prompt (the prefix) and ``suffix``, and the token that
        ends the middle besides EOS (none for the StarCoder family)."""
        try:
            end = fim_tokens(self.tokenizer).end
        except TokenizerError as error:
            raise bad_request(f"suffix needs a model that can fill in the middle: {error}", param="suffix") from None
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise bad_request("with suffix, prompt must be text (a string or strings): it is the code before the "
                              "middle", param="prompt")
        return [infilling_prompt(self.tokenizer, prompt, suffix) for prompt in prompts], (() if end is None else (end,))

    def encode_messages(self, messages, tools: list[dict] | None = None, offer_tools: bool = True) -> list[int]:
        """The prompt of OpenAI chat messages in the checkpoint's chat format. An assistant's ``tool_calls`` and a
        ``tool`` message answering it map onto Llama 3.1's tool use (``tokenizer.tools``); ``tools`` (OpenAI
        function tools) are offered in the prompt as ``Llama.chat_completion(..., tools=...)`` offers them, unless
        ``offer_tools`` is false (tool_choice "none": the history may still hold calls to them)."""
        names = tool_names(tools)
        fmt = chat_format(self.tokenizer)
        if names and not fmt.tools:
            raise bad_request(f"tools: this checkpoint's chat format ({fmt.name}) has no tool calls", param="tools")
        dialog: Dialog = []
        for i, message in enumerate(messages):
            extra = [name for name, value in (message.model_extra or {}).items() if value not in (None, [])]
            if extra or message.name is not None:
                field = (extra or ["name"])[0]
                raise bad_request(f"messages[{i}].{field} is not supported by this server", f"messages[{i}].{field}")
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                content = "".join(part.text for part in content)
            role = "system" if message.role == "developer" else message.role
            if message.role == "tool" or message.tool_call_id is not None:
                _check_tool_result(messages, i)
            # content "" beside a call, as chat_completion answers: templates that concatenate contents take it
            dialog.append({"role": role, "content": content or ""})
            if message.tool_calls:
                dialog[-1]["tool_calls"] = [_history_call(message, i, names, fmt)]
        try:
            return encode_dialog(self.tokenizer, dialog, tools=(tools or None) if offer_tools else None)
        except ValueError as error:
            raise bad_request(str(error), param="messages") from None

    # -------------------------------------------------------------------------------------- logprobs

    def completion_logprobs(self, request: Request, start: int, stop: int, echo: bool, offset: int) -> dict:
        """Legacy completions' logprobs of generated tokens start..stop (with the prompt's first when echoed)."""
        tokens, logprobs, tops = [], [], []
        k = request.sampling.top_logprobs
        if echo:
            tokens += request.prompt
            logprobs += [None] + request.prompt_logprobs[1:]
            tops += [None] + [self.top_dict(t) for t in request.prompt_top_logprobs] if k else []
        tokens += request.tokens[start:stop]
        logprobs += request.logprobs[start:stop]
        tops += [self.top_dict(t) for t in request.top_logprobs[start:stop]] if k else []
        texts = [self.token_text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops if k else None,
                "text_offset": offsets}

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        return {self.token_text(t): lp for t, lp in top}

    def chat_logprobs(self, request: Request, start: int, stop: int) -> dict:
        def entry(token, logprob):
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        tops = request.top_logprobs[start:stop] if request.sampling.top_logprobs else [[]] * (stop - start)
        return {"content": [
            {**entry(t, lp), "top_logprobs": [entry(*pair) for pair in top]}
            for t, lp, top in zip(request.tokens[start:stop], request.logprobs[start:stop], tops)
        ]}


# ------------------------------------------------------------------------------------------------ tool calls


def _history_call(message, i: int, names: list[str], fmt) -> dict:
    """An assistant message's OpenAI tool call in transformers' structure, which the chat formats write."""
    where = f"messages[{i}].tool_calls"
    if message.role != "assistant":
        raise bad_request(f"{where}: tool calls belong to assistant messages", param=where)
    if not fmt.tools:
        raise bad_request(f"{where}: this checkpoint's chat format ({fmt.name}) has no tool calls", param=where)
    if len(message.tool_calls) > 1:
        raise bad_request(f"{where}: one call per assistant message (Llama 3.1 calls one tool at a time)", param=where)
    function = message.tool_calls[0].function
    if function.name not in names:
        offered = ", ".join(names) or "none"
        raise bad_request(f"{where}[0].function.name: '{function.name}' is not one of the tools given in 'tools' "
                          f"({offered})", param=f"{where}[0].function.name")
    try:
        arguments = json.loads(function.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise bad_request(f"{where}[0].function.arguments must be a JSON object as text, got {function.arguments!r}",
                          param=f"{where}[0].function.arguments")
    return {"type": "function", "function": {"name": function.name, "arguments": arguments}}


def _check_tool_result(messages, i: int) -> None:
    """A ``tool`` message answers the tool call of the assistant message just before it, by its id."""
    where, message = f"messages[{i}].tool_call_id", messages[i]
    if message.role != "tool":
        raise bad_request(f"{where}: only 'tool' messages answer a tool call", param=where)
    before = messages[i - 1] if i else None
    if before is None or before.role != "assistant" or not before.tool_calls:
        raise bad_request(f"{where}: a 'tool' message must follow an assistant message with tool_calls", param=where)
    if message.tool_call_id != before.tool_calls[0].id:
        raise bad_request(f"{where} must be the id of the call it answers ('{before.tool_calls[0].id}'), got "
                          f"{message.tool_call_id!r}", param=where)


def assistant_message(text: str, tools: list[str]) -> dict:
    """The assistant message of a generated text. With ``tools`` offered, an answer that calls one of them (read
    as ``Llama.chat_completion`` reads it: ``tokenizer.tools.parse_tool_calls``) comes back in OpenAI's shape,
    ``tool_calls`` with arguments as JSON text and null content; any other text (a call to a tool not offered
    too) as content."""
    _, calls = parse_tool_calls(text) if tools else (text, [])
    if not calls or any(call["function"]["name"] not in tools for call in calls):
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call["function"]["name"],
                      "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
        for call in calls
    ]}


# ------------------------------------------------------------------------------------------------ the app


def create_app(llm: Llama, model_name: str = "llama", api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = 4 << 20, ready_deadline_s: float = 10.0, threads: int | None = None) -> FastAPI:
    """The server of ``llm``: the engine thread starts with the app (uvicorn's lifespan) and stops with it, and
    steps with ``threads`` intra-op threads (default: the calling thread's)."""
    metrics = Metrics()
    server = Server(llm, model_name, max_queue, metrics, threads)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="llama-one", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        if not server.scheduler.alive:
            raise APIError(503, "the engine thread is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        if not await server.scheduler.probe(server.probe_prompt, ready_deadline_s):
            loading = not server.scheduler.warm.is_set()
            raise APIError(503, "loading (warming up)" if loading else
                           f"the engine did not generate a token within {ready_deadline_s:g} s",
                           "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "llama-one", "max_model_len": server.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        refuse_unimplemented(body, "tokenize")
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give either 'prompt' or 'messages'", param="prompt")
        if body.tools is not None and body.messages is None:
            raise bad_request("tools go with 'messages'", param="tools")
        if body.messages is not None:
            tokens = server.encode_messages(body.messages, body.tools)
        else:
            tokens = server.tokenizer.encode(body.prompt, bos=body.add_special_tokens and server.tokenizer.add_bos)
        return {"tokens": tokens, "token_strs": [server.token_text(t) for t in tokens], "count": len(tokens),
                "max_model_len": server.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        refuse_unimplemented(body, "detokenize")
        server.check_model(body.model)
        if not all(0 <= t < server.vocab_size for t in body.tokens):
            raise bad_request(f"tokens must be ids in 0..{server.vocab_size - 1}", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HTTPRequest):
        refuse_unimplemented(body, "completions")
        server.check_model(body.model)
        echo, top = bool(body.echo), body.logprobs
        decode, stop_ids = None, ()
        if body.suffix is not None:  # fill in the middle: the prompt is the prefix
            if echo:
                raise bad_request("echo cannot be combined with suffix", param="echo")
            prompts, stop_ids = server.infilling_prompts(prompt_list(body.prompt), body.suffix)
            decode = server.tokenizer.decode_infill
        else:
            prompts = [server.tokenizer.encode(p, bos=server.tokenizer.add_bos) if isinstance(p, str) else p
                       for p in prompt_list(body.prompt)]
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        sampling = server.sampling(body, max_tokens, top is not None, top or 0, stop_ids)
        requests = server.requests(prompts, body, max_tokens, sampling, echo_logprobs=echo and top is not None)
        n = body.n or 1
        echo_texts = [server.tokenizer.decode(p) if echo else "" for p in prompts for _ in range(n)]
        generation = server.generation(requests, echo_texts, sum(map(len, prompts)), decode)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return _sse(_stream_completion(server, generation, meta, echo, body))
        if not await generation.wait(http_request):
            return Response(status_code=CLIENT_CLOSED)
        generation.check_failures()
        choices = []
        for i, request in enumerate(requests):
            logprobs = None
            if top is not None:
                logprobs = server.completion_logprobs(request, 0, len(request.tokens), echo, 0)
            choices.append({"index": i, "text": echo_texts[i] + generation.text(i), "logprobs": logprobs,
                            "finish_reason": generation.reasons[i]})
        return {**meta, "choices": choices, "usage": generation.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http_request: HTTPRequest):
        refuse_unimplemented(body, "chat")
        server.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise bad_request("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        choice = tool_choice(body.tool_choice)
        prompt = server.encode_messages(body.messages, body.tools, offer_tools=choice == "auto")
        offered = tool_names(body.tools) if choice == "auto" else []  # calls are read from the answers
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        sampling = server.sampling(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0)
        requests = server.requests([prompt], body, max_tokens, sampling)
        generation = server.generation(requests, [""] * len(requests), len(prompt))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return _sse(_stream_chat(server, generation, meta, body, offered))
        if not await generation.wait(http_request):
            return Response(status_code=CLIENT_CLOSED)
        generation.check_failures()
        choices = []
        for i, request in enumerate(requests):
            message = assistant_message(generation.text(i), offered)
            choices.append({
                "index": i, "message": message,
                "logprobs": server.chat_logprobs(request, 0, len(request.tokens)) if body.logprobs else None,
                "finish_reason": "tool_calls" if "tool_calls" in message else generation.reasons[i],
            })
        return {**meta, "choices": choices, "usage": generation.usage()}

    return Gate(app, api_key, max_body_bytes, metrics)


# ------------------------------------------------------------------------------------------------ streams


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chunks(generation: Generation) -> AsyncIterator[set[int]]:
    """The choices that made progress, update by update, until all are done; a client that leaves (the
    response's task is cancelled) cancels the generation."""
    try:
        while not generation.done:
            yield await generation.next_updates()
    finally:
        generation.close()


async def _stream_completion(server: Server, generation: Generation, meta: dict, echo: bool, body):
    echoed = [not echo] * len(generation.requests)  # the prompt's text (and logprobs) lead a choice's first chunk
    offsets = [0] * len(generation.requests)
    async for changed in _chunks(generation):
        for i in sorted(changed):
            request = generation.requests[i]
            start, stop = generation.emitted_tokens[i], generation.counts[i]
            head, echoed[i] = ("" if echoed[i] else generation.echo_texts[i]), True
            text = head + generation.new_text(i)
            logprobs = None
            if body.logprobs is not None and (stop > start or head):
                logprobs = server.completion_logprobs(request, start, stop, bool(head), offsets[i])
            if not (text or logprobs or generation.reasons[i]):
                continue
            offsets[i] += len(text)
            generation.emitted_tokens[i] = stop
            yield {**meta, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                        "finish_reason": generation.reasons[i]}]}
    if "error" in generation.reasons:
        yield error_body("internal error while generating; see the server log", "internal_error")
        return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {**meta, "choices": [], "usage": generation.usage()}
    yield "[DONE]"


async def _stream_chat(server: Server, generation: Generation, meta: dict, body, tools: list[str]):
    """Chat chunks as OpenAI streams them. With ``tools`` offered a choice is sent whole once done (whether it
    calls a tool is known only then): a call as one ``tool_calls`` delta, other text as one content delta."""
    meta = {**meta, "object": "chat.completion.chunk"}
    for i in range(len(generation.requests)):
        yield {**meta, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    async for changed in _chunks(generation):
        for i in sorted(changed):
            request, reason = generation.requests[i], generation.reasons[i]
            if tools and reason is None:
                continue
            start, stop = generation.emitted_tokens[i], generation.counts[i]
            text = generation.new_text(i)
            logprobs = server.chat_logprobs(request, start, stop) if body.logprobs and stop > start else None
            if not (text or logprobs or reason):
                continue
            generation.emitted_tokens[i] = stop
            message = assistant_message(text, tools) if tools else {}
            if "tool_calls" in message:
                delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
                reason = "tool_calls"
            else:
                delta = {"content": text} if text or not reason else {}
            yield {**meta, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
    if "error" in generation.reasons:
        yield error_body("internal error while generating; see the server log", "internal_error")
        return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {**meta, "choices": [], "usage": generation.usage()}
    yield "[DONE]"


# ------------------------------------------------------------------------------------------------ errors


def install_error_handlers(app: FastAPI) -> None:
    """Every failure in the one error body: bad input 4xx; only a true internal fault 500 (and logged)."""

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        elif not loc:
            message = f"the request body must be a JSON object ({first.get('msg')})"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        more = len(error.errors()) - 1
        return _error_response(bad_request(message + (f" (and {more} more problems)" if more > 0 else ""), param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else error.detail
        kind = kinds.get(error.status_code, "invalid_request_error")
        return _error_response(APIError(error.status_code, message, kind, headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "internal error; see the server log", "internal_error"))
