"""Every error status of the server, each in OpenAI's {"error": {message, type, param, code}} shape."""

from __future__ import annotations

import json
import socket

import openai
import pytest

from zephyr.engine import Engine
from zephyr.serve import ServeLimits, create_app

HELLO = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}
LIMITS = ServeLimits(max_body_bytes=4096, max_tokens=64, max_n=2, queue_size=8)


@pytest.fixture(scope="module")
def server(tiny_engine, start_server):
    app = create_app(tiny_engine, LIMITS)

    @app.get("/v1/typed-probe")  # FastAPI validates this one itself, so its 422 path can be checked
    async def typed_probe(count: int) -> dict:
        return {"count": count}

    server = start_server(app)
    yield server
    server.stop()


def assert_error(response, status: int, *, param=None, code=None, type="invalid_request_error") -> dict:
    got_status, _, body = response
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code)
    return error


def chat(server, body, headers=JSON):
    return server.request("POST", "/v1/chat/completions", body, headers)


def test_malformed_json(server):
    assert_error(chat(server, b'{"messages": [}'), 400)


def test_missing_messages(server):
    assert_error(chat(server, {"model": "tiny"}), 400, param="messages")


def test_bad_role(server):
    assert_error(
        chat(server, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, param="messages[0].role"
    )


def test_content_that_is_not_text(server):
    assert_error(
        chat(server, {"messages": [{"role": "user", "content": 5}]}), 400, param="messages[0].content"
    )


@pytest.mark.parametrize("temperature", [5, -1, "hot"])
def test_bad_temperature(server, temperature):
    assert_error(chat(server, {"messages": HELLO, "temperature": temperature}), 400, param="temperature")


def test_too_many_stop_strings_named_by_the_engine(server):
    assert_error(chat(server, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}), 400, param="stop")


def test_max_tokens_over_the_server_limit(server):
    assert_error(chat(server, {"messages": HELLO, "max_tokens": 65}), 400, param="max_tokens")


def test_prompt_longer_than_the_context(server):
    # Bytes the tiny tokenizer never merged: one token each, so 1,500 of them overflow the 512-token context.
    long = [{"role": "user", "content": "zq" * 750}]
    error = assert_error(
        chat(server, {"messages": long}), 400, param="messages", code="context_length_exceeded"
    )
    assert "512" in error["message"]


def test_validation_errors_of_fastapi_routes_are_400_not_422(server):
    assert_error(server.request("GET", "/v1/typed-probe?count=many"), 400, param="count")


def test_unknown_model(server, client_for):
    assert_error(
        chat(server, {"model": "gpt-4", "messages": HELLO}), 404, param="model", code="model_not_found"
    )
    assert_error(server.request("GET", "/v1/models/gpt-4"), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client_for(server).chat.completions.create(model="gpt-4", messages=HELLO)


def test_unknown_route_and_wrong_method(server):
    error = assert_error(server.request("GET", "/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in error["message"]
    response = server.request("GET", "/v1/chat/completions")
    assert_error(response, 405)
    assert response[1]["allow"] == "POST"


def test_body_over_the_limit_by_content_length(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert_error(chat(server, body), 413, code="request_too_large")


def test_chunked_body_over_the_limit(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    pieces = [b'{"messages": [{"role": "user", "content": "'] + [b"x" * 1000] * 5 + [b'"}]}']
    connection.request("POST", "/v1/chat/completions", body=iter(pieces), headers=JSON, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_huge_declared_body_is_refused_without_waiting_for_it(server):
    """A client announcing 1 GB gets its 413 at once; the server does not wait for (or buffer) the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_the_server_survives_all_of_that(server, client_for):
    assert server.request("GET", "/health")[0] == 200
    assert client_for(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices


# ------------------------------------------------------------------------------------------------ API key


@pytest.fixture(scope="module")
def keyed(tiny_engine, start_server):
    server = start_server(create_app(tiny_engine, LIMITS, api_key="sekret"))
    yield server
    server.stop()


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Bearer sekre", "Basic sekret", "sekret", "Bearer "]
)
def test_missing_or_wrong_key_is_401(keyed, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_error(keyed.request("GET", "/v1/models", headers=headers), 401, code="invalid_api_key")
    # checked before the body is even parsed
    response = chat(keyed, b"{not json", {**JSON, **headers})
    assert_error(response, 401, code="invalid_api_key")
    assert response[1]["www-authenticate"] == "Bearer"


def test_right_key_works_with_the_openai_client(keyed, client_for):
    client = client_for(keyed, api_key="sekret")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens
        == 2
    )
    with pytest.raises(openai.AuthenticationError):
        client_for(keyed, api_key="nope").models.list()


def test_health_and_page_need_no_key(keyed):
    assert keyed.request("GET", "/health")[0] == 200
    assert keyed.request("GET", "/")[0] == 200


# ------------------------------------------------------------------------------------------- server faults


class FaultyEngine(Engine):
    """Raises from run() while `broken`, as a GPU out-of-memory would, and from encode_chat() while
    `broken_tokenizer`, as a bug would."""

    broken = True
    broken_tokenizer = False

    def run(self, requests):
        if self.broken:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().run(requests)

    def encode_chat(self, messages):
        if self.broken_tokenizer:
            raise ValueError("tokenizer bug (simulated)")
        return super().encode_chat(messages)


def test_engine_failure_is_a_500_in_shape_and_the_server_goes_on(
    tiny_parts, start_server, client_for, caplog
):
    model, tokenizer = tiny_parts
    engine = FaultyEngine(model, tokenizer, name="tiny")
    server = start_server(create_app(engine, LIMITS))
    try:
        client = client_for(server)
        error = assert_error(chat(server, {"messages": HELLO, "max_tokens": 2}), 500, type="server_error")
        assert "RuntimeError" in error["message"] and "CUDA" not in error["message"]  # no internals leak
        with pytest.raises(openai.APIError, match="generation failed"):
            list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True))
        assert any(
            "generation failed" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records
        )
        engine.broken = False
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices

        # An exception no handler expects: still a 500 in shape, one log line, no traceback anywhere.
        engine.broken_tokenizer = True
        error = assert_error(chat(server, {"messages": HELLO}), 500, type="server_error")
        assert "tokenizer bug" not in error["message"]
        assert any("ValueError: tokenizer bug" in r.getMessage() for r in caplog.records)
        assert all(r.exc_info is None for r in caplog.records)
        engine.broken_tokenizer = False
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices
    finally:
        server.stop()
