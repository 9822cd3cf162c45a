"""`zephyr data inspect`: what a dataset holds and what training would make of it.

Detected schema, rows per split (and rows that fail validation), token-length percentiles (prompt, chosen,
rejected for preferences; whole conversation and trained tokens for SFT), how many rows `max_length` would cut, and
one example rendered through the chat template with the trained part marked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zephyr.data.prepare import chat_tokenizer, reason_lines
from zephyr.data.rejects import Rejects
from zephyr.data.schemas import SCHEMAS, detect_schema, load_split
from zephyr.data.sources import iter_records, list_splits
from zephyr.data.templates import with_empty_system_messages
from zephyr.data.tokenize import IGNORE_INDEX, masked_segments, tokenize_preferences, tokenize_sft
from zephyr.errors import ConfigError, DataError, ZephyrError
from zephyr.fetch import EMBEDDED_MODEL

PERCENTILES = (50, 90, 99, 100)
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


@dataclass
class Settings:
    model: str | None = None
    chat_template: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    auto_insert_empty_system_msg: bool = False


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _recipe(recipe: str, kind: str):
    """RECIPE loaded as the stage that trains on KIND rows; a recipe of the other stage is named as such."""
    from zephyr.recipe import (
        load_config,  # the recipe loader sits above data/: imported only when a recipe is given
    )

    stage, other = ("sft", "dpo") if kind == "sft" else ("dpo", "sft")
    try:
        return load_config(stage, recipe)
    except ConfigError as err:
        try:
            load_config(other, recipe)
        except ZephyrError:
            raise err from None
        raise ConfigError(
            f"{recipe} is a {other} recipe but this data holds {kind} rows, which `zephyr {stage}` trains on; "
            f"pass a recipe for `zephyr {stage}` or leave --recipe out"
        ) from None


def _settings(recipe: str | None, kind: str, **cli) -> Settings:
    s = Settings()
    if recipe:
        cfg = _recipe(recipe, kind)
        s = Settings(
            model=cfg.tokenizer_name_or_path or cfg.model_name_or_path,
            chat_template=cfg.chat_template,
            max_length=cfg.max_length,
            max_prompt_length=getattr(cfg, "max_prompt_length", None),
            auto_insert_empty_system_msg=bool(cfg.auto_insert_empty_system_msg),
        )
    for key, value in cli.items():
        if value is not None:
            setattr(s, key, value)
    return s


def _length_table(columns: dict[str, list[int]]) -> list[str]:
    head = (
        "  tokens        "
        + "".join(f"{'p' + str(q) if q < 100 else 'max':>8s}" for q in PERCENTILES)
        + "    mean"
    )
    lines = [head]
    for name, values in columns.items():
        if values:
            cells = "".join(f"{percentile(values, q):8d}" for q in PERCENTILES)
            lines.append(f"  {name:12s}  {cells}{sum(values) / len(values):8.1f}")
    return lines


def _marked(segments: list[tuple[str, bool]]) -> str:
    return "".join(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text for text, trained in segments)


def inspect(
    source: str,
    *,
    recipe: str | None = None,
    model: str | None = None,
    schema: str | None = None,
    split: str | None = None,
    max_length: int | None = None,
    chat_template: str | None = None,
    sample: int = 2000,
    seed: int = 0,
) -> str:

    if max_length is not None and max_length < 1:
        raise ConfigError(f"--max-length must be a positive number of tokens, not {max_length}")
    splits = [split] if split else list_splits(source)
    out = [f"source: {source}"]
    tokenizer = None
    example_shown = False
    for name in splits:
        rejects = Rejects(skip_invalid=True)
        try:
            ds = load_split(source, split=name, schema=schema or "auto", rejects=rejects)
        except DataError as err:
            if not len(rejects):
                raise
            # Every row was refused: say why, or the user learns only that nothing is left.
            r = rejects.rows[0]
            example = DataError(r["reason"], file=r["file"], row=r["row"], field=r["field"])
            raise DataError(f"{err.reason}; the first: {example}", file=err.file) from None
        detected = schema
        if detected in (None, "auto"):
            first = next((r.data for r in iter_records(source, split=name) if r.data is not None), {})
            detected = detect_schema(first.keys())
        kind = SCHEMAS[detected].kind
        settings = _settings(recipe, kind, model=model, chat_template=chat_template, max_length=max_length)
        if tokenizer is None:
            tokenizer = chat_tokenizer(settings.model or EMBEDDED_MODEL, settings.chat_template)
        out.append(f"\nsplit {name}: {len(ds)} rows, schema {detected} ({kind})")
        if len(rejects):
            out.append(
                f"  {len(rejects)} rows fail validation (training stops on the first unless --skip-invalid):"
            )
            out += reason_lines(rejects)
        if not len(ds):
            continue
        if kind == "unpaired":  # KTO's rows: validated above; their token lengths are not measured yet
            out.append("  token lengths are not measured for unpaired (KTO) rows yet")
            continue
        if len(ds) > sample:
            ds = ds.select(sorted(random.Random(seed).sample(range(len(ds)), sample)))
            out.append(f"  token lengths over a random sample of {sample} rows")
        if settings.auto_insert_empty_system_msg:
            ds = with_empty_system_messages(ds, tokenizer.chat_template)
        measure = Rejects(skip_invalid=True)
        if kind == "sft":
            tok = tokenize_sft(ds, tokenizer, max_length=None, rejects=measure)
        else:
            tok = tokenize_preferences(
                ds, tokenizer, max_length=None, max_prompt_length=None, rejects=measure
            )
        if len(measure):
            out.append(
                f"  {len(measure)} rows cannot be tokenized with this template (training refuses them too):"
            )
            out += reason_lines(measure)
        if not len(tok):
            continue
        if kind == "sft":
            total = [len(ids) for ids in tok["input_ids"]]
            trained = [sum(1 for t in labels if t != IGNORE_INDEX) for labels in tok["labels"]]
            out += _length_table({"conversation": total, "trained": trained})
            lengths = total
        else:
            prompt = [len(x) for x in tok["prompt_input_ids"]]
            chosen = [len(x) for x in tok["chosen_input_ids"]]
            rejected = [len(x) for x in tok["rejected_input_ids"]]
            out += _length_table({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            lengths = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected, strict=True)]
            if settings.max_prompt_length:
                cut = sum(p > settings.max_prompt_length for p in prompt)
                out.append(
                    f"  max_prompt_length {settings.max_prompt_length} would cut {cut} prompts "
                    f"({100 * cut / len(prompt):.1f}%)"
                )
        if settings.max_length:
            cut = sum(n > settings.max_length for n in lengths)
            out.append(
                f"  max_length {settings.max_length} would truncate {cut} of {len(lengths)} rows "
                f"({100 * cut / len(lengths):.1f}%)"
            )
        if not example_shown:
            example_shown = True
            row = tok[0]
            out.append(
                f"\nexample (row {row.get('_origin', 1)}); text inside {TRAINED_OPEN} {TRAINED_CLOSE} is "
                "trained on, the rest is context with no loss:"
            )
            if kind == "sft":
                out.append(_marked(masked_segments(tokenizer, row["input_ids"], row["labels"])))
            else:
                for side in ("chosen", "rejected"):
                    ids = row["prompt_input_ids"] + row[f"{side}_input_ids"]
                    labels = [IGNORE_INDEX] * len(row["prompt_input_ids"]) + row[f"{side}_input_ids"]
                    out.append(f"--- {side}:")
                    out.append(_marked(masked_segments(tokenizer, ids, labels)))
    return "\n".join(out)
