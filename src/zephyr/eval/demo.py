"""`zephyr eval demo`: how often a model follows the held-out demo instructions, checked by program.

    zephyr eval demo --model outputs/demo/dpo [--data data/demo] [--limit 48]

The bundled demo data's prompts carry instructions a program can check (`zephyr.data.demo.check`: arithmetic,
word counts, list lengths, JSON keys, ...), so a model's pass rate on the held-out ones is measured without an LLM
judge. Greedy decoding, so the number is reproducible; `zephyr demo` reports it before and after each stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from zephyr.errors import ZephyrError


def checkable_prompts(data_dir: str | Path, limit: int) -> list[str]:
    """The first LIMIT checkable prompts of the demo data's held-out preference split."""
    from zephyr.data.demo import is_checkable

    file = Path(data_dir) / "ultrafeedback" / "test_prefs.jsonl"
    if not file.is_file():
        raise ZephyrError(
            f"{file} does not exist; write the demo data first with `zephyr data demo --output {data_dir}`"
        )
    prompts = []
    with open(file) as f:
        for line in f:
            prompt = json.loads(line)["instruction"]
            if is_checkable(prompt):
                prompts.append(prompt)
            if len(prompts) >= limit:
                break
    return prompts


def pass_rate(engine, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 16) -> float:
    """Share of PROMPTS whose greedy answer from ENGINE (a `zephyr.engine.Engine`) passes the checker."""
    from zephyr.data.demo import check
    from zephyr.engine import Request

    params = engine.sampling(temperature=0.0, max_new_tokens=max_new_tokens, stop=())
    passed = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        requests = [Request(engine.encode_chat([{"role": "user", "content": p}]), params) for p in chunk]
        for prompt, done in zip(chunk, engine.run(requests), strict=True):
            passed += check(prompt, done.text)
    return passed / max(len(prompts), 1)


def eval_demo(model: str | None, *, data_dir: str = "data/demo", limit: int = 48) -> dict:
    """Pass rate of MODEL (None: the embedded model) on the demo's held-out checkable prompts."""
    from zephyr.engine import Engine

    prompts = checkable_prompts(data_dir, limit)
    if not prompts:
        raise ZephyrError(
            f"{data_dir} has no checkable held-out prompts; regenerate it with `zephyr data demo`"
        )
    rate = pass_rate(Engine.load(model), prompts)
    return {"pass_rate": rate, "prompts": len(prompts), "passed": round(rate * len(prompts))}
