"""Where invalid rows go when the user asks to skip them (`--skip-invalid`), so that nothing is dropped silently."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from zephyr.errors import DataError


class Rejects:
    """Collects rows refused by validation: raises at once unless `skip_invalid`, else keeps them for a report.

    `write(path)` saves one JSON line per refused row: `{"file", "row", "field", "reason", "data"}`.
    """

    def __init__(self, skip_invalid: bool = False):
        self.skip_invalid = skip_invalid
        self.rows: list[dict[str, Any]] = []

    def add(self, error: DataError, data: Any = None) -> None:
        if not self.skip_invalid:
            raise error
        self.rows.append(
            {
                "file": error.file,
                "row": error.row,
                "field": error.field,
                "reason": error.reason,
                "data": _jsonable(data),
            }
        )

    def __len__(self) -> int:
        return len(self.rows)

    def reasons(self) -> Counter:
        return Counter(r["reason"] for r in self.rows)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return repr(data)
