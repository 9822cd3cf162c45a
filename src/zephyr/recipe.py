"""Reading a recipe: `load_config` builds one stage's config (zephyr.config) from a YAML file and `--key=value`
overrides, and checks it.

    cfg = load_config("dpo", "recipes/zephyr-7b-beta/dpo.yaml", ["--learning_rate=1e-6", "--beta", "0.05"])

Key names are the alignment-handbook / TRL / Transformers argument names, so the handbook's recipes run unchanged.
The YAML file is read first and command-line overrides win. Keys that today's TRL / Transformers renamed are read
under their old names too (`evaluation_strategy`, `torch_dtype`, `use_flash_attention_2`, `preprocessing_num_workers`,
SFT's `max_seq_length`); one file giving both spellings with different values is refused.

Every key and value is checked here, once, before any model loads: a mistake fails with one sentence naming the key,
the file it came from (or the command line), and what would be valid. Names are checked against the registries that
use them (`LOSSES`, `LOSS_RULES` and `F_DIVERGENCES` in zephyr.train.objectives, `OPTIMIZERS` in
zephyr.train.optimizers), so a new loss or optimizer is valid here as soon as it is registered there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from zephyr.config import (
    CARD_KEYS,
    CARD_TYPES,
    STAGES,
    CPOConfig,
    DPOConfig,
    KTOConfig,
    ORPOConfig,
    RecipeConfig,
    SFTConfig,
)
from zephyr.data.mixing import MIXTURE_ENTRY_KEYS, MIXTURE_KEYS
from zephyr.errors import ConfigError
from zephyr.train.objectives import (
    CPO_LOSS_RULES,
    CPO_LOSSES,
    F_DIVERGENCES,
    KTO_LOSSES,
    LABEL_SMOOTHING_RANGE,
    LOSS_RULES,
    LOSSES,
)
from zephyr.train.optimizers import OPTIMIZERS, optimizer_name

# Old key -> today's key. use_flash_attention_2 is special-cased: true means attn_implementation flash_attention_2.
_LEGACY_KEYS = {
    "evaluation_strategy": "eval_strategy",
    "torch_dtype": "dtype",
    "preprocessing_num_workers": "dataset_num_proc",
    "use_flash_attention_2": "attn_implementation",
}
_STAGE_LEGACY_KEYS = {
    "sft": {"max_seq_length": "max_length"},
    "dpo": {},
    "cpo": {},
    "simpo": {},
    "orpo": {},
    "kto": {},
}


# Keys whose values are a registry's names (checked against the live dict, so a registered entry is valid at once).
# optim is refused by zephyr.train.optimizers.optimizer_name itself (_check_training), in the words the loop uses.
# A field whose metadata names a "registry" (CPO's loss_type) is checked against that entry instead of its own name.
_REGISTRY_CHOICES = {
    "loss_type": LOSSES,
    "f_divergence_type": F_DIVERGENCES,
    "optim": OPTIMIZERS,
    "cpo_loss_type": CPO_LOSSES,
    "kto_loss_type": KTO_LOSSES,
}


def _choices(f: dataclasses.Field) -> Collection[str] | None:
    return f.metadata.get("choices") or _REGISTRY_CHOICES.get(f.metadata.get("registry", f.name))


_MIXTURE_ENTRY_HINTS = {
    "id": str, "config": str | None, "split": str, "columns": list[str] | None, "weight": float | None, "schema": str,
}  # fmt: skip
# MIXTURE_ENTRY_KEYS (the mixture reader's), each with its type; tests/test_config.py checks they stay the same keys
# TRL's DatasetConfig spells three entry keys differently; both spellings are read.
_MIXTURE_ENTRY_ALIASES = {"path": "id", "name": "config", "fraction": "weight"}


# ---------------------------------------------------------------------------------------------- public API


def load_config(
    stage: str, config_file: str | Path | None = None, overrides: Sequence[str] = ()
) -> SFTConfig | DPOConfig | CPOConfig | ORPOConfig:
    """The STAGE config from CONFIG_FILE (YAML) with OVERRIDES (raw argv tokens, e.g. ["--bf16=false"]) on top."""
    cls = _stage_class(stage)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # key -> "in FILE" or "on the command line", for error messages
    sources = []
    if config_file is not None:
        sources.append((_read_recipe(Path(config_file)), f"in {config_file}"))
    if overrides:
        sources.append((_parse_overrides(list(overrides), cls), "on the command line"))
    for raw, source in sources:
        for key, value in _canonical_values(cls, raw, source).items():
            values[key], where[key] = value, source
    cfg = cls(**values)
    _validate(cfg, where)
    return cfg


def config_keys(stage: str) -> list[str]:
    """STAGE's key names in declaration order (legacy spellings, also accepted, are not listed)."""
    return [f.name for f in dataclasses.fields(_stage_class(stage))]


def describe_keys(stage: str) -> list[tuple[str, str, Any]]:
    """(key, type, default) for each of STAGE's keys, for `--help`; choices are listed inside the type."""
    cls = _stage_class(stage)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind = _type_name(hints[f.name])
        choices = _choices(f)
        if choices:
            kind += f" in {{{', '.join(choices)}}}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, kind, default))
    return rows


# ---------------------------------------------------------------------------------------------- reading


def _stage_class(stage: str) -> type[RecipeConfig]:
    if stage not in STAGES:
        raise ConfigError(f"Unknown stage '{stage}'; use one of: {', '.join(STAGES)}.")
    return STAGES[stage]


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error instead of last-one-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist; check the path given to --config.")
    if not path.is_file():
        raise ConfigError(f"Config file {path} is not a file; give the path of a YAML recipe.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"Config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text; save it as UTF-8 YAML.") from None
    if not isinstance(data, dict):
        found = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"Config file {path} must be a YAML mapping of `key: value` lines, but it is {found}."
        )
    return data


def _parse_overrides(tokens: list[str], cls: type[RecipeConfig]) -> dict[str, Any]:
    """{key: raw value} from `--key=value`, `--key value`, a bare `--flag` (true) or `--no_flag` (false)."""
    hints = typing.get_type_hints(cls)
    bool_keys = {f.name for f in dataclasses.fields(cls) if hints[f.name] in (bool, bool | None)}
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"Unexpected command-line argument '{token}'; overrides look like --key=value.")
        key, sep, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not sep:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            elif key in bool_keys:
                value = True
            elif key.startswith("no_") and key[3:] in bool_keys:
                key, value = key[3:], False
            else:
                raise ConfigError(f"--{key} on the command line needs a value, as in --{key}=VALUE.")
        if key in out:
            raise ConfigError(f"--{key} is given twice on the command line; keep one.")
        out[key] = value
        i += 1
    return out


def _canonical_values(cls: type[RecipeConfig], raw: dict[str, Any], source: str) -> dict[str, Any]:
    """RAW's values under today's key names, typed; unknown, other-stage and conflicting keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    legacy = {**_LEGACY_KEYS, **_STAGE_LEGACY_KEYS.get(cls.stage, {})}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # canonical key -> the spelling that set it in this source
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"Key {key!r} {source} is not a name; keys are words like learning_rate.")
        name = legacy.get(key, key)
        if name not in fields:
            raise _unknown_key(cls, key, source, [*fields, *legacy])
        if key == "use_flash_attention_2":
            if not _coerce(value, bool, key, source):
                continue  # false only says "not flash attention", which the default already means
            value = "flash_attention_2"
        value = _coerce_field(fields[name], hints[name], value, key, source)
        if name in out and out[name] != value:
            raise _conflict(key, spelled[name], source)
        out[name], spelled[name] = value, key
    if "use_flash_attention_2" in raw and out.get("attn_implementation") == "flash_attention_2":
        if not _coerce(raw["use_flash_attention_2"], bool, "use_flash_attention_2", source):
            raise _conflict("use_flash_attention_2", "attn_implementation", source)
    return out


def _unknown_key(cls: type[RecipeConfig], key: str, source: str, known: list[str]) -> ConfigError:
    owners = _stages_taking(key)
    if owners:
        commands = [f"`zephyr {stage}`" for stage in owners]
        named = commands[0] if len(commands) == 1 else f"{', '.join(commands[:-1])} and {commands[-1]}"
        return ConfigError(
            f"'{key}' {source} is a key of {named}, not of `zephyr {cls.stage}`; "
            f"remove it, or use it with {'that command' if len(commands) == 1 else 'one of those commands'}."
        )
    close = _suggest(key, known)
    hint = f"; did you mean {close}?" if close else f"; run `zephyr {cls.stage} --help` for the valid keys."
    return ConfigError(f"Unknown key '{key}' {source}{hint}")


def _stages_taking(key: str) -> list[str]:
    """The stages (in STAGES order) whose config dataclass has KEY, under its name or a legacy spelling: read from
    the dataclasses, so that a stage registered later is named here without an edit."""
    return [
        stage
        for stage, cls in STAGES.items()
        if key in {f.name for f in dataclasses.fields(cls)} or key in _STAGE_LEGACY_KEYS.get(stage, {})
    ]


def _suggest(word: str, candidates: Collection[str]) -> str:
    """The likeliest meant candidate(s), quoted, or "": a completion of WORD, else the closest spelling (the two
    closest when nearly tied, as 'per_device_batch_size' is to the eval and the train batch size)."""
    completions = [c for c in candidates if c.startswith(word)]
    if completions:
        return f"'{completions[0]}'"
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    best = [c for r, c in scored[:2] if r >= 0.6 and r > scored[0][0] - 0.05]
    return " or ".join(f"'{c}'" for c in sorted(best))


def _conflict(key: str, other: str, source: str) -> ConfigError:
    return ConfigError(
        f"'{other}' and '{key}' name the same setting and are given different values {source}; keep one."
    )


# ---------------------------------------------------------------------------------------------- typing values

_NULL = {"null", "none", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce_field(f: dataclasses.Field, hint: Any, value: Any, key: str, source: str) -> Any:
    """VALUE for field F: typed by HINT, checked against F's choices, in the field's canonical form."""
    choices = None if f.name == "optim" else _choices(f)
    if value is False and choices and "no" in choices:
        value = "no"  # YAML 1.1 reads a bare `no` (as in `save_strategy: no`) as false
    if f.name == "dataset_mixture":
        return _mixture(value, source)
    if f.name == "test_split_size":
        return _test_split_size(value, key, source)
    if f.name == "card":
        return check_card(value, source)
    value = _coerce(value, hint, key, source)
    if f.name == "report_to":
        if any(v == "none" for v in value) and len(value) > 1:
            raise ConfigError(
                f"report_to {source} lists 'none' with other trackers {value}; keep one or the other."
            )
        value = [v for v in value if v != "none"]
    if f.name == "dataset_mixer" and value:
        # A whole amount above 1 is a row count, which zephyr.data.mixing tells from a fraction by its int type.
        value = {k: int(v) if v > 1 and v == int(v) else v for k, v in value.items()}
    if f.name == "lora_target_modules" and value == ["all-linear"]:
        value = "all-linear"  # peft's keyword, which it only recognises as a string
    for item in value if isinstance(value, list) else [value]:
        if choices and item is not None and item not in choices:
            close = _suggest(str(item), choices)
            hint_text = f"; did you mean {close}?" if close else "."
            raise ConfigError(f"{key} = {item!r} {source} is not one of: {', '.join(choices)}{hint_text}")
    return value


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """VALUE as HINT asks; strings (the command line, or YAML such as `5e-7`) are parsed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            if type(None) in args:
                return None
        # A number written with a point or exponent stays a float where the union allows one: 1000 rows, not 1000.0.
        as_float = isinstance(value, float) or (
            isinstance(value, str) and not value.strip().lstrip("+-").isdigit()
        )
        order = (list, dict, bool, float, int, str) if as_float else (list, dict, bool, int, float, str)
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: order.index(_base(a))):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise _bad_type(key, value, hint, source)
    base = _base(hint)
    if hint is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif base in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = (
                    float(value) if base is float or not value.strip().lstrip("+-").isdigit() else int(value)
                )
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and math.isfinite(number):
            if base is float:
                return float(number)
            if number == int(number):
                return int(number)
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `dataset_config: 2023` or `model_revision: 1`
    elif base is list:
        (item_hint,) = args or (Any,)
        if isinstance(value, str):
            text = value.strip()
            value = (
                _yaml_value(text, key, source)
                if text.startswith("[")
                else [p.strip() for p in text.split(",")]
            )
            value = [v for v in value if v != ""]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_hint, key, source) for v in value]
        if value is not None and not isinstance(value, dict):
            return [_coerce(value, item_hint, key, source)]
    elif base is dict:
        value_hint = args[1] if args else Any
        if isinstance(value, str):
            value = _yaml_value(value, key, source)
        if isinstance(value, dict):
            return {str(k): _coerce(v, value_hint, key, source) for k, v in value.items()}
    raise _bad_type(key, value, hint, source)


def _base(hint: Any) -> Any:
    return typing.get_origin(hint) or hint


def _yaml_value(text: str, key: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(
            f"{key} = {text!r} {source} is not valid YAML; write it like [a, b] or {{k: v}}."
        ) from None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return (
            f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
        )
    return {type(None): "None", Any: "Any"}.get(hint) or hint.__name__


def _bad_type(key: str, value: Any, hint: Any, source: str) -> ConfigError:
    words = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    options = [a for a in (typing.get_args(hint) if is_union else (hint,)) if a is not type(None)]
    wanted = [words.get(_base(a), _type_name(a)) for a in options]
    if type(None) in typing.get_args(hint):
        wanted.append("null")
    return ConfigError(f"{key} = {value!r} {source} is not valid: expected {' or '.join(wanted)}.")


def _mixture(value: Any, source: str) -> dict[str, Any] | None:
    """dataset_mixture in the handbook's nested form {datasets: [...], seed, test_split_size}; a bare list is wrapped."""
    if isinstance(value, str):
        value = _yaml_value(value, "dataset_mixture", source)
    if value is None:
        return None
    mixture = {"datasets": value} if isinstance(value, list) else value
    if (
        not isinstance(mixture, dict)
        or not isinstance(mixture.get("datasets"), list)
        or not mixture["datasets"]
    ):
        raise ConfigError(
            f"dataset_mixture {source} needs a non-empty `datasets:` list of entries like {{id: ..., split: train}}."
        )
    out: dict[str, Any] = {}
    for key, item in mixture.items():
        if key not in MIXTURE_KEYS:
            raise _unknown_nested(key, "dataset_mixture", source, MIXTURE_KEYS)
        if key == "seed":
            out[key] = _coerce(item, int, "dataset_mixture.seed", source)
        elif key == "test_split_size":
            out[key] = _test_split_size(item, "dataset_mixture.test_split_size", source)
    out["datasets"] = [_mixture_entry(e, i, source) for i, e in enumerate(mixture["datasets"])]
    columns = [set(e["columns"]) for e in out["datasets"] if e.get("columns")]
    if any(c != columns[0] for c in columns):
        raise ConfigError(
            f"dataset_mixture {source} selects different columns in different entries ({[sorted(c) for c in columns]}); "
            "the mixed datasets must share their columns."
        )
    return out


def _mixture_entry(entry: Any, index: int, source: str) -> dict[str, Any]:
    where = f"dataset_mixture.datasets[{index}]"
    if isinstance(entry, str):
        entry = {"id": entry}
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{where} {source} must be a mapping like {{id: ..., split: train}}, got {entry!r}."
        )
    out: dict[str, Any] = {}
    for key, item in entry.items():
        name = _MIXTURE_ENTRY_ALIASES.get(key, key)
        if name not in MIXTURE_ENTRY_KEYS:
            raise _unknown_nested(key, where, source, MIXTURE_ENTRY_KEYS)
        if name in out:
            raise _conflict(key, name, source)
        out[name] = _coerce(item, _MIXTURE_ENTRY_HINTS[name], f"{where}.{key}", source)
    if "id" not in out:
        raise ConfigError(f"{where} {source} has no 'id'; name the dataset (a hub id or a local path).")
    weight = out.get("weight")
    if weight is not None and not 0 < weight <= 1:
        raise ConfigError(
            f"{where}.weight = {weight!r} {source} is out of range: expected a fraction in (0, 1]."
        )
    return out


def check_card(value: Any, source: str) -> dict[str, Any]:
    """card: {license: mit, language: [en], ...} with its keys checked and values typed; a null key is unset.
    SOURCE says where VALUE came from in errors ("in recipe.yaml", "on the command line")."""
    if isinstance(value, str):
        value = _yaml_value(value, "card", source)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"card {source} must be a mapping like {{license: mit, language: [en]}}, got {value!r}."
        )
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in CARD_KEYS:
            raise _unknown_nested(key, "card", source, CARD_KEYS)
        if item is not None:
            out[key] = _coerce(item, CARD_TYPES[key], f"card.{key}", source)
    return out


def _test_split_size(value: Any, key: str, source: str) -> int | float | None:
    """A held-out size: a fraction in (0, 1) or a whole row count (an int, which `datasets` reads as rows)."""
    size = _coerce(value, int | float | None, key, source)
    if size is not None and not (0 < size < 1 or (size >= 1 and size == int(size))):
        raise ConfigError(
            f"{key} = {size!r} {source} is out of range: expected a fraction in (0, 1) or a whole row count."
        )
    return int(size) if size is not None and size >= 1 else size


def _unknown_nested(key: Any, where: str, source: str, valid: tuple[str, ...]) -> ConfigError:
    close = _suggest(str(key), valid)
    hint = f"did you mean {close}?" if close else f"valid keys: {', '.join(valid)}."
    return ConfigError(f"Unknown key '{key}' in {where} {source}; {hint}")


# ---------------------------------------------------------------------------------------------- ranges


class _Checks:
    """Range and consistency checks on a built config; each error names the values and where they were set."""

    def __init__(self, cfg: RecipeConfig, where: dict[str, str]):
        self.cfg, self.where = cfg, where

    def at(self, key: str) -> str:
        return f"{key} = {getattr(self.cfg, key)!r} ({self.where.get(key, 'the default')})"

    def need(self, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{self.at(key)} is out of range: expected {expected}.")

    def exclusive(self, a: str, b: str, why: str) -> None:
        raise ConfigError(f"{self.at(a)} and {self.at(b)} cannot be combined: {why}.")

    def at_least(self, key: str, low: float, *, optional: bool = False) -> None:
        value = getattr(self.cfg, key)
        if not (optional and value is None):
            self.need(value >= low, key, f"{'null or ' if optional else ''}a number >= {low}")

    def steps(self, key: str, *, optional: bool = False) -> None:
        """A step count: whole and >= 1, or a fraction of the run below 1 (Transformers' convention)."""
        value = getattr(self.cfg, key)
        if not (optional and value is None):
            self.need(
                value > 0 and (value < 1 or value == int(value)),
                key,
                "a whole number >= 1, or a fraction < 1",
            )


def _validate(cfg: RecipeConfig, where: dict[str, str]) -> None:
    """Refuse values out of range and keys that contradict each other; the first problem found is raised."""
    check = _Checks(cfg, where)
    _check_training(cfg, check)
    _check_data(cfg, check)
    if isinstance(cfg, DPOConfig):
        _check_dpo(cfg, check)
    if isinstance(cfg, CPOConfig):
        _check_cpo(cfg, check)
    if isinstance(cfg, ORPOConfig):
        _check_orpo(cfg, check)
    if isinstance(cfg, KTOConfig):
        _check_kto(cfg, check)


def _check_training(cfg: RecipeConfig, check: _Checks) -> None:
    # The optimizer table's own rule and words, so that a name the loop would refuse is refused here, first.
    try:
        optimizer_name(cfg)
    except ConfigError as err:
        close = _suggest(cfg.optim.lower(), list(OPTIMIZERS))
        hint = f"; did you mean {close}?" if close else "."
        raise ConfigError(f"{check.at('optim')}: {err}{hint}") from None
    check.at_least("learning_rate", 0)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check.at_least(key, 1)
    check.need(cfg.max_steps == -1 or cfg.max_steps > 0, "max_steps", "-1 (use num_train_epochs) or >= 1")
    check.need(
        cfg.num_train_epochs > 0 or cfg.max_steps > 0, "num_train_epochs", "a number > 0, or max_steps >= 1"
    )
    check.need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "a fraction in [0, 1)")
    warmup = cfg.warmup_steps
    check.need(warmup >= 0 and (warmup < 1 or warmup == int(warmup)), "warmup_steps",
               "a whole number >= 0, or a fraction in [0, 1)")  # fmt: skip
    if cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        check.exclusive("warmup_ratio", "warmup_steps", "both set the warmup length; set one of them")
    for key in ("adam_beta1", "adam_beta2"):
        check.need(0 <= getattr(cfg, key) < 1, key, "a number in [0, 1)")
    check.need(cfg.adam_epsilon > 0, "adam_epsilon", "a number > 0")
    check.at_least("weight_decay", 0)
    check.at_least("max_grad_norm", 0)  # 0 turns clipping off
    check.steps("logging_steps")
    check.steps("save_steps")
    check.steps("eval_steps", optional=True)
    for key in ("save_total_limit", "max_length", "dataset_num_proc"):
        check.at_least(key, 1, optional=True)
    check.at_least("dataloader_num_workers", 0)
    check.at_least("ddp_timeout", 1)
    check.at_least("lora_r", 1)
    check.need(cfg.lora_alpha > 0, "lora_alpha", "a number > 0")
    check.need(0 <= cfg.lora_dropout < 1, "lora_dropout", "a fraction in [0, 1)")
    if cfg.bf16 and cfg.fp16:
        check.exclusive("bf16", "fp16", "pick one mixed-precision type")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        check.exclusive("load_in_4bit", "load_in_8bit", "pick one quantisation")
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(cfg, key) and not cfg.use_peft:
            check.exclusive(
                key, "use_peft", "quantised weights cannot be trained; set use_peft: true (QLoRA)"
            )


def _check_data(cfg: RecipeConfig, check: _Checks) -> None:
    forms = [k for k in ("dataset_name", "dataset_mixer", "dataset_mixture") if getattr(cfg, k)]
    if len(forms) > 1:
        check.exclusive(forms[0], forms[1], "a recipe names its data in exactly one of these forms")
    for source, amount in (cfg.dataset_mixer or {}).items():
        check.need(0 < amount <= 1 or (amount > 1 and amount == int(amount)), "dataset_mixer",
                   f"for {source}: a fraction in (0, 1] or a whole row count > 1")  # fmt: skip
    if cfg.dataset_mixer and cfg.dataset_configs is not None:
        check.need(len(cfg.dataset_configs) == len(cfg.dataset_mixer), "dataset_configs",
                   f"one config per dataset_mixer source ({len(cfg.dataset_mixer)})")  # fmt: skip
    if cfg.dataset_mixer and cfg.test_split_size is not None:
        check.exclusive(
            "test_split_size", "dataset_mixer", "dataset_mixer takes its test data from dataset_splits"
        )
    template = cfg.chat_template
    if template not in ("auto", "zephyr") and "{%" not in template and "{{" not in template:
        # The forms zephyr.data.templates accepts, checked here so that a typo fails before the model loads.
        check.need(Path(template).expanduser().is_file(), "chat_template",
                   "'auto', 'zephyr', a Jinja template string, or the path of an existing .jinja file")  # fmt: skip


def _check_dpo(cfg: DPOConfig, check: _Checks) -> None:
    check.need(cfg.beta > 0, "beta", "a number > 0")
    check.need(len(cfg.loss_type) >= 1, "loss_type", "at least one loss type")
    for name in cfg.loss_type:  # each loss's range, and why, is in objectives.LOSS_RULES
        allowed = LOSS_RULES[name].label_smoothing
        check.need(
            cfg.label_smoothing in allowed, "label_smoothing", f"a number in {allowed} for loss_type {name}"
        )
    if cfg.loss_weights is not None:
        check.need(len(cfg.loss_weights) == len(cfg.loss_type), "loss_weights",
                   f"one weight per loss_type ({len(cfg.loss_type)})")  # fmt: skip
    check.at_least("precompute_ref_batch_size", 1, optional=True)
    _check_lengths(cfg, check)
    check.at_least("rpo_alpha", 0, optional=True)
    check.need(cfg.ld_alpha is None or 0 <= cfg.ld_alpha <= 1, "ld_alpha", "null or a number in [0, 1]")
    check.need(cfg.discopop_tau > 0, "discopop_tau", "a number > 0")
    check.need(cfg.f_alpha_divergence_coef > 0, "f_alpha_divergence_coef", "a number > 0")
    check.need(0 <= cfg.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "a number in [0, 1]")
    check.at_least("ref_model_sync_steps", 1)
    if cfg.f_divergence_type != "reverse_kl":
        unsupported = [t for t in cfg.loss_type if not LOSS_RULES[t].f_divergence]
        if unsupported:
            check.exclusive(
                "f_divergence_type", "loss_type", f"{', '.join(unsupported)} has no f-divergence form"
            )
    sorting = [t for t in cfg.loss_type if LOSS_RULES[t].sorts_batch]
    if cfg.use_weighting and sorting:
        check.exclusive(
            "use_weighting",
            "loss_type",
            f"{sorting[0]} sorts the batch, losing the pairs the per-pair weights are for",
        )
    if cfg.reference_free and cfg.ref_model_name_or_path:
        check.exclusive(
            "reference_free", "ref_model_name_or_path", "a reference-free run loads no reference model"
        )
    if cfg.precompute_ref_log_probs and cfg.sync_ref_model:
        check.exclusive(
            "precompute_ref_log_probs", "sync_ref_model", "a reference that moves cannot be precomputed"
        )


def _check_cpo(cfg: CPOConfig, check: _Checks) -> None:
    check.need(cfg.beta > 0, "beta", "a number > 0")
    check.need(
        cfg.label_smoothing in LABEL_SMOOTHING_RANGE,
        "label_smoothing",
        f"a number in {LABEL_SMOOTHING_RANGE}",
    )
    if cfg.label_smoothing > 0 and not CPO_LOSS_RULES[cfg.loss_type].label_smoothing:
        # TRL only warns and ignores it; a key that would be ignored is refused here.
        check.exclusive("label_smoothing", "loss_type", f"the {cfg.loss_type} loss has no label smoothing")
    check.at_least("cpo_alpha", 0)
    check.at_least("simpo_gamma", 0)
    _check_lengths(cfg, check)


def _check_orpo(cfg: ORPOConfig, check: _Checks) -> None:
    check.need(cfg.beta > 0, "beta", "a number > 0")
    if cfg.padding_free:
        raise ConfigError(
            f"{check.at('padding_free')} does not apply to ORPO: its NLL scores the prompt too, which the packed "
            "layout does not; remove padding_free (ORPO runs in TRL's two padded rows per pair)."
        )
    _check_lengths(cfg, check)


def _check_kto(cfg: KTOConfig, check: _Checks) -> None:
    check.need(cfg.beta > 0, "beta", "a number > 0")
    for key in ("desirable_weight", "undesirable_weight"):
        check.need(getattr(cfg, key) is None or getattr(cfg, key) > 0, key, "null or a number > 0")
    if cfg.loss_type == "kto" and cfg.per_device_train_batch_size < 2:
        # TRL refuses it too: the batch's only mismatched pair would be the example itself.
        raise ConfigError(
            f"{check.at('per_device_train_batch_size')} is too small for loss_type kto, whose KL estimate pairs "
            "each prompt with another example's completion in the same micro-batch; use 2 or more."
        )
    if cfg.precompute_ref_log_probs:
        raise ConfigError(
            f"{check.at('precompute_ref_log_probs')} is not supported by zephyr kto yet (its reference log-probs "
            "are computed in each step); remove it from the recipe."
        )
    if cfg.padding_free:
        raise ConfigError(
            f"{check.at('padding_free')} does not apply to KTO, which runs in TRL's padded rows; remove it."
        )


def _check_lengths(cfg: DPOConfig | CPOConfig | ORPOConfig, check: _Checks) -> None:
    for key in ("max_prompt_length", "max_completion_length"):
        check.at_least(key, 1, optional=True)
    if (
        cfg.max_prompt_length is not None
        and cfg.max_length is not None
        and cfg.max_prompt_length >= cfg.max_length
    ):
        raise ConfigError(
            f"{check.at('max_prompt_length')} must be less than {check.at('max_length')}, or no completion token "
            "would fit; lower max_prompt_length or raise max_length."
        )
