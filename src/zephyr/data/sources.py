"""Where rows come from: local JSON / JSONL / Parquet files and folders, or the Hugging Face hub by id.

Every source yields `Record`s, one per row, located by origin (a file path, or `HUB_ID[split]`) and 1-based row
(the JSONL line number; the record index + 1 for JSON arrays, Parquet and hub datasets). A row that cannot be read
(invalid UTF-8, malformed or truncated line, not a JSON object, an escaped lone surrogate) is a `Record` with `error`
set, so the caller can refuse it or, under `--skip-invalid`, set it aside; it is never a raw traceback.

Local folders map files to splits by name: `train_prefs.jsonl` is split `train_prefs`, shards
`train-00000-of-00002.parquet` are split `train`, and a hub snapshot's `data/train_prefs-00000-of-00001.parquet`
is split `train_prefs`. A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` is read as such.
A single file is split `train`, but a caller that names another split for it gets the file (it was told so).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from zephyr.errors import DataError
from zephyr.models import hub_reachable

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

# Suffixes that make a missing source read as a mistyped local path rather than a hub id.
_FILE_LIKE_SUFFIXES = {*DATA_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+.*$")
_LOCAL_HINT = "pass a local .jsonl/.json/.parquet file or folder"
# JSON can escape half of a UTF-16 surrogate pair ("\ud800") on its own. It decodes to a code point that is not text
# and that every UTF-8 writer downstream (Arrow, a JSONL output, a hash) refuses, so such a row is unreadable. Only
# text holding such an escape needs the row walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Record(NamedTuple):
    """One row of a source: exactly one of `data` (the row) and `error` (why it cannot be read) is set."""

    origin: str
    row: int
    data: dict | None
    error: DataError | None


def list_splits(source: str, *, config: str | None = None) -> list[str]:
    """The split names SOURCE offers, sorted (a single file offers `train`)."""
    path = _local_path(source, config)
    if path is None:
        return _hub_split_names(source, config)
    if path.is_file():
        return ["train"]
    saved = _saved_splits(path)
    if saved is not None:
        return sorted(saved)
    return sorted(_split_files(path))


def iter_records(source: str, *, split: str | None = None, config: str | None = None) -> Iterator[Record]:
    """Yield SOURCE's rows of SPLIT (default `train`) in file order; see the module docstring for the layouts."""
    path = _local_path(source, config)
    split_name = split or "train"
    if path is None:
        yield from _hub_records(source, split_name, config)
    elif path.is_file():
        yield from _file_records(path)
    else:
        saved = _saved_splits(path)
        if saved is not None:
            if split_name not in saved:
                raise _no_split(str(path), split_name, sorted(saved))
            yield from _dataset_records(saved[split_name], f"{path}[{split_name}]")
            return
        files = _split_files(path)
        if split_name not in files:
            raise _no_split(str(path), split_name, sorted(files))
        for file in files[split_name]:
            yield from _file_records(file)


def _no_split(origin: str, split: str, available: list[str]) -> DataError:
    return DataError(
        f"there is no split '{split}'; the splits found are: {', '.join(available) or 'none'} "
        "(files map to splits by name, e.g. train_prefs.jsonl is split 'train_prefs')",
        file=origin,
    )


# ---------------------------------------------------------------- local paths


def _local_path(source: str, config: str | None) -> Path | None:
    """The local file or folder SOURCE names, or None when it is a hub id. A missing local path is an error."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"unsupported file type '{path.suffix}'; {_LOCAL_HINT}", file=source)
        if config is not None and path.is_dir() and (path / config).is_dir():
            # A hub snapshot keeps each config in its own folder.
            return path / config
        if config not in (None, "default"):
            raise DataError(f"local data has no config '{config}' (no folder {path / config})", file=source)
        return path
    looks_local = source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_LIKE_SUFFIXES
    if looks_local or not _HUB_ID.match(source):
        raise DataError("no such file or folder; check the path", file=source)
    return None


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """Data files under FOLDER grouped by split name (hidden folders such as .cache are skipped)."""
    files: dict[str, list[Path]] = {}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.suffix.lower() not in DATA_SUFFIXES or any(p.startswith(".") for p in relative.parts):
            continue
        if file.is_file():
            files.setdefault(_SHARD_SUFFIX.sub("", file.stem), []).append(file)
    if not files:
        raise DataError(f"no {', '.join(DATA_SUFFIXES)} files in this folder", file=str(folder))
    return files


def _saved_splits(folder: Path) -> dict[str, Any] | None:
    """The splits of a folder written by `save_to_disk`, or None for a plain folder of files."""
    if not ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
        return None
    import datasets

    saved = datasets.load_from_disk(str(folder))
    return dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}


def _file_records(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
    elif suffix == ".json" and _first_byte(path) == b"[":
        yield from _json_array_records(path)
    else:
        yield from _jsonl_records(path, is_json=suffix == ".json")


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1]


def _jsonl_records(path: Path, *, is_json: bool = False) -> Iterator[Record]:
    origin = str(path)
    hint = " (a .json file holds a JSON array of objects or one object per line)" if is_json else ""
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                # utf-8-sig on line 1 drops a byte-order mark, which is encoding, not data.
                text = raw.rstrip(b"\r\n").decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                reason = f"invalid UTF-8 at byte {e.start + 1} of the line; re-save the file as UTF-8"
                yield Record(origin, line_number, None, DataError(reason, file=origin, row=line_number))
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n"):
                    reason = f"the last line is cut off ({e.msg}); the file looks truncated, re-create or re-download it"
                else:
                    reason = f"malformed JSON ({e.msg} at column {e.colno}){hint}"
                yield Record(origin, line_number, None, DataError(reason, file=origin, row=line_number))
                continue
            except (ValueError, RecursionError) as e:
                reason = f"malformed JSON ({_beyond_the_parser(e)})"
                yield Record(origin, line_number, None, DataError(reason, file=origin, row=line_number))
                continue
            escaped = _SURROGATE_ESCAPE.search(text) is not None
            yield _object_record(origin, line_number, data, hint, may_hold_surrogates=escaped)


def _json_array_records(path: Path) -> Iterator[Record]:
    """A .json file holding one array of row objects: parsed whole, so a syntax error refuses the whole file."""
    origin = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 on line {line}; re-save the file as UTF-8", file=origin) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        cut_off = e.pos >= len(text.rstrip())
        why = "the file ends before the array is closed; it looks truncated" if cut_off else e.msg
        raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {why}", file=origin) from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"malformed JSON ({_beyond_the_parser(e)})", file=origin) from None
    escaped = _SURROGATE_ESCAPE.search(text) is not None
    for index, data in enumerate(rows):
        yield _object_record(origin, index + 1, data, "", may_hold_surrogates=escaped)


def _beyond_the_parser(error: ValueError | RecursionError) -> str:
    """Why `json.loads` gave up on text that is not a syntax error: nesting deeper than Python recurses, or an
    integer longer than Python converts (its only ValueError that is not a JSONDecodeError)."""
    if isinstance(error, RecursionError):
        return "arrays or objects nested too deeply to read"
    return f"an integer longer than {sys.get_int_max_str_digits()} digits"


def _object_record(
    origin: str, row: int, data: Any, hint: str, *, may_hold_surrogates: bool = False
) -> Record:
    if isinstance(data, dict):
        field = _lone_surrogate_field(data) if may_hold_surrogates else None
        if field is None:
            return Record(origin, row, data, None)
        reason = (
            "holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not text; "
            "fix the string or re-export the file"
        )
        return Record(origin, row, None, DataError(reason, file=origin, row=row, field=field or None))
    reason = f"expected a JSON object (a row with named fields), got {_json_type(data)}{hint}"
    return Record(origin, row, None, DataError(reason, file=origin, row=row))


def _lone_surrogate_field(data: dict) -> str | None:
    """The path (`messages[1].content`) of a string in DATA holding a lone surrogate; "" when it is in a key of
    DATA itself; None when there is none. A loop, so that a row nested as deep as the parser allows cannot overflow
    the stack here."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if _LONE_SURROGATE.search(key):
                    return path  # a key that cannot be printed is named by the object holding it
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    origin = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", file=origin) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            row += 1
            yield Record(origin, row, data, None)


def _dataset_records(dataset: Any, origin: str) -> Iterator[Record]:
    for index, data in enumerate(dataset):
        yield Record(origin, index + 1, data, None)


# ---------------------------------------------------------------- hub


@contextlib.contextmanager
def _offline_unless_reachable(source: str):
    """Without a network, `datasets` retries for tens of seconds before failing. When the hub cannot be reached,
    go offline at once: a dataset already in the local `datasets` cache still loads, anything else fails fast."""
    import datasets
    from huggingface_hub import constants

    if Path(source).exists() or hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_records(source: str, split: str, config: str | None) -> Iterator[Record]:
    import datasets

    try:
        with _offline_unless_reachable(source):
            dataset = datasets.load_dataset(source, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise _hub_error(source, e) from None
    origin = f"{source}[{split}]" if config is None else f"{source}[{config}/{split}]"
    yield from _dataset_records(dataset, origin)


def _hub_split_names(source: str, config: str | None) -> list[str]:
    import datasets

    try:
        with _offline_unless_reachable(source):
            return sorted(datasets.get_dataset_split_names(source, config))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise _hub_error(source, e) from None


def _hub_error(source: str, error: Exception) -> DataError:
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(error, ConnectionError):
        reason = f"could not load dataset {source} from the Hugging Face hub (no network?); {_LOCAL_HINT}"
    elif isinstance(error, DatasetNotFoundError):
        reason = f"dataset {source} was not found on the Hugging Face hub (or it is gated); {_LOCAL_HINT}"
    else:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = f"could not load dataset {source} from the Hugging Face hub ({detail}); {_LOCAL_HINT}"
    return DataError(reason)
