"""`zephyr serve` on the embedded model under load (the driver is benchmarks/serve_load.py, with small numbers).

32 clients share 96 requests: a tenth bad, a twentieth hanging up mid-stream, the rest greedy questions, half
streamed. The queue (20) is smaller than the clients that can wait (32 - 8 in the batch), so some requests are
refused with 503 and retried. About 55 s on 2 quiet cores, 95-105 s when other work keeps them busy.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

import pytest
import torch

from zephyr.engine import Completion, Request, SamplingParams
from zephyr.serve import ServeLimits, create_app
from zephyr.serve.scheduler import Scheduler, Ticket

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_load import PROMPTS, health, rss_mb, run_load  # noqa: E402

CLIENTS, REQUESTS, MAX_TOKENS = 32, 96, 8
LIMITS = ServeLimits(
    max_tokens=64, max_body_bytes=64 * 1024, queue_size=20, max_batch_size=8, batch_wait_ms=20
)


@pytest.fixture(scope="module")
def engine():
    from zephyr.engine import Engine

    return Engine.load(None)  # fetched into $ZEPHYR_CACHE on first use


@pytest.fixture
def one_torch_thread():
    """Decode on one thread: the clients, uvicorn and the worker share this process, and on a busy 2-core machine
    two intra-op threads made a batch 4-7x slower than one (measured: 31-47 s against 7 s for 8 rows x 8 tokens)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def alone(engine, prompt: str) -> str:
    """PROMPT's greedy answer decoded in a batch of its own, outside any server."""
    params = engine.sampling(temperature=0, max_new_tokens=MAX_TOKENS)
    messages = [{"role": "user", "content": prompt}]
    return engine.run([Request(engine.encode_chat(messages), params)])[0].text


@pytest.mark.slow
@pytest.mark.embedded
def test_the_server_answers_every_request_correctly_under_load_and_recovers(
    engine, start_server, one_torch_thread
):
    expected = {i: alone(engine, prompt) for i, prompt in enumerate(PROMPTS)}
    server = start_server(create_app(engine, LIMITS))
    scheduler = server.scheduler
    load = dict(model=engine.name, context_length=engine.context_length, limits=LIMITS, max_tokens=MAX_TOKENS)

    # Warm-up, so the memory baseline includes the allocator's working set for full batches.
    warm_up = run_load(server.url, clients=CLIENTS, requests=10, **load)
    assert warm_up.problems == []
    gc.collect()
    baseline = rss_mb()
    before = scheduler.finish_reasons.copy()

    report = run_load(server.url, clients=CLIENTS, requests=REQUESTS, expected=expected, **load)
    print(f"\n{report.table()}\nbatches by size: {dict(sorted(scheduler.batch_sizes.items()))}")
    print("\n".join(f"problem: {p}" for p in report.problems))

    # Every answer was right: 200s well formed and equal to the answer decoded alone, 503s with Retry-After and
    # OpenAI's error body, every bad request its own 4xx.
    assert report.problems == []
    valid = report.count(["json", "stream"])
    assert len(report.answered()) >= valid / 2, "most valid requests should get through"
    bad = [o for o in report.outcomes if o.kind not in ("json", "stream", "leave")]
    assert len(bad) == REQUESTS // 10 and all(400 <= o.status < 500 for o in bad)
    assert report.count(["json", "stream", "leave"], 503) + sum(o.refusals for o in report.outcomes) > 0, (
        "the queue never filled: this load does not test overload"
    )

    # Every generation is accounted for: the answered ones finished, those of clients that hung up were cancelled.
    server.wait_for(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
    finished = scheduler.finish_reasons - before
    assert finished["stop"] + finished["length"] == len(report.answered())
    left = report.count(["leave"], 200)
    assert left > 0 and finished["cancelled"] == left

    # The server is well and holds nothing of the load: no ticket alive, memory back near its baseline.
    assert health(server.url)["status"] == "ok"
    time.sleep(0.5)  # the last responses' background tasks
    gc.collect()
    assert [t for t in gc.get_objects() if type(t) is Ticket] == []
    # RSS (clients and server together) rose 11-45 MiB over the load in five runs: allocator arenas of three busy
    # threads, not a trend (a server process alone under 160 requests: +1 to +23 MiB). A leak that matters would
    # show: one request's KV cache is ~2.8 MB (30 layers x 2 x 192 x 4 B per token, ~60 tokens), x 75 answers.
    after = rss_mb()
    print(f"RSS {baseline:.0f} MiB after warm-up, {after:.0f} MiB after the load")
    assert after <= baseline + max(50, 0.1 * baseline), f"RSS grew from {baseline:.0f} to {after:.0f} MiB"


class SlowEngine:
    """Stands in for the engine: every batch takes SECONDS and answers one token per row."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run(self, requests):
        time.sleep(self.seconds)
        return [Completion("x", "length", len(r.prompt_ids), 1) for r in requests]


def test_retry_after_is_the_time_of_one_batch_rounded_up():
    """A refused client is told to wait about one batch (1.2 s -> 2), since each batch frees queue places; 1 s
    before any batch has been timed."""
    scheduler = Scheduler(SlowEngine(1.2), ServeLimits())
    assert scheduler.retry_after_s() == 1
    scheduler.start()
    loop = asyncio.new_event_loop()
    try:
        ticket = scheduler.submit([1, 2, 3], [SamplingParams()], loop, stream=False)
        (done,) = loop.run_until_complete(asyncio.wait_for(ticket.completions(), 30))
    finally:
        scheduler.stop()
        loop.close()
    assert done.finish_reason == "length"
    assert scheduler.retry_after_s() == 2
