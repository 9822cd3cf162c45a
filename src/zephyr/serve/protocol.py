"""OpenAI's chat-completions wire format: check a request body, and shape responses, stream chunks and errors.

Everything here is pure (bytes or dicts in, dicts out) so the rules can be read in one place: which fields a
request may carry, which values they take, and what the official `openai` client expects back.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from zephyr.engine import Completion
from zephyr.serve.limits import ServeLimits


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request.

    sampling holds engine.sampling() overrides (temperature, top_p, top_k, max_new_tokens, stop, seed), only
    those the client gave; the engine fills the rest from the model's generation config.
    """

    messages: list
    model: str | None = None
    sampling: dict = field(default_factory=dict)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


# Fields the server honours, and OpenAI fields it accepts only at their no-op value (null, or the value listed),
# so a client's defaults pass while a request that asks for something unsupported gets a 400 instead of being
# quietly answered without it.
_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
}
_NO_OP_VALUES = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logprobs": (False,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "store": (False,),
}


def parse_chat_request(raw: bytes, limits: ServeLimits) -> ChatRequest:
    """RAW (a request body) as a ChatRequest, or an ApiError(400) naming the first bad field.

    Messages are only checked for being a bounded list here; their roles and contents are the engine's to check.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")

    for key, value in body.items():
        if key in _FIELDS:
            continue
        if key not in _NO_OP_VALUES:
            raise ApiError(400, f"unrecognized request field {key!r}", param=key)
        if value is not None and value not in _NO_OP_VALUES[key]:
            raise ApiError(400, f"{key} is not supported by this server; leave it out", param=key)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if "messages" not in body:
        raise ApiError(400, "messages is required: a list of {role, content} objects", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(
            400,
            f"messages has {len(messages)} entries; this server takes at most {limits.max_messages}",
            param="messages",
        )

    temperature = _number(
        body, "temperature"
    )  # below zephyr.engine.MIN_TEMPERATURE the engine decodes greedily
    seed = _integer(body, "seed")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ApiError(400, "seed must fit in 64 bits", param="seed")
    sampling = {
        "temperature": temperature,
        "top_p": _number(body, "top_p"),
        "top_k": _integer(body, "top_k"),
        "seed": seed,
        "stop": _stop(body),
        "max_new_tokens": _max_tokens(body, limits),
    }
    n = _integer(body, "n")
    if n is not None and not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n must be between 1 and {limits.max_n}", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", param="user")

    return ChatRequest(
        messages=messages,
        model=model,
        sampling={k: v for k, v in sampling.items() if v is not None},
        n=n or 1,
        stream=bool(stream),
        include_usage=bool(include_usage),
    )


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python, but JSON's true is no temperature.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number", param=key)
    return value


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", param=key)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return None if stop is None else [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise ApiError(400, "stop must be a string or a list of strings", param="stop")


def _max_tokens(body: dict, limits: ServeLimits) -> int | None:
    """The answer's token budget: max_completion_tokens (OpenAI's current name) over the older max_tokens."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, key)
    if value is not None and not 1 <= value <= limits.max_tokens:
        raise ApiError(400, f"{key} must be between 1 and {limits.max_tokens}", param=key)
    return value


# ---------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class ResponseHead:
    """What every response and chunk of one request shares."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> ResponseHead:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def usage(completions: Sequence[Completion]) -> dict:
    """Token counts; the n choices share one prompt, so it is counted once (as OpenAI does)."""
    prompt = completions[0].prompt_tokens
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_response(head: ResponseHead, completions: Sequence[Completion]) -> dict:
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ],
        "usage": usage(completions),
    }


def chunk(
    head: ResponseHead, index: int, delta: dict, finish_reason: str | None = None, *, with_usage: bool = False
) -> dict:
    """One streamed chat.completion.chunk for choice INDEX. With include_usage every chunk carries usage: null
    until the last one, as OpenAI's do."""
    body = {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "system_fingerprint": None,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(head: ResponseHead, completions: Sequence[Completion]) -> dict:
    return {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(completions),
    }


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: JSON` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "zephyr"}
