"""The bounds a `zephyr serve` server keeps every request within, one `--flag` each."""

from __future__ import annotations

from dataclasses import dataclass, fields

from zephyr.errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """How much one request may ask for and how much work the server queues.

    max_body_bytes: largest request body read (413 beyond it).
    max_tokens: largest max_tokens / max_completion_tokens a request may ask for (the engine also never decodes
        past the model's context).
    max_n: most choices per request.
    max_messages: most messages per request.
    queue_size: generations waiting for the worker; a request that does not fit gets 503 with Retry-After.
    max_batch_size: most generations decoded together in one engine batch.
    batch_wait_ms: how long the worker waits for more requests to join a batch once one has arrived.
    """

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_n: int = 8
    max_messages: int = 256
    queue_size: int = 64
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "batch_wait_ms":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10_000:
                    raise ConfigError(f"{flag} is {value!r}; use a number of milliseconds from 0 to 10000")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} is {value!r}; use a whole number >= 1")
        if self.queue_size < self.max_n:
            raise ConfigError(
                f"--queue-size ({self.queue_size}) is smaller than --max-n ({self.max_n}), so a request with "
                f"n={self.max_n} could never be queued; raise --queue-size or lower --max-n"
            )
