"""Load on `zephyr serve`: concurrent streaming and non-streaming clients, bad requests, clients that leave.

    .venv/bin/python benchmarks/serve_load.py                 # starts its own server on the embedded model
    .venv/bin/python benchmarks/serve_load.py --threads 1     # ... decoding on one torch thread
    .venv/bin/python benchmarks/serve_load.py --clients 64 --requests 960 --max-tokens 32
    .venv/bin/python benchmarks/serve_load.py --port 8000     # a server already running, with default limits

CLIENTS concurrent clients share REQUESTS requests, each client sending its next one when the last is answered.
A tenth are bad (malformed JSON, a wrong role, max_tokens over the limit, an unknown model, a body over the limit,
a prompt over the context) and must get their 4xx in OpenAI's error shape; a twentieth open a stream, read the
first content delta and hang up; the rest ask greedy answers to a few fixed prompts, half streamed and half not.
Every answer must be well formed and equal that prompt's answer decoded alone (batching must not change a greedy
answer), or be a 503 with Retry-After when the queue is full; the client then waits Retry-After and sends the
request again, at most twice, as the `openai` client does by default. The table gives latency percentiles of the
answers (from the first attempt, waits included), throughput, and the resident memory of a server the script
started, after a warm-up, at its peak under load, and after.

tests/serve/test_load.py runs the same driver (`run_load`) with small numbers on an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import httpx2

from zephyr.serve.limits import ServeLimits

# Short questions; SmolLM2-135M-Instruct's greedy answers to most run past a budget of 8-16 tokens.
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
)
# For clients that hang up: an answer long enough to still be decoding when they do.
LONG_PROMPT = "Write a long story about a lighthouse keeper and a storm."
LEAVE_AFTER_EVENTS = 2  # the role delta and the first content delta


class Call(NamedTuple):
    """One planned request: kind is "json", "stream", "leave" or the name of a bad request."""

    kind: str
    prompt: int  # index into PROMPTS (unused by "leave" and bad requests)


class BadRequest(NamedTuple):
    """A request the server must refuse, and the refusal: status and the error's param and code."""

    body: bytes
    status: int
    param: str | None
    code: str | None


@dataclass
class Outcome:
    """What one request got back."""

    kind: str
    status: int  # HTTP status; 0 when the connection failed
    seconds: float  # from sending the request to the end of the answer (to hanging up, for "leave")
    first_token_s: float | None = None  # streams: to the first content delta
    completion_tokens: int = 0
    retry_after: int | None = None  # seconds, of a 503
    refusals: int = 0  # 503s before this answer, each retried after its Retry-After
    problem: str | None = None  # how the answer differs from what the server should have sent


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    wall_s: float
    clients: int

    @property
    def problems(self) -> list[str]:
        return [f"{o.kind} ({o.status}): {o.problem}" for o in self.outcomes if o.problem]

    def count(self, kinds: Sequence[str], status: int | None = None) -> int:
        return sum(o.kind in kinds and (status is None or o.status == status) for o in self.outcomes)

    def answered(self) -> list[Outcome]:
        """The valid requests answered in full (200, no problem)."""
        return [
            o for o in self.outcomes if o.kind in ("json", "stream") and o.status == 200 and not o.problem
        ]

    def table(self) -> str:
        rows = [
            f"{'requests':<28}{'sent':>6}{'200':>6}{'503':>6}{'4xx':>6}{'problems':>9}{'503 retried':>12}"
        ]
        bad = sorted({o.kind for o in self.outcomes} - {"json", "stream", "leave"})
        for label, kinds in [("json", ["json"]), ("stream", ["stream"]), ("leave mid-stream", ["leave"])] + [
            (f"bad: {name}", [name]) for name in bad
        ]:
            mine = [o for o in self.outcomes if o.kind in kinds]
            statuses = Counter(o.status for o in mine)
            client_errors = sum(n for s, n in statuses.items() if 400 <= s < 500)
            rows.append(
                f"{label:<28}{len(mine):>6}{statuses[200]:>6}{statuses[503]:>6}{client_errors:>6}"
                f"{sum(bool(o.problem) for o in mine):>9}{sum(o.refusals for o in mine):>12}"
            )
        rows += ["", f"{'latency (s)':<28}{'n':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"]
        answered = self.answered()
        for label, values in [
            ("json answer", [o.seconds for o in answered if o.kind == "json"]),
            ("stream answer", [o.seconds for o in answered if o.kind == "stream"]),
            ("stream first token", [o.first_token_s for o in answered if o.first_token_s is not None]),
            ("503 (after retries)", [o.seconds for o in self.outcomes if o.status == 503]),
        ]:
            p = percentiles(values)
            cells = "".join(f"{p[q]:>8.2f}" for q in ("p50", "p95", "p99", "max")) if values else ""
            rows.append(f"{label:<28}{len(values):>6}{cells}")
        tokens = sum(o.completion_tokens for o in answered)
        rows += [
            "",
            f"{self.clients} clients, {len(self.outcomes)} requests in {self.wall_s:.1f} s: "
            f"{len(answered) / self.wall_s:.2f} answers/s, {tokens / self.wall_s:.1f} generated tokens/s",
        ]
        return "\n".join(rows)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 (linear interpolation between order statistics) and max of VALUES."""
    if not values:
        return {}
    if len(values) == 1:
        return dict.fromkeys(("p50", "p95", "p99", "max"), values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": max(values)}


# ------------------------------------------------------------------------------------------------- the plan


def bad_requests(limits: ServeLimits, context_length: int) -> dict[str, BadRequest]:
    """The bad requests a server with LIMITS and a model of CONTEXT_LENGTH tokens must refuse, by name."""

    def body(**fields) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()

    # " hello" is one token in SmolLM2's (and most BPE) vocabularies, so this is over the context by a margin.
    over_context = body(messages=[{"role": "user", "content": " hello" * (context_length + 64)}])
    bad = {
        "invalid-json": BadRequest(b'{"messages": [{"role": "user", "content": "hi"}', 400, None, None),
        "wrong-role": BadRequest(
            body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", None
        ),
        "max-tokens-over-limit": BadRequest(body(max_tokens=limits.max_tokens + 1), 400, "max_tokens", None),
        "unknown-model": BadRequest(body(model="no-such-model"), 404, "model", "model_not_found"),
        "body-over-limit": BadRequest(
            body(messages=[{"role": "user", "content": "x" * limits.max_body_bytes}]),
            413,
            None,
            "request_too_large",
        ),
    }
    if len(over_context) <= limits.max_body_bytes:  # else the body limit refuses it first
        bad["prompt-over-context"] = BadRequest(over_context, 400, "messages", "context_length_exceeded")
    return bad


def plan(requests: int, bad_kinds: Sequence[str]) -> list[Call]:
    """REQUESTS calls in a fixed order: every tenth bad (cycling through BAD_KINDS), every twentieth a client that
    leaves mid-stream, the rest alternately streamed and not, cycling through PROMPTS."""
    calls = []
    for i in range(requests):
        if i % 10 == 9:
            calls.append(Call(bad_kinds[(i // 10) % len(bad_kinds)], 0))
        elif i % 20 == 4:
            calls.append(Call("leave", 0))
        else:
            calls.append(Call("stream" if i % 2 == 0 else "json", i % len(PROMPTS)))
    return calls


# ---------------------------------------------------------------------------------------------- the driver


def run_load(
    base_url: str,
    *,
    clients: int,
    requests: int,
    max_tokens: int,
    model: str,
    context_length: int,
    limits: ServeLimits | None = None,
    expected: Mapping[int, str] | None = None,
    retries: int = 2,
    timeout_s: float = 300.0,
) -> LoadReport:
    """Send REQUESTS planned requests from CLIENTS concurrent clients to the server at BASE_URL and check each answer.

    limits: the server's limits (for the bad requests). expected: PROMPTS index -> the greedy answer to that
    prompt decoded alone with max_tokens MAX_TOKENS; answers that differ are problems. retries: how many times a
    request refused with 503 is sent again, after waiting its Retry-After.
    """
    limits = limits or ServeLimits()
    bad = bad_requests(limits, context_length)
    calls = plan(requests, list(bad))
    return asyncio.run(
        _drive(base_url, calls, clients, bad, model, max_tokens, limits, expected or {}, retries, timeout_s)
    )


async def _drive(
    base_url, calls, clients, bad, model, max_tokens, limits, expected, retries, timeout_s
) -> LoadReport:
    pending = iter(calls)  # one event loop, so the clients share it without a lock
    outcomes: list[Outcome] = []
    asks = _Asks(bad, model, max_tokens, min(limits.max_tokens, 256), expected)
    async with httpx2.AsyncClient(
        base_url=base_url,
        timeout=timeout_s,
        # Idle connections are dropped after 1 s, well before uvicorn's 5 s keep-alive timeout: a request sent on a
        # connection the server is closing at that moment fails, which would be this client's doing, not the server's.
        limits=httpx2.Limits(
            max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=1.0
        ),
        headers={"Content-Type": "application/json"},
    ) as http:

        async def client() -> None:
            for call in pending:
                first_sent = time.perf_counter()
                outcome = await _send(http, call, asks)
                for refusals in range(1, retries + 1):
                    if outcome.status != 503 or outcome.problem:
                        break
                    await asyncio.sleep(outcome.retry_after)
                    resent = time.perf_counter()
                    outcome = await _send(http, call, asks)
                    outcome.refusals = refusals
                    # Latency as the user sees it: from the first attempt, waits included.
                    outcome.seconds += resent - first_sent
                    if outcome.first_token_s is not None:
                        outcome.first_token_s += resent - first_sent
                outcomes.append(outcome)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return LoadReport(outcomes, wall, clients)


@dataclass(frozen=True)
class _Asks:
    """What the requests of one load ask for."""

    bad: Mapping[str, BadRequest]
    model: str
    max_tokens: int
    leave_tokens: int  # for clients that hang up: more than they will wait for
    expected: Mapping[int, str]


async def _send(http: httpx2.AsyncClient, call: Call, asks: _Asks) -> Outcome:
    if call.kind in asks.bad:
        return await _send_bad(http, call.kind, asks.bad[call.kind])
    body = {
        "model": asks.model,
        "messages": [{"role": "user", "content": PROMPTS[call.prompt]}],
        "temperature": 0,
        "max_tokens": asks.max_tokens,
    }
    if call.kind == "json":
        return await _send_json(http, body, asks.max_tokens, asks.expected.get(call.prompt))
    if call.kind == "stream":
        return await _send_stream(http, body, asks.max_tokens, asks.expected.get(call.prompt))
    body["messages"][0]["content"] = LONG_PROMPT
    body["max_tokens"] = asks.leave_tokens
    return await _send_stream(http, body, asks.leave_tokens, None, leave=True)


async def _send_bad(http: httpx2.AsyncClient, kind: str, bad: BadRequest) -> Outcome:
    start = time.perf_counter()
    try:
        response = await http.post("/v1/chat/completions", content=bad.body)
    except httpx2.HTTPError as err:
        return Outcome(kind, 0, time.perf_counter() - start, problem=f"connection failed: {err!r}")
    outcome = Outcome(kind, response.status_code, time.perf_counter() - start)
    if response.status_code != bad.status:
        outcome.problem = f"expected {bad.status}, got {response.text[:200]!r}"
    else:
        outcome.problem = _error_problem(response, "invalid_request_error", bad.param, bad.code)
    return outcome


async def _send_json(http: httpx2.AsyncClient, body: dict, max_tokens: int, expected: str | None) -> Outcome:
    start = time.perf_counter()
    try:
        response = await http.post("/v1/chat/completions", json=body)
    except httpx2.HTTPError as err:
        return Outcome("json", 0, time.perf_counter() - start, problem=f"connection failed: {err!r}")
    outcome = Outcome("json", response.status_code, time.perf_counter() - start)
    if response.status_code != 200:
        return _overload_check(outcome, response)
    try:
        answer = response.json()
        (choice,) = answer["choices"]
        text, finish_reason = choice["message"]["content"], choice["finish_reason"]
        outcome.completion_tokens = answer["usage"]["completion_tokens"]
        shape_ok = answer["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    except (ValueError, KeyError, TypeError) as err:
        outcome.problem = f"malformed body ({err!r}): {response.text[:200]!r}"
        return outcome
    if not shape_ok:
        outcome.problem = f"not a chat.completion: {response.text[:200]!r}"
    else:
        outcome.problem = _answer_problem(
            text, finish_reason, outcome.completion_tokens, max_tokens, expected
        )
    return outcome


async def _send_stream(
    http: httpx2.AsyncClient, body: dict, max_tokens: int, expected: str | None, *, leave: bool = False
) -> Outcome:
    kind = "leave" if leave else "stream"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    events: list[str] = []
    outcome = Outcome(kind, 0, 0.0)
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                outcome.seconds = time.perf_counter() - start
                return _overload_check(outcome, response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                outcome.problem = f"content-type {response.headers.get('content-type')!r}"
            async for line in response.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    outcome.problem = f"not an SSE data line: {line[:200]!r}"
                    break
                events.append(line[len("data: ") :])
                if outcome.first_token_s is None and '"content": "' in line and '"content": ""' not in line:
                    outcome.first_token_s = time.perf_counter() - start
                if leave and len(events) == LEAVE_AFTER_EVENTS:
                    break  # leaving the block closes the connection mid-stream
    except httpx2.HTTPError as err:
        outcome.problem = f"connection failed after {len(events)} events: {err!r}"
    outcome.seconds = time.perf_counter() - start
    if outcome.problem:
        return outcome
    if leave:
        if len(events) < LEAVE_AFTER_EVENTS:
            outcome.problem = f"the stream ended after {len(events)} events: {events}"
        return outcome
    outcome.problem, outcome.completion_tokens = _stream_problem(events, max_tokens, expected)
    return outcome


def _stream_problem(events: list[str], max_tokens: int, expected: str | None) -> tuple[str | None, int]:
    """(what is wrong with a complete stream's EVENTS, or None; its completion tokens)."""
    if not events or events[-1] != "[DONE]":
        return f"the stream does not end with [DONE]: {events[-3:]}", 0
    try:
        chunks = [json.loads(e) for e in events[:-1]]
        *deltas, finish, usage = chunks
        if deltas[0]["choices"][0]["delta"] != {"role": "assistant", "content": ""}:
            return f"the first chunk is not the role delta: {deltas[0]}", 0
        if any(c["choices"][0]["finish_reason"] is not None for c in deltas):
            return "a finish_reason before the last chunk", 0
        if any(c["object"] != "chat.completion.chunk" for c in chunks):
            return "a chunk that is not a chat.completion.chunk", 0
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
        finish_reason = finish["choices"][0]["finish_reason"]
        tokens = usage["usage"]["completion_tokens"]
        if usage["choices"] != []:
            return f"the usage chunk has choices: {usage}", 0
    except (ValueError, KeyError, TypeError, IndexError) as err:
        return f"malformed chunks ({err!r}): {events[:3]} ... {events[-3:]}", 0
    return _answer_problem(text, finish_reason, tokens, max_tokens, expected), tokens


def _answer_problem(
    text: str, finish_reason: str, tokens: int, max_tokens: int, expected: str | None
) -> str | None:
    if finish_reason not in ("stop", "length"):
        return f"finish_reason {finish_reason!r}"
    if not 0 <= tokens <= max_tokens or (finish_reason == "length") != (tokens == max_tokens):
        return f"{tokens} completion tokens with finish_reason {finish_reason!r} and max_tokens {max_tokens}"
    if expected is not None and text != expected:
        return f"answer {text!r} differs from the one decoded alone, {expected!r}"
    return None


def _overload_check(outcome: Outcome, response: httpx2.Response) -> Outcome:
    """A valid request may only be refused as overload: 503, Retry-After in whole seconds, OpenAI's error shape."""
    retry_after = response.headers.get("retry-after", "")
    if response.status_code != 503:
        outcome.problem = f"expected 200 or 503, got {response.text[:200]!r}"
    elif not retry_after.isdigit():
        outcome.problem = f"503 without a Retry-After in seconds (got {retry_after!r})"
    else:
        outcome.retry_after = int(retry_after)
        outcome.problem = _error_problem(response, "server_error", None, "server_overloaded")
    return outcome


def _error_problem(response: httpx2.Response, type: str, param: str | None, code: str | None) -> str | None:
    """What is wrong with an error response's body against OpenAI's {"error": {message, type, param, code}}."""
    try:
        error = response.json()["error"]
        fields = set(error)
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {response.text[:200]!r}"
    if fields != {"message", "type", "param", "code"} or not error["message"]:
        return f"error fields {sorted(fields)}, message {error.get('message')!r}"
    if (error["type"], error["param"], error["code"]) != (type, param, code):
        return f"error (type, param, code) {(error['type'], error['param'], error['code'])}, expected {(type, param, code)}"
    return None


# --------------------------------------------------------------------------------------------- the server


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of process PID in MiB (VmRSS from /proc; Linux only)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/health", timeout=10) as response:
        return json.loads(response.read())


def reference_answers(base_url: str, model: str, max_tokens: int) -> dict[int, str]:
    """Each prompt's greedy answer from the server, asked one at a time, so each is decoded in a batch of its own."""
    answers = {}
    for i, prompt in enumerate(PROMPTS):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        body["max_tokens"] = max_tokens
        request = urllib.request.Request(
            base_url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answers[i] = json.loads(response.read())["choices"][0]["message"]["content"]
    return answers


def start_server(model: str | None, limits: ServeLimits, threads: int | None) -> tuple[subprocess.Popen, str]:
    """`zephyr serve` in its own process on a free loopback port, decoding on THREADS torch threads (None: torch's
    default, one per core), once /health answers: (process, base URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "zephyr", "serve", "--port", str(port)]
    command += ["--model", model] if model else []
    command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(limits).items()]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            health(url)
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not start: {' '.join(command)}") from None
            time.sleep(0.5)


class PeakRss:
    """Samples a process's RSS every few hundred milliseconds in a thread while in the `with` block."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self.peak = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the embedded one)")
    parser.add_argument("--port", type=int, default=None, help="load a server already on this loopback port")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=16)
    defaults = ServeLimits()
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size, help="of the server it starts")
    parser.add_argument(
        "--max-batch-size", type=int, default=defaults.max_batch_size, help="of the server it starts"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the server this script starts (default: torch's)",
    )
    args = parser.parse_args(argv)

    limits = ServeLimits(queue_size=args.queue_size, max_batch_size=args.max_batch_size)
    process = None
    if args.port is None:
        process, url = start_server(args.model, limits, args.threads)
    else:  # a server already running: all we know of its limits are the defaults
        url, limits = f"http://127.0.0.1:{args.port}", ServeLimits()
    try:
        served = health(url)
        expected = reference_answers(url, served["model"], args.max_tokens)
        load = dict(model=served["model"], context_length=served["context_length"], limits=limits)
        # Warm-up: every batch size once, so the baseline memory includes the allocator's working set.
        run_load(url, clients=args.clients, requests=args.clients, max_tokens=args.max_tokens, **load)
        before = rss_mb(process.pid) if process else None
        with PeakRss(process.pid) if process else contextlib.nullcontext() as peak:
            report = run_load(
                url,
                clients=args.clients,
                requests=args.requests,
                max_tokens=args.max_tokens,
                expected=expected,
                **load,
            )
        time.sleep(1)  # cancelled generations leave the batch at the next step
        after_health = health(url)
        after = rss_mb(process.pid) if process else None
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)

    print(f"zephyr serve under load: {served['model']}, {machine()}")
    print(
        f"server limits: queue_size {limits.queue_size}, max_batch_size {limits.max_batch_size}, "
        f"batch_wait_ms {limits.batch_wait_ms}, torch threads {args.threads or 'default'}; "
        f"requests ask max_tokens {args.max_tokens}, greedy\n"
    )
    print(report.table())
    print(f"/health after the load: {after_health['status']}, queue_depth {after_health['queue_depth']}")
    if before is not None:
        print(
            f"server RSS: {before:.0f} MiB after warm-up, peak {peak.peak:.0f} MiB under load, "
            f"{after:.0f} MiB after ({after - before:+.0f} MiB)"
        )
    for problem in report.problems[:20]:
        print("problem:", problem)
    return 1 if report.problems or after_health["status"] != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
