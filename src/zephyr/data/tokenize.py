"""Tokenization of SFT conversations and DPO preference pairs, cached on disk.

Preference rows follow TRL 1.16's `DPOTrainer._prepare_dataset` token for token, so that our losses can be checked
against TRL's:

    prompt_ids          = chat(prompt, add_generation_prompt=True)
    prompt_chosen_ids   = chat(prompt + chosen)            # one conversation, rendered and tokenized whole
    prompt_rejected_ids = chat(prompt + rejected)
    prompt_len          = longest common prefix of prompt_ids with both of the above
    row = {prompt_input_ids: prompt_ids[:prompt_len],
           chosen_input_ids: prompt_chosen_ids[prompt_len:], rejected_input_ids: prompt_rejected_ids[prompt_len:]}

`chat` tokenizes the rendered text without adding special tokens (a BOS appears only if the template writes one);
the completion ends with the end-of-turn token the template writes. The common prefix, not `len(prompt_ids)`, marks
the split because a template may render a prompt differently when a reply follows, or tokens may merge across the
boundary.

Truncation, preference rows:
    max_prompt_length      keeps the prompt's last tokens (the alignment handbook's recipes; TRL 1.16 dropped it)
    max_completion_length  keeps each completion's first tokens (likewise)
    max_length             cuts prompt + completion per sequence at collation, as TRL's `DataCollatorForPreference`
                           does: `preference_sequence` below. With `keep_start` a prompt of `max_length` tokens or more
                           would leave no completion: TRL drops such rows silently; we report them (field `prompt`).
Truncation, SFT rows: `max_length` keeps the first tokens (TRL's `keep_start`); a conversation whose trained tokens
all fall beyond it is reported rather than trained on with no labels.

Rows refused here go through `Rejects` with their `_origin` ("FILE:ROW") as location. Results are cached under
`$ZEPHYR_CACHE/tokenized/<key>` (default `~/.cache/zephyr`), the key covering the data's fingerprint, the tokenizer
(its full serialisation and chat template) and every setting; a cache hit replays the rows refused the first time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from zephyr.data.rejects import Rejects
from zephyr.data.templates import has_generation_markers, render, resolve_chat_template
from zephyr.errors import ConfigError, DataError, ZephyrError
from zephyr.fetch import zephyr_cache_dir

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch's cross-entropy default)
TRUNCATION_MODES = ("keep_start", "keep_end")

# Bump when the tokenized rows change for the same inputs, so that old caches are not reused.
_CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------- preferences


def tokenize_preferences(
    ds: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    rejects: Rejects,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Preference rows `{prompt, chosen, rejected}` (conversations) -> token rows (see the module docstring).

    Returns rows `{prompt_input_ids: [P], chosen_input_ids: [C], rejected_input_ids: [R]}` (plus `_origin` when the
    input has it), before any `max_length` cut; the collator applies that with `preference_sequence`.
    """
    _check_lengths(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode '{truncation_mode}' is not one of {', '.join(TRUNCATION_MODES)}.")
    resolve_chat_template("auto", tokenizer)  # a clear error now rather than one per row
    settings = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "max_completion_length": max_completion_length,
        "truncation_mode": truncation_mode,
    }
    return _cached_tokenization(
        "preferences",
        ds,
        tokenizer,
        settings,
        _tokenize_preference_row,
        _PREFERENCE_COLUMNS,
        rejects,
        num_proc,
        cache_dir,
    )


def _tokenize_preference_row(row: dict, tokenizer, settings: dict) -> dict:
    try:
        prompt_ids = chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        prompt_chosen_ids = chat_ids(tokenizer, row["prompt"] + row["chosen"])
        prompt_rejected_ids = chat_ids(tokenizer, row["prompt"] + row["rejected"])
    except _template_errors() as e:
        return _refused(f"the chat template cannot render this conversation: {e}", None, _PREFERENCE_COLUMNS)

    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    prompt = prompt_ids[:prompt_len]
    chosen = prompt_chosen_ids[prompt_len:]
    rejected = prompt_rejected_ids[prompt_len:]
    if settings["max_prompt_length"] is not None:
        prompt = prompt[-settings["max_prompt_length"] :]
    if settings["max_completion_length"] is not None:
        chosen = chosen[: settings["max_completion_length"]]
        rejected = rejected[: settings["max_completion_length"]]

    max_length = settings["max_length"]
    if max_length is not None and settings["truncation_mode"] == "keep_start" and len(prompt) >= max_length:
        return _refused(
            f"the prompt is {len(prompt)} tokens, leaving no room for a response within max_length={max_length}; "
            "raise max_length, set max_prompt_length below it, or shorten the prompt",
            "prompt",
            _PREFERENCE_COLUMNS,
        )
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        **_NO_ERROR,
    }


_PREFERENCE_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def preference_sequence(
    prompt_ids: list[int],
    completion_ids: list[int],
    *,
    max_length: int | None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[int]]:
    """Prompt + completion as one training sequence, cut to MAX_LENGTH as TRL's `DataCollatorForPreference` does.

    Returns `(input_ids: [T], completion_mask: [T])`, T <= max_length, with completion_mask 1 on completion tokens.
    `keep_end` drops tokens from the front (the prompt's start first), `keep_start` from the back (the completion's
    end); chosen and rejected are cut independently, so with `keep_end` they may keep different amounts of prompt.
    """
    input_ids = list(prompt_ids) + list(completion_ids)
    completion_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None and len(input_ids) > max_length:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        input_ids, completion_mask = input_ids[cut], completion_mask[cut]
    return input_ids, completion_mask


def tokenize_unpaired(
    ds: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None,
    rejects: Rejects,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Unpaired rows `{prompt, completion, label}` (KTO) -> `{prompt_input_ids: [P], completion_input_ids: [C],
    label}`, as TRL 1.16's `KTOTrainer._prepare_dataset`: prompt_ids = chat(prompt, add_generation_prompt=True), the
    completion what chat(prompt + completion) adds after their common prefix. `max_length` cuts prompt +
    completion at collation keeping the start (TRL's KTO collator); a prompt that fills it is refused (TRL drops it)."""
    _check_lengths(max_length=max_length)
    resolve_chat_template("auto", tokenizer)
    settings = {"max_length": max_length}
    row = _tokenize_unpaired_row
    return _cached_tokenization(
        "unpaired", ds, tokenizer, settings, row, _UNPAIRED_COLUMNS, rejects, num_proc, cache_dir
    )


def _tokenize_unpaired_row(row: dict, tokenizer, settings: dict) -> dict:
    try:
        prompt_ids = chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        prompt_completion_ids = chat_ids(tokenizer, row["prompt"] + row["completion"])
    except _template_errors() as e:
        return _refused(f"the chat template cannot render this conversation: {e}", None, _UNPAIRED_COLUMNS)
    prompt_len = common_prefix_length(prompt_ids, prompt_completion_ids)
    max_length = settings["max_length"]
    if max_length is not None and prompt_len >= max_length:
        return _refused(
            f"the prompt is {prompt_len} tokens, leaving no room for a response within max_length={max_length}; "
            "raise max_length or shorten the prompt",
            "prompt",
            _UNPAIRED_COLUMNS,
        )
    return {
        "prompt_input_ids": prompt_ids[:prompt_len],
        "completion_input_ids": prompt_completion_ids[prompt_len:],
        **_NO_ERROR,
    }


_UNPAIRED_COLUMNS = ("prompt_input_ids", "completion_input_ids")


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """How many leading tokens IDS and OTHER_IDS share."""
    length = 0
    for token, other in zip(ids, other_ids, strict=False):
        if token != other:
            break
        length += 1
    return length


# ------------------------------------------------------------------------------------------------------------ SFT


def tokenize_sft(
    ds: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None,
    assistant_only_loss: bool = True,
    rejects: Rejects,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Conversation rows `{messages}` -> `{input_ids: [T], labels: [T], attention_mask: [T]}`, T <= max_length.

    labels equal input_ids on trained tokens and IGNORE_INDEX elsewhere: with ASSISTANT_ONLY_LOSS the trained tokens
    are the assistant turns' text and end-of-turn tokens (what `{% generation %}` marks, or the same span found by
    rendering prefixes when the template has no markers), else every token.
    """
    _check_lengths(max_length=max_length)
    template = resolve_chat_template("auto", tokenizer)
    settings = {
        "max_length": max_length,
        "assistant_only_loss": assistant_only_loss,
        "generation_markers": has_generation_markers(template),
    }
    return _cached_tokenization(
        "sft", ds, tokenizer, settings, _tokenize_sft_row, _SFT_COLUMNS, rejects, num_proc, cache_dir
    )


_SFT_COLUMNS = ("input_ids", "labels", "attention_mask")


def _tokenize_sft_row(row: dict, tokenizer, settings: dict) -> dict:
    messages = row["messages"]
    try:
        if not settings["assistant_only_loss"]:
            input_ids = chat_ids(tokenizer, messages)
            trained = [1] * len(input_ids)
        elif settings["generation_markers"]:
            out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            input_ids, trained = list(out["input_ids"]), list(out["assistant_masks"])
        else:
            input_ids, trained = _assistant_mask_from_prefixes(tokenizer, messages)
    except _template_errors() as e:
        return _refused(f"the chat template cannot render this conversation: {e}", "messages", _SFT_COLUMNS)
    except _NoPromptBeforeAssistant:
        return _refused(
            "the conversation opens with an assistant turn; start it with a user (or system) turn",
            "messages",
            _SFT_COLUMNS,
        )

    if 1 not in trained:
        return _refused("the conversation has no assistant turn to train on", "messages", _SFT_COLUMNS)
    max_length = settings["max_length"]
    if max_length is not None and 1 not in trained[:max_length]:
        return _refused(
            f"every assistant token lies beyond max_length={max_length} (the first is token {trained.index(1) + 1}); "
            "raise max_length or shorten the turns before it",
            "messages",
            _SFT_COLUMNS,
        )
    input_ids, trained = input_ids[:max_length], trained[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, trained, strict=True)]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids), **_NO_ERROR}


class _NoPromptBeforeAssistant(Exception):
    """A conversation opens with an assistant turn: there is no prompt to render before it."""


def _assistant_mask_from_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids [T] and assistant mask [T] for a template without `{% generation %}` markers.

    Each assistant turn spans from the end of the text rendered for the turns before it plus the generation prompt,
    to the end of the text rendered through it: the same span a marked template gives when the markers enclose the
    reply and its end-of-turn text. Tokens overlapping a span are marked, as transformers does for marked templates.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise _NoPromptBeforeAssistant
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ZephyrError(
                "The chat template renders earlier turns differently once later turns follow, so the assistant "
                "tokens cannot be located; mark assistant replies with {% generation %}...{% endgeneration %} in the "
                "template, use `chat_template: zephyr`, or set `assistant_only_loss: false`."
            )
        spans.append((len(before), len(through)))

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(token_end > start and token_start < end for start, end in spans))
        for token_start, token_end in encoding["offset_mapping"]
    ]
    return list(encoding["input_ids"]), mask


# ------------------------------------------------------------------------------------------------ shared helpers


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of MESSAGES rendered by the tokenizer's chat template, no special tokens added (as TRL does)."""
    out = tokenizer.apply_chat_template(
        messages, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def masked_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """INPUT_IDS [T] decoded in runs of equal treatment: `(text, trained)`, trained True where labels != -100.

    For the data inspection report: showing which text carries loss. A character split across two runs decodes as
    replacement characters on both sides.
    """
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    run_trained = None
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            segments.append((tokenizer.decode(run), run_trained))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        segments.append((tokenizer.decode(run), run_trained))
    return segments


def _check_lengths(**lengths: int | None) -> None:
    for name, value in lengths.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive whole number of tokens or null, not {value!r}.")


def _template_errors() -> tuple[type[Exception], ...]:
    import jinja2

    return (jinja2.TemplateError,)


# A tokenized row carries `_error` / `_error_field` until validation turns them into `Rejects` entries.
_NO_ERROR = {"_error": None, "_error_field": None}


def _refused(reason: str, field: str | None, columns: tuple[str, ...]) -> dict:
    return {**dict.fromkeys(columns, []), "_error": reason, "_error_field": field}


# ---------------------------------------------------------------------------------------------------------- cache


_CACHE_INFO = "cache_info.json"  # {"rows": N}, written last: what a complete cache holds


def default_cache_dir() -> Path:
    return zephyr_cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes when anything affecting tokenization or rendering does: vocabulary, merges, normalizer,
    added and special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is the best stable description we have
        serialised = json.dumps(sorted(tokenizer.get_vocab().items()))
    described = json.dumps(
        {
            "class": type(tokenizer).__name__,
            "tokenizer": hashlib.sha256(serialised.encode()).hexdigest(),
            "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "chat_template": tokenizer.chat_template,
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()


def cache_key(kind: str, ds: datasets.Dataset, tokenizer, settings: dict) -> str:
    described = json.dumps(
        {
            "kind": kind,
            "format": _CACHE_FORMAT,
            "data": ds._fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()[:24]


def _cached_tokenization(
    kind: str,
    ds: datasets.Dataset,
    tokenizer,
    settings: dict,
    tokenize_row: Callable[[dict, Any, dict], dict],
    columns: tuple[str, ...],
    rejects: Rejects,
    num_proc: int | None,
    cache_dir: str | Path | None,
) -> datasets.Dataset:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / cache_key(kind, ds, tokenizer, settings)
    cached = _read_cache(path) if path.is_dir() else None
    if cached is not None:
        tokenized, refused = cached
        for error, data in refused:
            rejects.add(error, data)
        return tokenized
    tokenized, refused = _tokenize(ds, tokenizer, settings, tokenize_row, columns, num_proc, kind)
    # Refused rows reach `rejects` before anything is cached: without --skip-invalid the first one raises here.
    for error, data in refused:
        rejects.add(error, data)
    if len(tokenized) == 0:  # datasets cannot read back a saved 0-row dataset; nothing worth caching anyway
        return tokenized
    _save_atomically(tokenized, refused, path)
    return datasets.load_from_disk(str(path))


def _read_cache(path: Path) -> tuple[datasets.Dataset, list[tuple[DataError, Any]]] | None:
    """The tokenized and refused rows cached at PATH, or None, with a message, when the cache cannot be read whole
    (a disk error, a file cut short, a cache from before the row count was recorded): it is deleted, to be rebuilt.
    The row count matters because Arrow's stream format has no footer: a file cut at a batch boundary still opens."""
    try:
        tokenized = datasets.load_from_disk(str(path))
        written = json.loads((path / _CACHE_INFO).read_text())["rows"]
        if len(tokenized) != written:
            raise ValueError(f"{len(tokenized)} rows where {written} were written")
        refused = _load_refused(path)
    except Exception as err:  # noqa: BLE001 - whatever is wrong with it, tokenizing again repairs it
        print(f"tokenization cache {path} is unreadable ({type(err).__name__}: {err}); tokenizing again")
        shutil.rmtree(path, ignore_errors=True)
        return None
    return tokenized, refused


def _tokenize(
    ds, tokenizer, settings, tokenize_row, columns, num_proc, kind
) -> tuple[datasets.Dataset, list]:
    # Explicit features: type inference would call an all-None `_error` column null, and then fail to write the first
    # reason string that comes later (or in another worker's shard).
    features = datasets.Features({name: datasets.List(datasets.Value("int32")) for name in columns})
    features.update({"_error": datasets.Value("string"), "_error_field": datasets.Value("string")})
    kept_columns = [c for c in ("_origin", "label") if c in ds.column_names]  # label: KTO's desirability
    for name in kept_columns:
        features[name] = ds.features[name]
    tokenized = ds.map(
        tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        remove_columns=[c for c in ds.column_names if c not in kept_columns],
        features=features,
        num_proc=num_proc,
        desc=f"Tokenizing {kind}",
    )
    errors = list(tokenized["_error"])
    fields = list(tokenized["_error_field"])
    origins = list(tokenized["_origin"]) if "_origin" in tokenized.column_names else [None] * len(tokenized)
    refused = []
    for index, reason in enumerate(errors):
        if reason is not None:
            file, row = _locate(origins[index], index)
            refused.append((DataError(reason, file=file, row=row, field=fields[index]), ds[index]))
    kept = [i for i, reason in enumerate(errors) if reason is None]
    if len(kept) < len(tokenized):
        tokenized = tokenized.select(kept)
    return tokenized.remove_columns(["_error", "_error_field"]), refused


def _locate(origin: str | None, index: int) -> tuple[str | None, int]:
    """(file, 1-based row) from an `_origin` "FILE:ROW", else the row's position in the dataset."""
    if origin:
        file, _, row = origin.rpartition(":")
        if file and row.isdigit():
            return file, int(row)
    return None, index + 1


def _save_atomically(tokenized: datasets.Dataset, refused: list, path: Path) -> None:
    """Write to a temporary folder beside PATH and rename it, so a crash or a concurrent run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tokenized.save_to_disk(str(tmp))
        records = [
            {"reason": e.reason, "file": e.file, "row": e.row, "field": e.field, "data": _jsonable(data)}
            for e, data in refused
        ]
        (tmp / "refused.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        (tmp / _CACHE_INFO).write_text(json.dumps({"rows": len(tokenized)}))
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():  # not a concurrent run that finished first: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_refused(path: Path) -> list[tuple[DataError, Any]]:
    records = json.loads((path / "refused.json").read_text(encoding="utf-8"))
    return [
        (DataError(r["reason"], file=r["file"], row=r["row"], field=r["field"]), r["data"]) for r in records
    ]


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return repr(data)
