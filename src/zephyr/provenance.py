"""Resumable outputs keyed by what made them.

`zephyr generate` and `zephyr eval mt-bench` append to their output and skip what is already there, so an interrupted
job continues. That is only right when the rows already there came from the same model (the same weights, not just
the same path) and the same generation settings. Beside each output a small JSON record names both; a rerun
resumes only when they match, and otherwise refuses, saying what changed and which flag starts over.
"""

from __future__ import annotations

import json
from pathlib import Path

from zephyr.errors import ZephyrError


def check_or_start(
    record: Path, made_by: dict, *, output: str, has_output: bool, overwrite_flag: str
) -> None:
    """Resume OUTPUT only if RECORD says MADE_BY made it; write RECORD for a fresh start.

    MADE_BY: {"model": model identity, "settings": what else changes the rows}. A caller that was asked to start
    over removes its output (and RECORD) before calling."""
    made_by = json.loads(json.dumps(made_by, sort_keys=True, default=str))
    if has_output:
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            raise ZephyrError(
                f"{output} holds earlier results but no record of the model and settings that made them ({record}); "
                f"pass {overwrite_flag} to start it again, or choose another output"
            ) from None
        if before != made_by:
            changed = "; ".join(_differences(before, made_by))
            raise ZephyrError(
                f"{output} was made by another model or other settings ({changed}); resuming would mix the two. "
                f"Pass {overwrite_flag} to start it again, or choose another output"
            )
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made_by, indent=1, sort_keys=True))


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a, default=str)} then, {json.dumps(b, default=str)} now")
    return out
