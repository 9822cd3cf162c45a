"""Raw UltraFeedback -> preference pairs in the `HuggingFaceH4/ultrafeedback_binarized` schema.

    zephyr data binarize openbmb/UltraFeedback --output data/uf_binarized.jsonl [--seed 42] [--score overall|mean]

The published rule (HuggingFaceH4/ultrafeedback_binarized, `create_dataset.py`; docs/data.md has the history):
chosen is the completion with the highest `overall_score`, the first one on ties (Python's `max`); rejected is drawn
at random from the others with one `random.Random(seed)` advanced row by row in input order; a rejected candidate
may score as high as the chosen one (the published data keeps such ties); rows with fewer than two completions are
skipped and reported. `--score mean` ranks by the mean of the four aspect ratings instead, leaving "N/A" ratings
out of the mean. Output rows, one JSON object per line:

    {"prompt": str, "prompt_id": sha256(prompt) hex,
     "chosen":   [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen response}],
     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected response}],
     "messages": same as chosen, "score_chosen": float, "score_rejected": float}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zephyr.data.rejects import Rejects
from zephyr.data.sources import Record, iter_records
from zephyr.errors import ConfigError, DataError

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
SCORE_RULES = ("overall", "mean")


class TooFewCompletions(DataError):
    """A row with fewer than two distinct completions: no pair can be made. Always skipped and reported, never fatal,
    as the published script does."""


# ---------------------------------------------------------------------------------------------- one row


def binarize_row(row: dict, rng: random.Random, score: str = "overall") -> dict:
    """One raw UltraFeedback row -> one ultrafeedback_binarized row (schema in the module docstring).

    Draws once from `rng` per pair made. Raises `TooFewCompletions` for rows with fewer than two completions (or
    whose other completions all repeat the chosen response word for word), and `DataError(reason, field=...)`
    without file or row for anything else unusable; the caller locates it.
    """
    if score not in SCORE_RULES:
        raise ConfigError(f"unknown score rule {score!r}; use one of {', '.join(SCORE_RULES)}")
    if not isinstance(row, dict):
        raise DataError("row is not a JSON object")
    prompt = row.get("instruction")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("missing or empty instruction", field="instruction")
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise DataError("'completions' is not a list", field="completions")
    if len(completions) < 2:
        raise TooFewCompletions("fewer than two completions", field="completions")

    scores = [completion_score(c, i, score) for i, c in enumerate(completions)]
    responses = [_response(c, i) for i, c in enumerate(completions)]
    best = max(range(len(scores)), key=scores.__getitem__)  # max keeps the first of equal scores
    # A candidate repeating the chosen text word for word would make a pair with nothing to learn from; the published
    # script only avoids picking the chosen completion itself.
    candidates = [i for i in range(len(scores)) if i != best and responses[i] != responses[best]]
    if not candidates:
        raise TooFewCompletions("every other completion repeats the chosen response", field="completions")
    worse = rng.choice(candidates)

    chosen = _conversation(prompt, responses[best])
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "chosen": chosen,
        "rejected": _conversation(prompt, responses[worse]),
        "messages": [dict(m) for m in chosen],
        "score_chosen": scores[best],
        "score_rejected": scores[worse],
    }


def completion_score(completion: Any, index: int, score: str = "overall") -> float:
    """The number completions are ranked by: `overall_score`, or the mean of the aspect ratings that are numbers.

    With `score="mean"`, an aspect whose Rating is "N/A" (or that is absent) is left out of the mean, as OpenBMB's own
    `fine-grained_score` does; a completion with no numeric rating at all cannot be ranked and is an error.
    """
    where = f"completions[{index}]"
    if not isinstance(completion, dict):
        raise DataError("completion is not a JSON object", field=where)
    if score == "overall":
        if "overall_score" not in completion:
            raise DataError("completion has no overall_score", field=f"{where}.overall_score")
        value = _number(completion["overall_score"])
        if value is None:
            raise DataError("overall_score is not a number", field=f"{where}.overall_score")
        return value

    annotations = completion.get("annotations")
    if not isinstance(annotations, dict):
        raise DataError("completion has no annotations", field=f"{where}.annotations")
    ratings = []
    for aspect in ASPECTS:
        aspect_annotation = annotations.get(aspect)
        rating = aspect_annotation.get("Rating", "N/A") if isinstance(aspect_annotation, dict) else "N/A"
        if isinstance(rating, str) and rating.strip().upper() == "N/A":
            continue
        value = _number(rating)
        if value is None:
            raise DataError(
                "aspect rating is neither a number nor N/A", field=f"{where}.annotations.{aspect}.Rating"
            )
        ratings.append(value)
    if not ratings:
        raise DataError("completion has no numeric aspect rating (all N/A)", field=f"{where}.annotations")
    return sum(ratings) / len(ratings)


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or a numeric string ("4", "7.5"); None otherwise (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range: JSON puts no limit on digits
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _response(completion: dict, index: int) -> str:
    response = completion.get("response")
    if not isinstance(response, str) or not response.strip():
        raise DataError("missing or empty response", field=f"completions[{index}].response")
    return response


def _conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ---------------------------------------------------------------------------------------------- a file


@dataclass
class BinarizeReport:
    """What `binarize_file` did. `skipped` maps each reason to the 1-based row numbers it refused."""

    source: str
    output: Path
    score: str
    seed: int
    read: int = 0
    written: int = 0
    ties: int = 0  # written pairs whose rejected scores as high as the chosen (kept, as published)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    rejects_path: Path | None = None

    def summary(self) -> str:
        lines = [
            f"read {self.read} rows from {self.source}; wrote {self.written} pairs to {self.output} "
            f"(score={self.score}, seed={self.seed})",
            f"  pairs with score_chosen == score_rejected: {self.ties} (kept, as in the published data)",
        ]
        for reason, rows in sorted(self.skipped.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            lines.append(f"  skipped {len(rows)}: {reason} (rows {shown})")
        if self.rejects_path is not None:
            lines.append(f"  skipped rows are listed in {self.rejects_path}")
        return "\n".join(lines)


def binarize_file(
    source: str,
    output: str | Path,
    *,
    seed: int = 42,
    score: str = "overall",
    split: str | None = None,
    skip_invalid: bool = False,
) -> BinarizeReport:
    """Binarize every row of SOURCE (a file, folder or hub id read by `iter_records`) into OUTPUT (JSONL).

    Rows with fewer than two completions are always skipped and reported. Any other unusable row stops the run with a
    `DataError` naming file, row and field, unless `skip_invalid`, which skips and reports it instead. Skipped rows are
    written to OUTPUT.rejects.jsonl. OUTPUT is replaced atomically, and only when the whole source went through.
    """
    if score not in SCORE_RULES:
        raise ConfigError(f"unknown score rule {score!r}; use one of {', '.join(SCORE_RULES)}")
    output = Path(output)
    report = BinarizeReport(source=str(source), output=output, score=score, seed=seed)
    rejects = Rejects(skip_invalid=True)
    rng = random.Random(seed)

    def pairs() -> Iterator[dict]:
        for record in iter_records(source, split=split):
            report.read += 1
            try:
                if record.error is not None:
                    raise record.error
                pair = binarize_row(record.data, rng, score)
            except TooFewCompletions as err:
                rejects.add(err.at(file=record.origin, row=record.row), record.data)
                continue
            except DataError as err:
                reject_or_raise(err, record, rejects, skip_invalid=skip_invalid, output=output)
                continue
            report.ties += pair["score_chosen"] == pair["score_rejected"]
            yield pair
        if report.read == 0:  # raised inside the writer, so an existing OUTPUT is left alone
            raise DataError("no rows to binarize; check the path, split or dataset id", file=str(source))

    report.written = write_jsonl_atomic(output, pairs())
    for r in rejects.rows:
        report.skipped.setdefault(r["reason"], []).append(r["row"])
    report.rejects_path = write_rejects(rejects, output)
    return report


# ---------------------------------------------------------------------------------------------- shared by the converters
# (zephyr.data.ultrachat uses these too)


def reject_or_raise(
    err: DataError, record: Record, rejects: Rejects, *, skip_invalid: bool, output: Path
) -> None:
    """Locate ERR at RECORD; keep it in REJECTS when `skip_invalid`, else raise it, saying what to do."""
    err = err.at(file=record.origin, row=record.row)
    if not skip_invalid:
        raise DataError(
            f"{err.reason}; fix the row, or pass --skip-invalid to skip such rows and list them in "
            f"{rejects_path_for(output)}",
            file=err.file,
            row=err.row,
            field=err.field,
        ) from None
    rejects.add(err, record.data)


def rejects_path_for(output: str | Path) -> Path:
    """OUT.jsonl -> OUT.rejects.jsonl, next to the output."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")


def write_rejects(rejects: Rejects, output: Path) -> Path | None:
    """Write the refused rows next to OUTPUT; return the path, or None (removing a stale list) when there are none."""
    path = rejects_path_for(output)
    if len(rejects):
        return rejects.write(path)
    path.unlink(missing_ok=True)  # a list left by an earlier run would describe rows this run kept
    return None


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ROWS as JSON lines to a temporary file beside PATH, then rename it over PATH; return the row count.

    If ROWS raises part way, PATH is left as it was and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open() rather than mkstemp so the file gets the usual permissions (mkstemp makes it private to the owner)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
