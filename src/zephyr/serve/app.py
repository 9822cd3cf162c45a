"""The HTTP side of `zephyr serve`: OpenAI's /v1 routes, /health and the chat page, over one Scheduler.

    GET  /                      the chat page (static, no key needed: it asks for the key itself)
    GET  /health                {"status", "model", "queue_depth", "running"} (no key needed)
    GET  /v1/models             the one model served
    GET  /v1/models/{id}
    POST /v1/chat/completions   OpenAI chat completions, streamed as server-sent events with "stream": true

Every error, FastAPI's own included, comes back in OpenAI's shape {"error": {"message", "type", "param",
"code"}} so the official client raises its usual exceptions. No route takes a path or reads a file.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zephyr.engine import Engine, RequestError
from zephyr.serve.limits import ServeLimits
from zephyr.serve.protocol import (
    ApiError,
    ResponseHead,
    chunk,
    completion_response,
    error_body,
    model_card,
    parse_chat_request,
    sse,
    usage_chunk,
)
from zephyr.serve.scheduler import GenerationFailed, Overloaded, Scheduler, Ticket

log = logging.getLogger("zephyr.serve")

# The page carries its CSS and JS inline and may talk only to this server.
_PAGE_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by anyone


def create_app(engine: Engine, limits: ServeLimits | None = None, api_key: str | None = None) -> FastAPI:
    """The server for ENGINE. Its batching worker starts and stops with the app's lifespan;
    `app.state.scheduler` is exposed for /health-style introspection and tests."""
    limits = limits or ServeLimits()
    scheduler = Scheduler(engine, limits)
    started = int(time.time())
    page = (files("zephyr.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    # No /docs: Swagger UI would pull its assets from a CDN.
    app = FastAPI(title="zephyr serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.limits = limits
    app.add_middleware(_ErrorBoundary)
    _add_error_handlers(app)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send it as the header `Authorization: Bearer KEY`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(
            page, headers={"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"}
        )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": engine.name,
            "context_length": engine.context_length,
            "queue_depth": scheduler.queue_depth,
            "running": scheduler.running,
        }

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @api.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(engine.name, started)]}

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != engine.name:
            raise _unknown_model(model_id, engine.name)
        return model_card(engine.name, started)

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await _read_body(request, limits.max_body_bytes), limits)
        if chat.model is not None and chat.model != engine.name:
            raise _unknown_model(chat.model, engine.name)
        try:
            prompt_ids = engine.encode_chat(chat.messages)
            params = engine.sampling(**chat.sampling)
        except RequestError as err:
            raise ApiError(400, str(err), param=err.param, code=err.code) from err
        if params.max_new_tokens > limits.max_tokens:  # the model's generation config may ask for more
            params = replace(params, max_new_tokens=limits.max_tokens)
        # n independent answers; with a seed, choice i uses seed + i so they differ yet stay reproducible.
        choices = [
            params if params.seed is None else replace(params, seed=params.seed + i) for i in range(chat.n)
        ]
        try:
            ticket = scheduler.submit(prompt_ids, choices, asyncio.get_running_loop(), stream=chat.stream)
        except Overloaded as err:
            raise ApiError(
                503,
                f"the server is busy ({err}); retry shortly",
                type="server_error",
                code="server_overloaded",
                headers={"Retry-After": str(scheduler.retry_after_s())},
            ) from err
        head = ResponseHead.new(engine.name)
        if chat.stream:
            return StreamingResponse(
                _stream(ticket, head, chat.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                # Runs after the stream ends or the client disconnects: either way its generations may stop.
                background=BackgroundTask(ticket.cancel),
            )
        return await _answer(request, ticket, head)

    app.include_router(api)
    return app


# ------------------------------------------------------------------------------------------------ answers


async def _stream(ticket: Ticket, head: ResponseHead, include_usage: bool):
    """The SSE body: a role delta per choice, content deltas as the engine finalises text, a finish chunk per
    choice, the usage chunk when asked for, then [DONE]. Cancelled (the client left) -> the ticket is cancelled."""
    try:
        for i in range(ticket.n):
            yield sse(chunk(head, i, {"role": "assistant", "content": ""}, with_usage=include_usage))
        done = [None] * ticket.n
        for _ in range(ticket.n):
            index, kind, payload = await ticket.events.get()
            while kind == "text":
                yield sse(chunk(head, index, {"content": payload}, with_usage=include_usage))
                index, kind, payload = await ticket.events.get()
            if kind == "error":
                yield sse(error_body(payload, type="server_error"))
                return
            done[index] = payload
            yield sse(chunk(head, index, {}, payload.finish_reason, with_usage=include_usage))
        if include_usage:
            yield sse(usage_chunk(head, done))
        yield sse("[DONE]")
    finally:
        ticket.cancel()


async def _answer(request: Request, ticket: Ticket, head: ResponseHead) -> Response:
    """The whole answer as one JSON body; if the client disconnects first, its generations are cancelled."""
    answer = asyncio.ensure_future(ticket.completions())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            ticket.cancel()
    if answer.cancelled():
        return Response(status_code=_CLIENT_GONE)
    try:
        completions = answer.result()
    except GenerationFailed as err:
        raise ApiError(500, str(err), type="server_error") from err
    return JSONResponse(completion_response(head, completions))


async def _client_gone(request: Request) -> None:
    """Return once the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # a server that sends other messages must not make this spin


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it (413) as soon as it is known to be over LIMIT bytes: by its Content-Length
    header before reading anything, or while reading a chunked body, so a huge body is never held in memory."""
    too_large = ApiError(
        413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _unknown_model(asked: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model {asked!r} is not served here; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


# ------------------------------------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """Starlette's own 404 (no such route) and 405 (wrong method, with its Allow header)."""
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        body = error_body(message, type="invalid_request_error")
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 as OpenAI's 400, naming the first bad field."""
        first = next(iter(err.errors()), {})
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{param or 'the request'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(message, type="invalid_request_error", param=param), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=_CLIENT_GONE)


class _ErrorBoundary:
    """The last line: an exception no handler took becomes a 500 in OpenAI's shape and one log line, instead of a
    traceback, and the server goes on serving."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(err).__name__, err)
            if not started:
                body = error_body("internal server error; the server log has the cause", type="server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)
