"""`zephyr eval demo`: how often a model follows the held-out demo instructions, checked by program.

    zephyr eval demo --model outputs/demo/dpo [--data data/demo] [--limit 48]

The bundled demo data's prompts carry instructions a program can check (`zephyr.data.demo.check`: arithmetic,
word counts, list lengths, JSON keys, ...), so a model's pass rate on the held-out ones is measured without an LLM
judge. Greedy decoding, so the number is reproducible; `zephyr demo` reports it before and after each stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from zephyr.data.demo_tasks import check, is_checkable
from zephyr.engine import Engine
from zephyr.errors import ZephyrError


def checkable_prompts(data_dir: str | Path, limit: int) -> list[str]:
    """The first LIMIT checkable prompts of the demo data's held-out preference split."""
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


def pass_rate(engine: Engine, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 16) -> float:
    """Share of PROMPTS whose greedy answer from ENGINE passes the checker."""
    params = engine.sampling(temperature=0.0, max_new_tokens=max_new_tokens, stop=())
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    passed = 0
    for batch in engine.generate_batches(conversations, params, batch_size=batch_size):
        for i, (done,) in zip(batch.indices, batch.answers, strict=True):
            passed += check(prompts[i], done.text)
    return passed / max(len(prompts), 1)


def eval_demo(model: str | None, *, data_dir: str = "data/demo", limit: int = 48) -> dict:
    """Pass rate of MODEL (None: the embedded model) on the demo's held-out checkable prompts."""
    prompts = checkable_prompts(data_dir, limit)
    if not prompts:
        raise ZephyrError(
            f"{data_dir} has no checkable held-out prompts; regenerate it with `zephyr data demo`"
        )
    rate = pass_rate(Engine.load(model), prompts)
    return {"pass_rate": rate, "prompts": len(prompts), "passed": round(rate * len(prompts))}
