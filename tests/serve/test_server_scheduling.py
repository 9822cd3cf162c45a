"""Batching, cancellation and back-pressure of the scheduler, seen through a real server."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from zephyr.engine import Engine, Request
from zephyr.serve import ServeLimits, create_app

HELLO = [{"role": "user", "content": "Hello!"}]
JSON = {"Content-Type": "application/json"}


def alone(engine, messages, seed: int) -> str:
    """MESSAGES' answer decoded in a batch of its own."""
    params = engine.sampling(temperature=1.0, seed=seed, max_new_tokens=12)
    return engine.run([Request(engine.encode_chat(messages), params)])[0].text


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(tiny_engine, start_server, client_for):
    """8 clients at once, each with its own prompt (of its own length) and seed: every answer must equal that
    request decoded alone, and the worker must have put some of them in one batch."""
    server = start_server(create_app(tiny_engine, ServeLimits(max_batch_size=8, batch_wait_ms=200)))
    try:
        prompts = [[{"role": "user", "content": f"Question {i}: " + "why? " * i}] for i in range(8)]
        expected = [alone(tiny_engine, p, seed=i) for i, p in enumerate(prompts)]
        client = client_for(server)
        start = threading.Barrier(8)

        def ask(i: int) -> str:
            start.wait()
            answer = client.chat.completions.create(
                model="tiny", messages=prompts[i], temperature=1.0, seed=i, max_tokens=12
            )
            return answer.choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert answers == expected
        sizes = server.scheduler.batch_sizes
        assert sum(size * count for size, count in sizes.items()) == 8
        assert max(sizes) > 1, f"no two requests shared a batch: {dict(sizes)}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_engine, start_server):
    server = start_server(create_app(tiny_engine, ServeLimits()))
    yield server
    server.stop()


def open_request(server, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=JSON)
    return connection


# Greedy decoding of the tiny model never produces eos: it would run the whole 400-token budget (seconds).
LONG = {"messages": HELLO, "temperature": 0, "max_tokens": 400}


def test_client_leaving_mid_stream_cancels_its_generation(server):
    before = server.scheduler.finish_reasons.copy()
    connection = open_request(server, {**LONG, "stream": True})
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 2:  # the role delta, then the first content delta
        events += response.fp.readline().startswith(b"data: ")
    connection.close()
    server.wait_for(lambda: server.scheduler.finish_reasons["cancelled"] > before["cancelled"])
    assert server.scheduler.finish_reasons["length"] == before["length"]


def test_client_leaving_before_a_non_streamed_answer_cancels_it(server):
    before = server.scheduler.finish_reasons.copy()
    connection = open_request(server, LONG)
    server.wait_for(lambda: server.scheduler.running == 1)
    connection.close()
    server.wait_for(lambda: server.scheduler.finish_reasons["cancelled"] > before["cancelled"])
    assert server.scheduler.finish_reasons["length"] == before["length"]


class GatedEngine(Engine):
    """Holds every batch until `gate` opens, so a test can fill the queue behind it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def run(self, requests):
        self.gate.wait(timeout=30)
        return super().run(requests)


def test_full_queue_is_503_with_retry_after(tiny_parts, start_server):
    model, tokenizer = tiny_parts
    engine = GatedEngine(model, tokenizer, name="tiny")
    limits = ServeLimits(queue_size=1, max_n=1, max_batch_size=1, batch_wait_ms=0)
    server = start_server(create_app(engine, limits))
    try:
        running = open_request(server, {"messages": HELLO, "max_tokens": 2})
        server.wait_for(lambda: server.scheduler.running == 1)
        waiting = open_request(server, LONG)
        server.wait_for(lambda: server.scheduler.queue_depth == 1)

        status, headers, body = server.request("POST", "/v1/chat/completions", {"messages": HELLO}, JSON)
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "server_overloaded"
        status, _, health = server.request("GET", "/health")
        assert status == 200 and (health["running"], health["queue_depth"]) == (1, 1)

        # The waiting client gives up: its generation is dropped (or stopped at once), never decoded in full.
        waiting.close()
        engine.gate.set()
        assert running.getresponse().status == 200
        server.wait_for(lambda: server.scheduler.finish_reasons == {"length": 1, "cancelled": 1})
        assert (
            server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1}, JSON)[0]
            == 200
        )
    finally:
        engine.gate.set()
        server.stop()
