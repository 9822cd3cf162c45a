"""The batching worker: one thread owns the engine and decodes waiting requests together.

    scheduler = Scheduler(engine, limits); scheduler.start()
    ticket = scheduler.submit(prompt_ids, [params] * n, loop, stream=True)   # Overloaded when the queue is full
    index, kind, payload = await ticket.events.get()   # ("text", piece) ... ("done", Completion) per choice
    ticket.cancel()                                    # the client went away: its rows stop at the next step

The worker takes the first waiting generation, waits up to `batch_wait_ms` for more to arrive, and runs up to
`max_batch_size` of them as one `engine.run` batch, so concurrent clients share the forward passes. Results cross
from the worker thread into the server's event loop with `loop.call_soon_threadsafe`, the one thread-safe way in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from zephyr.engine import Completion, Engine, Request, SamplingParams
from zephyr.serve.limits import ServeLimits

log = logging.getLogger("zephyr.serve")


class Overloaded(Exception):
    """The queue has no room for the request's generations."""


class GenerationFailed(Exception):
    """The engine raised while decoding a batch; the message is safe to show the client."""


class Ticket:
    """One HTTP request's n generations. Events (choice index, kind, payload) arrive on `events`:
    ("text", str) pieces while streaming, then ("done", Completion) or ("error", message) once per choice."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, *, stream: bool):
        self.loop = loop
        self.n = n
        self.stream = stream
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, index: int, kind: str, payload) -> None:
        """Hand an event to the event loop; callable from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))
        except RuntimeError:  # the loop is closed: the server stopped and nobody is listening
            pass

    async def completions(self) -> list[Completion]:
        """Wait for all n choices, in choice order; GenerationFailed if the engine failed."""
        done: list[Completion | None] = [None] * self.n
        for _ in range(self.n):
            index, kind, payload = await self.events.get()
            while kind == "text":  # not expected when not streaming, but harmless
                index, kind, payload = await self.events.get()
            if kind == "error":
                raise GenerationFailed(payload)
            done[index] = payload
        return done


@dataclass
class _Job:
    ticket: Ticket
    index: int
    prompt_ids: list[int]
    params: SamplingParams

    def engine_request(self) -> Request:
        ticket, index = self.ticket, self.index
        on_text = (lambda piece: ticket.post(index, "text", piece)) if ticket.stream else None
        return Request(self.prompt_ids, self.params, on_text=on_text, cancelled=lambda: ticket.cancelled)


class Scheduler:
    """A bounded queue of generations and the worker thread that decodes them in batches.

    batch_sizes counts engine batches by size and finish_reasons counts finished generations by reason, for
    /health and for tests that check concurrent requests were batched and disconnected ones cancelled.
    batch_seconds is a moving average of how long one engine batch takes (0 before the first).
    """

    def __init__(self, engine: Engine, limits: ServeLimits):
        self.engine = engine
        self.queue_size = limits.queue_size
        self.max_batch_size = limits.max_batch_size
        self.batch_wait_s = limits.batch_wait_ms / 1000
        self.batch_sizes: Counter[int] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.batch_seconds = 0.0
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ the server side

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="zephyr-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: waiting generations fail, running ones are cancelled at their next step."""
        with self._wakeup:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in self._running:
                job.ticket.cancel()
            self._wakeup.notify_all()
        for job in waiting:
            job.ticket.post(job.index, "error", "the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(
        self,
        prompt_ids: list[int],
        params: Sequence[SamplingParams],
        loop: asyncio.AbstractEventLoop,
        *,
        stream: bool,
    ) -> Ticket:
        """Queue one generation per PARAMS entry (the n choices), all or none; Overloaded when they do not fit."""
        ticket = Ticket(loop, len(params), stream=stream)
        jobs = [_Job(ticket, i, prompt_ids, p) for i, p in enumerate(params)]
        with self._wakeup:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.queue_size:
                raise Overloaded(f"{len(self._waiting)} generations are already waiting")
            self._waiting.extend(jobs)
            self._wakeup.notify()
        return ticket

    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait: about one batch's time, since the queue gains up to
        max_batch_size places each time the worker starts a batch; from 1 to 60."""
        return min(60, max(1, math.ceil(self.batch_seconds)))

    @property
    def queue_depth(self) -> int:
        """Generations waiting for the worker."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Generations in the engine's current batch."""
        return len(self._running)

    # ------------------------------------------------------------------------------------------ the worker side

    def _work(self) -> None:
        # One batch per call: its requests (tickets, prompts, answers) die with that call's locals, instead of
        # staying alive in this loop's variables while the worker waits, idle, for the next batch.
        while self._serve_next_batch():
            pass

    def _serve_next_batch(self) -> bool:
        """Decode the next batch; False once the scheduler is stopping."""
        batch = self._next_batch()
        if batch is None:
            return False
        live = []
        for job in batch:
            if job.ticket.cancelled:  # the client left while it waited: no need to decode anything
                self._finish(job, Completion("", "cancelled", len(job.prompt_ids), 0))
            else:
                live.append(job)
        if live:
            self._run(live)
        else:
            with self._wakeup:
                self._running = []
        return True

    def _next_batch(self) -> list[_Job] | None:
        """Up to max_batch_size waiting jobs, once at least one has waited batch_wait_s; None when stopping."""
        with self._wakeup:
            while not self._waiting and not self._stopping:
                self._wakeup.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while not self._stopping and len(self._waiting) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.wait(left)
            if self._stopping:
                return None
            take = min(self.max_batch_size, len(self._waiting))
            batch = [self._waiting.popleft() for _ in range(take)]
            self._running = batch
            return batch

    def _run(self, jobs: list[_Job]) -> None:
        self.batch_sizes[len(jobs)] += 1
        started = time.monotonic()
        try:
            completions = self.engine.run([job.engine_request() for job in jobs])
        except Exception as err:  # a bug or an out-of-memory: fail this batch, keep serving
            log.error("generation failed for a batch of %d: %s: %s", len(jobs), type(err).__name__, err)
            for job in jobs:
                job.ticket.post(job.index, "error", f"generation failed: {type(err).__name__}")
            return
        finally:
            with self._wakeup:
                self._running = []
        took = time.monotonic() - started
        self.batch_seconds = took if not self.batch_seconds else 0.7 * self.batch_seconds + 0.3 * took
        for job, completion in zip(jobs, completions, strict=True):
            self._finish(job, completion)

    def _finish(self, job: _Job, completion: Completion) -> None:
        self.finish_reasons[completion.finish_reason] += 1
        job.ticket.post(job.index, "done", completion)
