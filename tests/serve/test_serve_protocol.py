"""Request checking and response shapes of the OpenAI wire format, without a server."""

from __future__ import annotations

import json

import pytest

from zephyr.engine import Completion
from zephyr.errors import ConfigError
from zephyr.serve.limits import ServeLimits
from zephyr.serve.protocol import (
    ApiError,
    ResponseHead,
    chunk,
    completion_response,
    parse_chat_request,
    sse,
    usage_chunk,
)

LIMITS = ServeLimits(max_tokens=100, max_n=4, max_messages=3, queue_size=8)
HELLO = [{"role": "user", "content": "hi"}]


def parse(**body):
    return parse_chat_request(json.dumps(body).encode(), LIMITS)


def rejected(raw: bytes | dict) -> ApiError:
    if isinstance(raw, dict):
        raw = json.dumps(raw).encode()
    with pytest.raises(ApiError) as caught:
        parse_chat_request(raw, LIMITS)
    assert caught.value.status == 400
    return caught.value


def test_only_given_sampling_fields_are_overridden():
    chat = parse(model="tiny", messages=HELLO, temperature=0.5, top_k=3, stop="\n", seed=9, max_tokens=7)
    assert chat.sampling == {"temperature": 0.5, "top_k": 3, "stop": ["\n"], "seed": 9, "max_new_tokens": 7}
    assert (chat.model, chat.n, chat.stream, chat.include_usage) == ("tiny", 1, False, False)
    assert parse(messages=HELLO).sampling == {}  # the rest comes from the engine's generation config


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse(messages=HELLO, max_tokens=5, max_completion_tokens=9).sampling == {"max_new_tokens": 9}


def test_stream_options():
    chat = parse(messages=HELLO, stream=True, stream_options={"include_usage": True}, n=4)
    assert (chat.stream, chat.include_usage, chat.n) == (True, True, 4)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": HELLO * 4}, "messages"),  # over max_messages=3
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": True}, "temperature"),
        ({"messages": HELLO, "top_k": 2.5}, "top_k"),
        ({"messages": HELLO, "max_tokens": 101}, "max_tokens"),
        ({"messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": HELLO, "n": 5}, "n"),
        ({"messages": HELLO, "seed": 2**64}, "seed"),
        ({"messages": HELLO, "stop": 3}, "stop"),
        ({"messages": HELLO, "stop": ["a", 3]}, "stop"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": HELLO, "model": 3}, "model"),
        ({"messages": HELLO, "best_of": 2}, "best_of"),  # not an accepted field at all
        ({"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),  # accepted only as a no-op
        ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_bad_fields_are_named(body, param):
    assert rejected(body).param == param


def test_no_op_values_of_unsupported_fields_pass():
    parse(messages=HELLO, presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u1", tools=None)


def test_malformed_bodies():
    assert "not valid JSON" in rejected(b"{messages: ").message
    assert "not valid JSON" in rejected(b"\xff\xfe").message
    assert "JSON object" in rejected(b"[1, 2]").message


def test_response_shapes():
    head = ResponseHead(id="chatcmpl-x", created=5, model="tiny")
    done = [Completion("ab", "stop", 10, 2), Completion("abc", "length", 10, 3)]
    body = completion_response(head, done)
    assert body["object"] == "chat.completion"
    assert [c["message"]["content"] for c in body["choices"]] == ["ab", "abc"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    # the shared prompt counts once: 10 + (2 + 3)
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert chunk(head, 1, {"content": "a"})["choices"] == [
        {"index": 1, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in chunk(head, 0, {}) and chunk(head, 0, {}, with_usage=True)["usage"] is None
    assert usage_chunk(head, done)["choices"] == []
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'


@pytest.mark.parametrize(
    "bad", [{"max_body_bytes": 0}, {"max_n": -1}, {"batch_wait_ms": -1}, {"queue_size": 2, "max_n": 3}]
)
def test_limits_are_checked(bad):
    with pytest.raises(ConfigError, match="--"):
        ServeLimits(**bad)
