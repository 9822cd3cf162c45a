"""Append-only JSONL outputs that a rerun resumes: `zephyr generate`'s answers, MT-Bench's answers and judgments.

    done = read_records(path, key="id", written_by="zephyr generate")  # what an earlier run finished
    with appending(path) as append:
        append(batch_records)                                           # durable when it returns

A record is one line, written whole with its newline, so only the last line can be cut short by a crash; reading
drops that line (the caller redoes its work) and cuts it from the file so the next append starts a fresh line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from zephyr.errors import DataError


def read_records(path: Path, *, key: str, written_by: str, log: Callable[[str], None] = print) -> list[dict]:
    """The records of PATH, in file order; [] when it does not exist.

    A half-written last line is dropped with a warning to LOG and cut from the file; a last line that is whole JSON
    but lost its newline is kept, and the newline written. A broken line anywhere else, or a record that is not an
    object with KEY, is a DataError naming the row: that file was edited (or is not WRITTEN_BY's), and guessing
    could lose work.
    """
    if not path.is_file():
        return []
    raw = path.read_bytes()
    # Split on b"\n" only: answers may hold U+2028 and other characters that str.splitlines() breaks lines at.
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            rows.append((number, _parse(line, path, number)))
    if tail.strip():
        try:
            rows.append((len(lines) + 1, json.loads(tail)))
            with open(path, "ab") as f:
                f.write(b"\n")
        except ValueError:
            log(
                f"warning: {path}, row {len(lines) + 1}: ignoring a half-written last line (an interrupted run); "
                f"it will be redone"
            )
            with open(path, "r+b") as f:
                f.truncate(len(raw) - len(tail))
    for number, record in rows:
        if not isinstance(record, dict) or key not in record:
            raise DataError(f"not a record written by {written_by}", file=str(path), row=number)
    return [record for _, record in rows]


def _parse(line: bytes, path: Path, number: int):
    try:
        return json.loads(line)
    except ValueError as err:
        raise DataError(f"not valid JSON ({err}); fix or delete the line, then run again", file=str(path),
                        row=number) from err  # fmt: skip


@contextmanager
def appending(path: Path) -> Iterator[Callable[[Iterable[dict]], None]]:
    """`append(records)`: RECORDS written to the end of PATH a JSON line each, and on disk when it returns."""
    with open(path, "a", encoding="utf-8") as out:

        def append(records: Iterable[dict]) -> None:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a finished batch survives a crash of the next one

        yield append
