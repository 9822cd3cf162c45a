"""A real `zephyr serve` server (uvicorn, in a background thread, on a free port) over a tiny random model."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest


@pytest.fixture(scope="session")
def tiny_parts():
    """(model, tokenizer): a 2-layer random Llama and the byte-level tokenizer with a ChatML template."""
    from tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer), tokenizer


@pytest.fixture(scope="session")
def tiny_engine(tiny_parts):
    from zephyr.engine import Engine

    model, tokenizer = tiny_parts
    return Engine(model, tokenizer, name="tiny")


class RunningServer:
    """uvicorn serving APP on 127.0.0.1 at a port the OS picked; `url` is its base address."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, headers, parsed JSON or raw bytes) of one request; BODY may be a dict (sent as JSON)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw
        return response.status, response.headers, payload

    def wait_for(self, condition, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the server")
            time.sleep(0.01)


@pytest.fixture(scope="session")
def start_server():
    """start_server(app) -> RunningServer; every server still running is stopped at the end of the session."""
    servers = []

    def start(app) -> RunningServer:
        server = RunningServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def openai_client(server: RunningServer, api_key: str = "unused"):
    from openai import OpenAI

    # No retries: a test that expects an error must see the first answer.
    return OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def client_for():
    return openai_client
