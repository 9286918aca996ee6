"""The OpenAI-compatible request schemas (pydantic) and the one error body of every failure.

Requests are validated strictly (a string is not a number) and may carry only fields the server implements; an
OpenAI field it does not implement is accepted only with OpenAI's default value (or null), so clients that send
defaults keep working, and refused with a 400 that names it otherwise."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama.generation.sampling import MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS

MAX_N = 16  # choices per request

# OpenAI fields this server does not implement, with the value that means "not used".
UNIMPLEMENTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "completions": {"best_of": 1},
    "chat": {
        "functions": [], "function_call": "none",
        "response_format": {"type": "text"}, "store": False, "metadata": {}, "service_tier": "auto",
        "modalities": ["text"], "audio": None, "prediction": None, "reasoning_effort": None,
        "web_search_options": None, "prompt_cache_key": None, "safety_identifier": None, "verbosity": None,
    },
    "stream_options": {"include_obfuscation": True},
}


class APIError(Exception):
    """A failure answered with ``status`` and the error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(Strict):
    include_usage: bool | None = False


class SamplingFields(Strict):
    """Fields of both completions and chat completions; null means OpenAI's default."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range; default 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no limit
    min_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Any = None  # a string or a list of strings: checked by ``stop_list`` with a clear message
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: Any  # a string, strings, token ids or lists of token ids: checked by the handler
    suffix: str | None = None  # the text after the completion: the prompt is infilled (Code Llama's FIM layout)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top logprobs per position


class ContentPart(Strict):
    type: str
    text: str | None = None


class Exact(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionCall(Exact):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(Exact):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers


class FunctionDefinition(Exact):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class FunctionTool(Exact):
    type: Literal["function"]
    function: FunctionDefinition


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # kept as sent: the prompt shows each schema as written
    tool_choice: Any = None  # "none" or "auto": checked by ``tool_choice``
    parallel_tool_calls: bool | None = None  # either way: Llama 3.1 calls one tool per message


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: offered as /v1/chat/completions offers them
    add_special_tokens: bool = True  # with a prompt: BOS where the checkpoint's convention adds one


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


def refuse_unimplemented(request: Strict, kind: str) -> None:
    """400 for a field the server does not implement, unless it holds OpenAI's default (or null)."""
    defaults = UNIMPLEMENTED_DEFAULTS.get(kind, {})
    for name, value in (request.model_extra or {}).items():
        if name in defaults and value in (None, defaults[name]):
            continue
        what = "is not supported by this server" if name in defaults else "is not a known field"
        raise bad_request(f"'{name}' {what}", param=name)
    if isinstance(request, SamplingFields) and request.stream_options is not None:
        refuse_unimplemented(request.stream_options, "stream_options")
        if not request.stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")


def tool_names(tools: list[dict] | None) -> list[str]:
    """The names of OpenAI function tools, each checked (400 naming the first wrong field)."""
    names = []
    for i, tool in enumerate(tools or ()):
        try:
            function = FunctionTool.model_validate(tool).function
        except ValidationError as error:
            first = error.errors()[0]
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
            expected = ' (a tool is {"type": "function", "function": {"name", "description", "parameters"}})'
            raise bad_request(f"tools[{i}]{where}: {first['msg']}{expected}", param=f"tools[{i}]{where}") from None
        if function.strict:
            raise bad_request(f"tools[{i}].function.strict: this server does not constrain arguments to the schema",
                              param=f"tools[{i}].function.strict")
        if function.name in names:
            raise bad_request(f"tools[{i}].function.name: '{function.name}' is given twice",
                              param=f"tools[{i}].function.name")
        names.append(function.name)
    return names


def tool_choice(choice: Any) -> str:
    """The request's tool choice: "auto" (the default: calls are read from the answer) or "none"; forcing a call
    is not implemented."""
    if choice in (None, "auto", "none"):
        return choice or "auto"
    raise bad_request("tool_choice must be 'none' or 'auto' (this server cannot force a call)", param="tool_choice")


def stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", param="stop")
    return stop


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer keys."""
    if not bias:
        return {}
    if not all(key.isdigit() for key in bias):
        raise bad_request("logit_bias keys must be token ids (decimal integers)", param="logit_bias")
    if not all(abs(v) <= MAX_LOGIT_BIAS for v in bias.values()):
        raise bad_request(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", param="logit_bias")
    return {int(key): value for key, value in bias.items()}


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completion's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
        isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt
    ):
        return prompt
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids "
        "(none empty)", param="prompt",
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
