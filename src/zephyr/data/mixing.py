"""Dataset mixing, with the recipe keys of the alignment-handbook and TRL, into one train (and test) split.

Three forms, exactly one per recipe:

- `dataset_name` (+ `dataset_config`, `dataset_train_split`, `dataset_test_split`), TRL's ScriptArguments: the
  named splits as they are (not shuffled here; shuffling per epoch is the data loader's job, as in TRL). The test
  split is used when the source has it. `test_split_size` splits the train split instead when it has none.
- `dataset_mixer: {source: fraction}` + `dataset_splits` (+ `dataset_configs`), the handbook's first form
  (`mix_datasets`): for every split whose name contains "train", the first `int(fraction * rows)` rows of each
  source (or the first N rows for an integer N > 1), concatenated in mixer order and shuffled with `seed` (the
  handbook's fixed 42 is the default). Splits
  containing "test" are kept whole, concatenated and shuffled with `seed`, as the handbook does. Deviations: a
  fraction must be in (0, 1] (the handbook also takes 0 and fails later on > 1); a source with several train splits
  gets its fraction on each of them (the handbook pairs fractions with splits by position, a bug for that case);
  when `dataset_splits` is not given, a source without a "test" split contributes none.
- `dataset_mixture: {datasets: [{id, config, split, columns, weight}], seed, test_split_size}` (or the bare list),
  the handbook's newer form: each source's split, `columns` kept, then (with `weight`) shuffled with the seed and
  cut to `int(weight * rows)`; all concatenated and shuffled with the seed; `test_split_size` (a fraction or a row
  count) makes a seeded train/test split of the mixture. The mixture's own `seed` wins over the `seed` argument,
  which replaces the handbook's default of 0 when the mixture has none. An entry may also name its own `schema`.

A lone local file has one split, `train`, and stands for whatever train split a recipe names (`train_sft`); a test
split must then come from a folder (`test_sft.jsonl`) or from `test_split_size`.

Every split is adapted to the internal form first (see schemas.py), so fractions count valid rows and the sources
concatenate without column conflicts.
"""

from __future__ import annotations

import difflib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zephyr.data.rejects import Rejects
from zephyr.data.schemas import load_split
from zephyr.data.sources import list_splits
from zephyr.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets

MIXTURE_KEYS = ("datasets", "seed", "test_split_size")
MIXTURE_ENTRY_KEYS = ("id", "config", "split", "columns", "weight", "schema")


def load_mixture(
    *,
    kind: str,
    dataset_mixer: dict[str, float] | None = None,
    dataset_mixture: dict | list | None = None,
    dataset_splits: list[str] | None = None,
    dataset_configs: list[str | None] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_train_split: str = "train",
    dataset_test_split: str = "test",
    test_split_size: float | int | None = None,
    schema: str = "auto",
    seed: int = 42,
    rejects: Rejects,
) -> datasets.DatasetDict:
    """A `datasets.DatasetDict` with "train" and, when there is one, "test", in KIND's internal form."""
    forms = {"dataset_name": dataset_name, "dataset_mixer": dataset_mixer, "dataset_mixture": dataset_mixture}
    given = [name for name, value in forms.items() if value]
    if len(given) != 1:
        chosen = f"got {' and '.join(given)}" if given else "got none"
        raise ConfigError(f"set exactly one of dataset_name, dataset_mixer, dataset_mixture ({chosen})")
    load = partial(load_split, kind=kind, schema=schema, rejects=rejects, seed=seed)
    if dataset_mixer:
        if test_split_size is not None:
            raise ConfigError(
                "test_split_size does not apply to dataset_mixer, which takes its test data from dataset_splits"
            )
        return _mix_handbook(load, dataset_mixer, dataset_splits, dataset_configs, seed)
    if dataset_mixture:
        return _mix_weighted(load, dataset_mixture, seed, test_split_size)
    return _single(
        load, dataset_name, dataset_config, dataset_train_split, dataset_test_split, test_split_size, seed
    )


def _single(load, source, config, train_split, test_split, test_split_size, seed):
    import datasets

    available = list_splits(source, config=config)
    train = load(source, split=_existing_split(source, train_split, available), config=config)
    has_test = test_split in available and test_split != train_split
    if test_split_size is not None:
        if has_test:
            raise ConfigError(
                f"{source} already has a '{test_split}' split; drop test_split_size or use that split"
            )
        return _train_test_split(train, test_split_size, seed)
    out = datasets.DatasetDict({"train": train})
    if has_test:
        out["test"] = load(source, split=test_split, config=config)
    return out


def _mix_handbook(load, mixer, splits, configs, seed):
    import datasets

    splits_given = bool(splits)
    splits = list(splits) if splits_given else ["train", "test"]
    for split in splits:
        if "train" not in split and "test" not in split:
            raise ConfigError(
                f"dataset_splits entry '{split}' names neither a train nor a test split (its name must contain one)"
            )
    configs = list(configs) if configs else [None] * len(mixer)
    if len(configs) != len(mixer):
        raise ConfigError(
            f"dataset_configs has {len(configs)} entries but dataset_mixer has {len(mixer)} datasets; give one per dataset"
        )
    train_parts, test_parts = [], []
    for (source, fraction), config in zip(mixer.items(), configs, strict=True):
        available = list_splits(source, config=config)
        for split in splits:
            if not splits_given and split == "test" and "test" not in available:
                continue
            dataset = load(source, split=_existing_split(source, split, available), config=config)
            if "train" in split:
                train_parts.append(
                    dataset.select(range(_rows_to_take(fraction, len(dataset), source, split)))
                )
            else:
                # No subsampling of test data, so that models evaluated on it stay comparable.
                test_parts.append(dataset)
    if not train_parts:
        raise ConfigError(f"dataset_splits {splits} has no train split (a name containing 'train')")
    out = datasets.DatasetDict({"train": datasets.concatenate_datasets(train_parts).shuffle(seed=seed)})
    if test_parts:
        out["test"] = datasets.concatenate_datasets(test_parts).shuffle(seed=seed)
    return out


def _rows_to_take(fraction: Any, rows: int, source: str, split: str) -> int:
    """How many leading rows of a split dataset_mixer keeps: int(fraction * rows), or a count N > 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ConfigError(f"dataset_mixer value for {source} must be a number, got {fraction!r}")
    if isinstance(fraction, int) and fraction > 1:
        if fraction > rows:
            raise ConfigError(
                f"dataset_mixer asks for {fraction} rows of {source} ({split}), which has only {rows}"
            )
        return fraction
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"dataset_mixer value for {source} must be a fraction in (0, 1] or a row count > 1, got {fraction}"
        )
    return int(fraction * rows)


def _mix_weighted(load, mixture, seed, test_split_size):
    import datasets

    if isinstance(mixture, dict):
        _check_keys(mixture, MIXTURE_KEYS, "dataset_mixture")
        entries = mixture.get("datasets")
        seed = mixture.get("seed", seed)
        test_split_size = mixture.get("test_split_size", test_split_size)
    else:
        entries = mixture
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "dataset_mixture needs a non-empty list of datasets, each like {id: ..., split: train}"
        )
    parts = []
    for i, entry in enumerate(entries):
        where = f"dataset_mixture.datasets[{i}]"
        entry = {"id": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(f"{where} must be a mapping with at least an 'id', got {entry!r}")
        _check_keys(entry, MIXTURE_ENTRY_KEYS, where)
        columns = entry.get("columns")
        loader = partial(load, schema=entry["schema"]) if entry.get("schema") else load
        dataset = loader(
            entry["id"], split=entry.get("split", "train"), config=entry.get("config"), columns=columns
        )
        weight = entry.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
                raise ConfigError(f"{where}.weight must be a fraction in (0, 1], got {weight!r}")
            dataset = dataset.shuffle(seed=seed).select(range(int(weight * len(dataset))))
        parts.append(dataset)
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if test_split_size is not None:
        return _train_test_split(mixed, test_split_size, seed)
    return datasets.DatasetDict({"train": mixed})


def _train_test_split(dataset, test_split_size, seed):
    import datasets

    try:
        split = dataset.train_test_split(test_size=test_split_size, seed=seed)
    except ValueError as e:
        raise ConfigError(
            f"test_split_size={test_split_size!r} cannot split {len(dataset)} rows: {e}"
        ) from None
    return datasets.DatasetDict({"train": split["train"], "test": split["test"]})


def _existing_split(source: str, split: str, available: list[str]) -> str:
    """SPLIT if SOURCE has it; a lone local file stands for any train split the recipe names."""
    if split in available:
        return split
    if "train" in split and Path(source).expanduser().is_file():
        return split
    raise DataError(f"there is no split '{split}'; its splits are: {', '.join(available)}", file=source)


def _check_keys(mapping: dict, valid: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint}; valid keys: {', '.join(valid)}")
