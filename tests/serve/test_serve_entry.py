"""`serve()`, the entry point `zephyr serve` calls: load a saved model folder, serve it, stop on Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from zephyr.errors import ZephyrError
from zephyr.serve import serve


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_serve_loads_a_folder_and_stops_cleanly_on_ctrl_c(tiny_model_dir):
    port = free_port()
    code = f"import sys; from zephyr.serve import serve; sys.exit(serve({str(tiny_model_dir)!r}, port={port}, api_key='k'))"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        # The API names the model by its folder, never by the full local path.
        assert health["model"] == tiny_model_dir.name
        assert [m["id"] for m in get(f"http://127.0.0.1:{port}/v1/models", key="k")["data"]] == [
            tiny_model_dir.name
        ]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert f"chat page http://127.0.0.1:{port}/" in stdout
    assert "Traceback" not in stderr


def test_a_taken_port_is_a_user_error_before_any_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ZephyrError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            serve("/nonexistent/model", port=port)
