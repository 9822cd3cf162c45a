"""From a recipe to tokenized train / test splits: load and mix the sources, validate every row, apply the chat
template, tokenize, cache. `zephyr data prepare`, `zephyr sft` and `zephyr dpo` all start here, so a recipe's data is
tokenized once and a training run finds it in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import datasets

from zephyr.data.mixing import load_mixture
from zephyr.data.rejects import Rejects
from zephyr.data.templates import apply_chat_template_setting, with_empty_system_messages
from zephyr.data.tokenize import tokenize_preferences, tokenize_sft, tokenize_unpaired
from zephyr.errors import DataError
from zephyr.models import load_tokenizer

KIND = {"sft": "sft", "dpo": "preference", "kto": "unpaired"}


@dataclass
class Prepared:
    stage: str
    train: datasets.Dataset
    test: datasets.Dataset | None
    tokenizer: object
    rejects: Rejects
    rejects_path: Path | None
    raw_counts: dict[str, int]
    seconds: float

    def summary(self) -> str:
        lines = [
            f"{self.stage} data: {len(self.train)} train rows"
            + (f", {len(self.test)} test rows" if self.test is not None else ", no test split")
        ]
        lines.append("  loaded: " + ", ".join(f"{k} {v}" for k, v in self.raw_counts.items()))
        if len(self.rejects):
            lines.append(
                f"  skipped {len(self.rejects)} invalid rows, listed with reasons in {self.rejects_path}:"
            )
            lines += reason_lines(self.rejects)
        lines.append(f"  ready in {self.seconds:.1f}s (tokenized rows are cached; a second run reuses them)")
        return "\n".join(lines)


def reason_lines(rejects: Rejects, top: int = 5) -> list[str]:
    """The TOP most common reasons in REJECTS with their counts, one line each, and a line for the rest: reasons
    that quote a number (a token position) differ from row to row, and the counts shown must add up."""
    counts = rejects.reasons().most_common()
    lines = [f"    {n:6d}  {reason}" for reason, n in counts[:top]]
    rest = sum(n for _, n in counts[top:])
    if rest:
        lines.append(f"    {rest:6d}  for {len(counts) - top} other reasons")
    return lines


def load_recipe_data(cfg, *, stage: str, rejects: Rejects) -> datasets.DatasetDict:
    """The recipe's sources, mixed and validated, in the internal form (messages, or prompt/chosen/rejected)."""

    return load_mixture(
        kind=KIND[stage],
        dataset_mixer=cfg.dataset_mixer,
        dataset_mixture=cfg.dataset_mixture,
        dataset_splits=cfg.dataset_splits,
        dataset_configs=cfg.dataset_configs,
        dataset_name=cfg.dataset_name,
        dataset_config=cfg.dataset_config,
        dataset_train_split=cfg.dataset_train_split,
        dataset_test_split=cfg.dataset_test_split,
        test_split_size=cfg.test_split_size,
        schema=cfg.schema,
        seed=cfg.seed,
        rejects=rejects,
    )


def chat_tokenizer(
    name_or_path: str | None,
    chat_template: str | None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """The tokenizer of NAME_OR_PATH with the chat template setting applied and a pad token (eos when it has none)."""

    tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return apply_chat_template_setting(tokenizer, chat_template)


def load_recipe_tokenizer(cfg):
    return chat_tokenizer(
        cfg.tokenizer_name_or_path or cfg.model_name_or_path,
        cfg.chat_template,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
    )


def tokenize_split(ds: datasets.Dataset, cfg, *, stage: str, tokenizer, rejects: Rejects) -> datasets.Dataset:

    if cfg.auto_insert_empty_system_msg:
        ds = with_empty_system_messages(ds, tokenizer.chat_template)
    num_proc = cfg.dataset_num_proc
    if stage == "sft":
        return tokenize_sft(
            ds,
            tokenizer,
            max_length=cfg.max_length,
            assistant_only_loss=cfg.assistant_only_loss,
            rejects=rejects,
            num_proc=num_proc,
        )
    if stage == "kto":
        return tokenize_unpaired(ds, tokenizer, max_length=cfg.max_length, rejects=rejects, num_proc=num_proc)
    return tokenize_preferences(
        ds,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode,
        rejects=rejects,
        num_proc=num_proc,
    )


def prepare(cfg, *, stage: str, tokenizer=None) -> Prepared:
    """Load, mix, validate and tokenize the recipe's data. Invalid rows stop with an error naming file, row and
    field, or with `skip_invalid` are written to OUTPUT_DIR/rejects.jsonl and counted."""
    start = time.perf_counter()
    rejects = Rejects(skip_invalid=bool(cfg.skip_invalid))
    rejects_file = Path(cfg.output_dir) / "rejects.jsonl"
    try:
        raw = load_recipe_data(cfg, stage=stage, rejects=rejects)
        tokenizer = tokenizer or load_recipe_tokenizer(cfg)
        splits = {
            name: tokenize_split(ds, cfg, stage=stage, tokenizer=tokenizer, rejects=rejects)
            for name, ds in raw.items()
        }
        for name, ds in splits.items():
            if not len(ds):
                raise DataError(
                    f"the {name} split has no rows left: all {len(raw[name])} were refused when tokenized"
                )
    except DataError as err:
        raise _with_remedy(err, rejects, rejects_file) from None
    rejects_path = None
    if len(rejects):
        rejects_path = rejects.write(rejects_file)
    return Prepared(
        stage=stage,
        train=splits["train"],
        test=splits.get("test"),
        tokenizer=tokenizer,
        rejects=rejects,
        rejects_path=rejects_path,
        raw_counts={name: len(ds) for name, ds in raw.items()},
        seconds=time.perf_counter() - start,
    )


def _with_remedy(err: DataError, rejects: Rejects, rejects_file: Path) -> DataError:
    """ERR with what to do about it: skip the bad row it names, or read the rows already set aside (when every row
    of a split was refused, the rejects file is the only place that says why)."""
    if not rejects.skip_invalid and err.row is not None:
        remedy = (
            "fix the row, or set skip_invalid: true (--skip_invalid true) to skip such rows and list them in "
            f"{rejects_file}"
        )
    elif len(rejects):
        first = rejects.rows[0]
        example = DataError(first["reason"], file=first["file"], row=first["row"], field=first["field"])
        listed = rejects.write(rejects_file)
        remedy = f"the {len(rejects)} rows refused so far are listed in {listed}; the first: {example}"
    else:
        return err
    return DataError(f"{err.reason}; {remedy}", file=err.file, row=err.row, field=err.field)
