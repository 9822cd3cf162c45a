"""`zephyr generate`: answers for a file of prompts or conversations, batched, resumable.

    zephyr generate --input prompts.jsonl --output answers.jsonl [--model outputs/dpo] [--batch-size 8]

Each input line is a JSON object with `prompt` (a string: one user turn) or `messages` (a conversation ending with a
user turn), and optionally `id` and `system`; other fields are carried to the output unchanged. Each output line is
the input row plus `answer`, `finish_reason`, `prompt_tokens`, `completion_tokens` and `model`. Rows are keyed by
`id` (rows without one get `line-N` as their output id): a rerun skips rows already in
the output file, so an interrupted job continues where it stopped, provided the same model and sampling settings
made them (`OUTPUT.run.json` records both; `--overwrite` starts over). Every row is checked before any generation starts; a bad one stops the run naming its line and field.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from zephyr.engine import Engine, RequestError, SamplingParams, check_messages
from zephyr.errors import DataError
from zephyr.jsonl_log import appending, read_records
from zephyr.provenance import check_or_start


def read_prompts(path: str | Path) -> list[tuple[str, int, dict, list[dict]]]:
    """(key, line number, row, messages) for every line of PATH; a DataError naming the line and field for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError("the input file does not exist", file=str(path))
    rows = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})", file=str(path)) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def bad(reason: str, field: str | None = None, n: int = number) -> DataError:
            return DataError(reason, file=str(path), row=n, field=field)

        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise bad(f"not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise bad("a line must be a JSON object with `prompt` or `messages`")
        if ("prompt" in row) == ("messages" in row):
            raise bad("give exactly one of `prompt` (a string) or `messages` (a list of {role, content})")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise bad("must be a non-empty string", "prompt")
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            try:
                messages = check_messages(row["messages"])
            except RequestError as err:
                raise bad(str(err), err.param) from None
            if messages[-1]["role"] != "user":
                raise bad("the conversation must end with a user turn to answer", "messages")
        if "system" in row:
            if not isinstance(row["system"], str):
                raise bad("must be a string", "system")
            messages = [{"role": "system", "content": row["system"]}, *messages]
        key = str(row["id"]) if "id" in row else f"line-{number}"
        if key in seen:
            raise bad(f"id {key!r} is also used on line {seen[key]}; ids must be unique", "id")
        seen[key] = number
        rows.append((key, number, row, messages))
    return rows


def generate_file(
    engine: Engine,
    input_path: str,
    output_path: str,
    params: SamplingParams,
    *,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, int]:
    """Answer every row of INPUT_PATH not yet in OUTPUT_PATH; returns counts of rows done now and skipped.

    Rows already in OUTPUT_PATH are kept only when `OUTPUT_PATH.run.json` says the same model (its files, not just
    its name) and sampling settings made them; otherwise the run refuses, unless OVERWRITE starts it over."""
    from tqdm.auto import tqdm

    rows = read_prompts(input_path)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = output.with_name(output.name + ".run.json")
    if overwrite:
        output.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    made_by = {"model": engine.identity, "settings": asdict(params)}
    check_or_start(
        record, made_by, output=str(output), has_output=output.is_file() and output.stat().st_size > 0,
        overwrite_flag="--overwrite",
    )  # fmt: skip
    done_before = {str(r["id"]) for r in read_records(output, key="id", written_by="zephyr generate")}
    todo = [r for r in rows if r[0] not in done_before]

    def refuse(i: int, turn: int, err: RequestError) -> None:
        raise DataError(str(err), file=input_path, row=todo[i][1], field="messages") from None

    # Every prompt is encoded here, so one that does not fit stops the run before any is answered.
    batches = engine.generate_batches(
        [messages for *_, messages in todo], params, batch_size=batch_size, on_bad_prompt=refuse
    )
    bar = tqdm(
        total=len(rows), initial=len(rows) - len(todo), desc="generating", unit="row", disable=not progress
    )
    with appending(output) as append:
        for batch in batches:
            records = []
            for i, (done,) in zip(batch.indices, batch.answers, strict=True):
                key, _, row, _ = todo[i]
                record = {
                    "id": key if "id" not in row else row["id"],
                    **row,
                    "answer": done.text,
                    "finish_reason": done.finish_reason,
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "model": engine.name,
                }
                records.append(record)
            append(records)
            bar.update(len(records))
    bar.close()
    return {"generated": len(todo), "skipped": len(rows) - len(todo), "total": len(rows)}
