"""`zephyr serve`: an OpenAI-compatible chat server with a web chat page, over the shared generation engine.

    zephyr serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY'); ..."

MODEL is a folder (a Zephyr training output), a hub id, or nothing for the embedded model. The page is at `/`,
the API under `/v1`, liveness at `/health`.
"""

from __future__ import annotations

import socket
import sys

from zephyr.errors import ZephyrError
from zephyr.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app", "serve"]


def __getattr__(name: str):
    # FastAPI loads only when a server is built, so `zephyr --help` can read ServeLimits' fields for its flags.
    if name == "create_app":
        from zephyr.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    *,
    served_model_name: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Load MODEL and serve it until interrupted (Ctrl-C shuts down cleanly); the exit status.

    The model's id in the API is SERVED_MODEL_NAME, else the folder name or hub id (never a full local path).
    """
    import uvicorn

    from zephyr.engine import Engine, model_label
    from zephyr.serve.app import create_app

    listener = _bind(
        host, port
    )  # before loading the model: a taken port should fail in a second, not a minute
    try:
        engine = Engine.load(
            model,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            name=served_model_name or model_label(model),
        )
    except BaseException:
        listener.close()
        raise
    app = create_app(engine, limits or ServeLimits(), api_key)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {engine.name} on {engine.device}: chat page http://{shown}:{port}/ , API http://{shown}:{port}/v1"
    )
    if host not in _LOOPBACK and api_key is None:
        print(
            f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    # A grace period so Ctrl-C does not wait forever on a client that keeps a stream open.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown; stopping is the normal end
        pass
    return 0


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as err:
        raise ZephyrError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port or --host"
        ) from err
    listener.set_inheritable(True)
    return listener
