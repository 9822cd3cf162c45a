"""The model card: RUN_DIR/README.md laid out like the zephyr-7b-alpha card, filled only from what the run recorded.

    write_card("outputs/zephyr-7b-dpo")                          # the recipe's own `card:` mapping, as recorded
    write_card("outputs/zephyr-7b-dpo", card={"license": "mit"})  # or an explicit one

What the run knows comes from its folder: its RunRecord (`zephyr_run.json`: stage, base model, recipe, process count,
log history, library versions), `generation_config.json` (the sampling defaults of the inference example), the
weights' headers (the parameter count), `eval_prefs.json` (held-out preference metrics) and `mt-bench/scores.json`
(`zephyr eval mt-bench --output RUN_DIR/mt-bench`). What it cannot know (license, language, intended uses,
limitations, the hub names of local data) comes from the recipe's `card:` mapping (keys: zephyr.config.CARD_KEYS);
where a key is unset the card says so in a plain sentence rather than leaving a placeholder.

huggingface_hub writes the card: ModelCardData the YAML metadata, EvalResult the model-index, ModelCard the file,
from CARD_TEMPLATE, our own text rather than the hub's default template.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from zephyr.errors import ZephyrError
from zephyr.recipe import check_card
from zephyr.run_record import RECORD_FILE, RunRecord
from zephyr.train.results import DPO_COLUMNS, results_table

REFERENCE_FREE_STAGES = ("cpo", "simpo", "orpo")  # preference objectives without a reference model
STAGE_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "Direct Preference Optimization (DPO)",
    "cpo": "Contrastive Preference Optimization (CPO)",
    "simpo": "Simple Preference Optimization (SimPO)",
    "orpo": "Odds Ratio Preference Optimization (ORPO)",
    "kto": "Kahneman-Tversky Optimization (KTO)",
}
# framework_versions keys as people write the library names.
LIBRARY_NAMES = {
    "zephyr": "Zephyr", "transformers": "Transformers", "torch": "PyTorch", "accelerate": "Accelerate",
    "datasets": "Datasets", "tokenizers": "Tokenizers", "peft": "PEFT",
}  # fmt: skip
# The inference example's conversation.
EXAMPLE_MESSAGES = [
    ("system", "You are a helpful assistant who answers in a few clear sentences."),
    ("user", "Why do onions make people cry when they are cut?"),
]
_SAMPLING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")
# The task of every model-index result.
TASK = {"task_type": "text-generation", "task_name": "Text Generation"}

# The Jinja template ModelCard.from_template fills: the zephyr-7b-alpha card's sections in its order, each field a
# piece of Markdown from card_sections. It ends in a blank line because Jinja drops a template's last newline.
CARD_TEMPLATE = """\
---
{{ card_data }}
---

# Model Card for {{ title }}

{{ description }}

## Model description

{{ model_facts }}

## Intended uses & limitations

{{ intended_uses }}

{{ inference_example }}

## Bias, Risks, and Limitations

{{ limitations }}

## Training and evaluation data

{{ data }}

{{ evaluation }}

### Training hyperparameters

The following hyperparameters were used during training:

{{ hyperparameters }}

### Training results

{{ results }}

### Framework versions

{{ framework_versions }}

"""


@dataclass
class Run:
    """What a card is written from: RUN_DIR's record and the files beside it."""

    folder: Path
    record: RunRecord
    card: dict[str, Any]  # the recipe's `card:` mapping
    generation: dict[str, Any]  # generation_config.json, {} when absent
    model_config: dict[str, Any]  # config.json (base_config/config.json for a LoRA adapter), {} when absent
    eval_prefs: dict[str, Any] | None  # eval_prefs.json
    mt_bench: dict[str, Any] | None  # mt-bench/scores.json

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def stage(self) -> str:
        return self.record.stage

    @property
    def model_id(self) -> str:
        """What the inference example loads: the card's model_id, else the recipe's hub_model_id, else the folder."""
        return self.card.get("model_id") or self.config.get("hub_model_id") or str(self.folder)

    @property
    def name(self) -> str:
        named = self.card.get("model_id") or self.config.get("hub_model_id")
        return named.rstrip("/").rsplit("/", 1)[-1] if named else self.folder.resolve().name

    @property
    def base_model(self) -> str:
        return self.record.base_model or self.config.get("model_name_or_path")

    @property
    def is_adapter(self) -> bool:
        return (self.folder / "adapter_config.json").is_file()

    @property
    def processes(self) -> int | None:
        """The run's process count; None for a record written before process counts were kept."""
        return self.record.num_processes


# ---------------------------------------------------------------------------------------------- public API


def write_card(run_dir: str | Path, *, card: dict | None = None) -> Path:
    """Write RUN_DIR/README.md, the model card of the `zephyr sft` / `zephyr dpo` output folder RUN_DIR, and return
    its path. CARD is the recipe's `card:` mapping (keys: zephyr.config.CARD_KEYS), used in place of the one
    recorded with the run; None uses the recorded one."""
    run = read_run(run_dir, card=card)
    path = run.folder / "README.md"
    model_card(run).save(path)
    return path


def read_run(run_dir: str | Path, *, card: dict | None = None) -> Run:
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ZephyrError(
            f"{folder} is not a folder; give the output folder of a `zephyr sft` or `zephyr dpo` run "
            "(its output_dir)."
        )
    record = RunRecord.read(folder)
    model_config = folder / "config.json"
    if not model_config.is_file():
        model_config = folder / "base_config" / "config.json"  # a LoRA adapter folder
    return Run(
        folder=folder,
        record=record,
        card=check_card(record.config.get("card"), f"in {folder / RECORD_FILE}")
        if card is None
        else check_card(card, "given for the model card"),
        generation=_read_json(folder / "generation_config.json", optional=True) or {},
        model_config=_read_json(model_config, optional=True) or {},
        eval_prefs=_read_json(folder / "eval_prefs.json", optional=True),
        mt_bench=_read_json(folder / "mt-bench" / "scores.json", optional=True),
    )


def model_card(run: Run) -> ModelCard:
    """RUN's card: card_metadata as the YAML front matter, card_sections filling CARD_TEMPLATE below it."""
    return ModelCard.from_template(card_metadata(run), template_str=CARD_TEMPLATE, **card_sections(run))


def card_metadata(run: Run) -> ModelCardData:
    """The YAML front matter: license, base model, datasets, language, tags and the model-index of eval results."""
    config = run.config
    # The hub's metadata names hub repositories; a local path is only described in the text.
    base = run.card.get("base_model") or (run.base_model if _is_hub_id(run.base_model) else None)
    datasets = run.card.get("datasets") or [d for d in _dataset_ids(config) if _is_hub_id(d)]
    objective = []
    if run.stage == "dpo":
        objective = _loss_types(config)
    elif (run.stage in REFERENCE_FREE_STAGES or run.stage == "kto") and "loss_type" in config:  # ORPO: none
        objective = [config["loss_type"]]
    tags = ["zephyr", run.stage, *objective]
    if config.get("use_peft"):
        tags.append("lora")
    return ModelCardData(
        license=run.card.get("license", "unknown"),
        base_model=base,
        datasets=list(datasets) or None,
        language=list(run.card.get("language") or []) or None,
        library_name="peft" if run.is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags + run.card.get("tags", []),  # ModelCardData drops repeats, keeping the first
        model_name=run.name,
        # [] still writes a model-index (with no results), as Transformers' Trainer cards do.
        eval_results=_eval_results(run),
    )


def card_sections(run: Run) -> dict[str, str]:
    """CARD_TEMPLATE's fields: the Markdown of each section of the card."""
    return {
        "title": run.name,
        "description": _description(run),
        "model_facts": _model_facts(run),
        "intended_uses": run.card.get("intended_uses") or _default_intended_uses(run),
        "inference_example": _inference_example(run),
        "limitations": run.card.get("limitations") or _default_limitations(run),
        "data": _data_text(run),
        "evaluation": _evaluation_text(run),
        "hyperparameters": _bullets(_hyperparameters(run)),
        "results": _results_text(run),
        "framework_versions": _bullets(_framework_versions(run)),
    }


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: Path, *, optional: bool = False) -> Any:
    if optional and not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ZephyrError(
            f"{path} is not valid JSON (line {e.lineno}: {e.msg}); rewrite or restore it."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZephyrError(f"{path} cannot be read ({e}); check the file.") from None


def _is_hub_id(name: Any) -> bool:
    """Whether NAME reads as a hub repository id (owner/name) rather than a local path."""
    return (
        isinstance(name, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
        and not Path(name).exists()
    )


def _dataset_ids(config: dict[str, Any]) -> list[str]:
    """The sources of a recipe's data, in whichever of the three forms it names them."""
    if config.get("dataset_name"):
        return [config["dataset_name"]]
    if config.get("dataset_mixer"):
        return list(config["dataset_mixer"])
    mixture = config.get("dataset_mixture") or {}
    ids = [entry["id"] for entry in mixture.get("datasets", [])]
    return list(dict.fromkeys(ids))


def _loss_types(config: dict[str, Any]) -> list[str]:
    losses = config.get("loss_type") or ["sigmoid"]
    return [losses] if isinstance(losses, str) else list(losses)


def _final_eval(log_history: list[dict]) -> dict[str, Any]:
    """The last evaluation's log entry, or {} when the run evaluated nothing."""
    evals = [entry for entry in log_history if "eval_loss" in entry]
    return evals[-1] if evals else {}


def _metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{name: value} of the numeric metrics in VALUES with keys PREFIX + name, in the card's order (the results
    table's columns first), leaving out timings."""
    found = {
        key[len(prefix) :]: value
        for key, value in values.items()
        if key.startswith(prefix)
        and _is_number(value)
        and not key.endswith(("_runtime", "_per_second"))
        and key[len(prefix) :] not in ("step", "epoch")
    }
    order = [eval_key.removeprefix("eval_") for _, _, eval_key in DPO_COLUMNS if eval_key]
    return {
        name: found[name]
        for name in sorted(found, key=lambda n: order.index(n) if n in order else len(order))
    }


def _parameter_count(folder: Path) -> int | None:
    """Parameters stored in FOLDER's safetensors files, summed from their headers (the weights are not read)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError, MemoryError):
            raise ZephyrError(
                f"{path} has no readable safetensors header; the weights file is damaged."
            ) from None
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total or None


# ---------------------------------------------------------------------------------------------- front matter


def _eval_results(run: Run) -> list[EvalResult]:
    """The model-index, one EvalResult per metric. The hub groups results by task and dataset (type, split), so the
    three sources (the final eval, eval_prefs.json, MT-Bench) stay three entries as long as their datasets differ."""
    results = []
    final = _metrics(_final_eval(run.record.log_history), prefix="eval_")
    if final:
        names = run.card.get("datasets") or _dataset_ids(run.config)
        # A named split only when the eval read one whole (dataset_name with no test_split_size carved out).
        whole_split = run.config.get("dataset_name") and run.config.get("test_split_size") is None
        dataset = {
            "dataset_name": ", ".join(names),
            "dataset_type": names[0] if len(names) == 1 else "mixture",
            "dataset_split": run.config.get("dataset_test_split") if whole_split else None,
        }
        results += _metric_results(dataset, final)
    prefs = _metrics(run.eval_prefs or {})
    if prefs:
        name = run.eval_prefs.get("dataset") if isinstance(run.eval_prefs.get("dataset"), str) else None
        dataset = {
            "dataset_name": name or "held-out preference pairs",
            "dataset_type": name or "preference-pairs",
        }
        results += _metric_results(dataset, prefs)
    results += [
        EvalResult(**TASK, dataset_name="MT-Bench", dataset_type="mt-bench", metric_type="mt-bench",
                   metric_name=f"MT-Bench ({label})", metric_value=value)
        for label, value in _mt_bench_scores(run.mt_bench).items()
    ]  # fmt: skip
    return results


def _metric_results(dataset: dict[str, Any], metrics: dict[str, float]) -> list[EvalResult]:
    return [
        EvalResult(**TASK, **dataset, metric_type=name, metric_name=_metric_title(name), metric_value=value)
        for name, value in metrics.items()
    ]


def _mt_bench_scores(scores: dict[str, Any] | None) -> dict[str, float]:
    """{label: score} from mt-bench/scores.json: overall, each turn, each category; unscored (null) ones left out."""
    if not scores:
        return {}
    labelled = {
        "overall": scores.get("overall"),
        "turn 1": scores.get("turn_1"),
        "turn 2": scores.get("turn_2"),
    }
    labelled.update(scores.get("categories") or {})
    return {k: v for k, v in labelled.items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- sections


def _description(run: Run) -> str:
    if run.card.get("description"):
        return run.card["description"]
    config = run.config
    method = STAGE_NAMES.get(run.stage, run.stage) + (
        " through a LoRA adapter" if config.get("use_peft") else ""
    )
    data = ", ".join(f"`{d}`" for d in run.card.get("datasets") or _dataset_ids(config))
    steps = [e["step"] for e in run.record.log_history if "step" in e]
    epochs = [e["epoch"] for e in run.record.log_history if "epoch" in e]
    length = f" for {max(steps)} optimizer steps" if steps else ""
    if steps and epochs:
        length += f" ({_plain(max(epochs))} epoch{'' if max(epochs) == 1 else 's'})"
    version = f" {run.record.zephyr_version}" if run.record.zephyr_version else ""
    text = (
        f"{run.name} is `{run.base_model}` fine-tuned with {method} on {data}{length}. It was trained with "
        f"Zephyr{version}, a reproduction of the Zephyr-7B recipe (supervised fine-tuning on chat dialogues, then "
        f"DPO on preference pairs), and is the output of its {run.stage.upper()} stage."
    )
    if run.stage in ("dpo", *REFERENCE_FREE_STAGES):
        reference = (
            "without a reference model"
            if config.get("reference_free") or run.stage in REFERENCE_FREE_STAGES
            else "against a frozen reference model"
        )
        text += (
            f" It was trained to rank the chosen response of each pair above the rejected one, {reference}."
        )
    if run.stage == "kto":
        text += (
            " It was trained to raise the likelihood of responses labelled desirable and lower that of responses "
            "labelled undesirable, each against a frozen reference model."
        )
    return text


def _model_facts(run: Run) -> str:
    config, base = run.config, run.base_model
    count = _parameter_count(run.folder)
    arch = run.model_config.get("model_type")
    arch_text = f" ({arch} architecture)" if arch else ""
    if run.is_adapter:
        size = f" of {_human_count(count)} parameters" if count else ""
        rank = f"r={config.get('lora_r')}, alpha={config.get('lora_alpha')}"
        kind = f"A LoRA adapter{size} ({rank}) on `{base}`{arch_text}"
    else:
        size = f"A {_human_count(count)}-parameter" if count else "A"
        merged = ", with its LoRA adapter merged in" if config.get("use_peft") else ""
        kind = f"{size} causal language model{arch_text}{merged}"
    language = ", ".join(run.card["language"]) if run.card.get("language") else "not declared by the recipe"
    license_ = run.card.get("license") or (
        f"not declared by the recipe; the licenses of `{base}` and of the training data apply"
    )
    return _bullets([
        f"**Model type:** {kind}, fine-tuned with {STAGE_NAMES.get(run.stage, run.stage)}.",
        f"**Language(s) (NLP):** {language}",
        f"**License:** {license_}",
        f"**Finetuned from model:** `{base}`",
    ])  # fmt: skip


def _default_intended_uses(run: Run) -> str:
    return (
        "The recipe states no intended uses. The model was trained to answer as the assistant in conversations "
        "written with its chat template, which is saved with its tokenizer, so prompt it through that template. "
        "Here is how to run it with the `pipeline()` function of Transformers:"
    )


def _inference_example(run: Run) -> str:
    sampling = {k: run.generation[k] for k in _SAMPLING_KEYS if k in run.generation}
    if sampling.get("do_sample") is False:
        sampling = {k: v for k, v in sampling.items() if k in ("max_new_tokens", "do_sample")}
    arguments = "".join(f", {k}={v!r}" for k, v in sampling.items())
    messages = "\n".join(
        f"    dict(role={json.dumps(role)}, content={json.dumps(content)}),"
        for role, content in EXAMPLE_MESSAGES
    )
    adapter = (
        "# pip install peft  (this folder is a LoRA adapter; its base model is loaded with it)\n"
        if run.is_adapter
        else ""
    )
    return (
        "```python\n"
        f"{adapter}from transformers import pipeline\n\n"
        f'pipe = pipeline("text-generation", model={json.dumps(run.model_id)}, dtype="auto", device_map="auto")\n\n'
        "# The chat template formats the conversation the way the model saw conversations in training.\n"
        f"messages = [\n{messages}\n]\n"
        "prompt = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        f"outputs = pipe(prompt{arguments})\n"
        'print(outputs[0]["generated_text"])\n'
        "```"
    )


def _default_limitations(run: Run) -> str:
    base = run.base_model
    return (
        "The recipe states no limitations, and the run measured nothing beyond the metrics on this card. No safety "
        "filtering, red-teaming or harm evaluation of this model is recorded, so it can produce text that is false, "
        f"biased or harmful; check its outputs before relying on them. It also inherits the limitations of `{base}` "
        "and of its training data."
    )


def _data_text(run: Run) -> str:
    config = run.config
    if config.get("dataset_name"):
        name = f"`{config['dataset_name']}`" + (
            f" (config `{config['dataset_config']}`)" if config.get("dataset_config") else ""
        )
        text = f"Training used the `{config.get('dataset_train_split')}` split of {name}"
        held_out = config.get("test_split_size")
        if not _final_eval(run.record.log_history):
            text += "."
        elif held_out is not None:
            text += f"; evaluation used a held-out {_amount(held_out)} of it."
        else:
            text += f"; evaluation used its `{config.get('dataset_test_split')}` split."
    elif config.get("dataset_mixer"):
        splits = config.get("dataset_splits") or ["train", "test"]
        lines = [
            f"`{source}`: {_amount(amount)} of each train split"
            for source, amount in config["dataset_mixer"].items()
        ]
        text = f"Training used a mix of the following sources (splits {', '.join(splits)}):\n\n"
        text += _bullets(lines) + '\n\nSplits whose names contain "test" were used whole for evaluation.'
    else:
        mixture = config.get("dataset_mixture") or {}
        lines = [
            f"`{e['id']}`, split `{e.get('split', 'train')}`"
            + (f", {_amount(e['weight'])} of it" if e.get("weight") else "")
            for e in mixture.get("datasets", [])
        ]
        text = "Training used a mixture of:\n\n" + _bullets(lines)
        held_out = mixture.get("test_split_size", config.get("test_split_size"))
        if held_out is not None:
            text += f"\n\nEvaluation used a held-out {_amount(held_out)} of the mixture."
    if run.card.get("datasets"):
        text += (
            "\n\nThe recipe names this data as: " + ", ".join(f"`{d}`" for d in run.card["datasets"]) + "."
        )
    return text


def _evaluation_text(run: Run) -> str:
    parts = []
    final = _final_eval(run.record.log_history)
    metrics = _metrics(final, prefix="eval_")
    if metrics:
        at = f" (step {final['step']})" if "step" in final else ""
        parts.append(
            f"{run.name} achieves the following results on the evaluation set at the end of training{at}:"
        )
        parts.append(_bullets([f"{_metric_title(k)}: {_number(v)}" for k, v in metrics.items()]))
    else:
        parts.append(
            f"No evaluation ran during training (eval_strategy: {run.config.get('eval_strategy', 'no')})."
        )
    prefs = _metrics(run.eval_prefs or {})
    if prefs:
        parts.append("On held-out preference pairs, measured after training (`eval_prefs.json`):")
        parts.append(_bullets([f"{_metric_title(k)}: {_number(v)}" for k, v in prefs.items()]))
    scores = _mt_bench_scores(run.mt_bench)
    if scores:
        judge, questions = run.mt_bench.get("judge_model"), run.mt_bench.get("questions")
        by = f", judged by `{judge}`" if isinstance(judge, str) else ""
        over = f" over {questions} questions" if isinstance(questions, int) else ""
        parts.append(f"#### MT-Bench\n\nMT-Bench scores (1 to 10{by}{over}), from `mt-bench/scores.json`:")
        parts.append(
            _bullets([f"{label[:1].upper() + label[1:]}: {_number(v)}" for label, v in scores.items()])
        )
        failed = run.mt_bench.get("failed_judgments")
        failed = len(failed) if isinstance(failed, (list, dict)) else failed
        if failed:
            parts.append(f"{failed} judgments could not be parsed and are left out of these averages.")
        if (run.folder / "mt-bench" / "categories.png").is_file():
            parts.append("![MT-Bench score by category](mt-bench/categories.png)")
    return "\n\n".join(parts)


def _hyperparameters(run: Run) -> list[str]:
    """The card's "key: value" hyperparameter lines, in its order, then what Zephyr adds (lengths, DPO, LoRA).
    Runs recorded before process counts were kept have no distributed_type, num_devices or total batch sizes."""
    config, record = run.config, run.record
    processes = run.processes
    lines = [
        f"learning_rate: {config.get('learning_rate')}",
        f"train_batch_size: {config.get('per_device_train_batch_size')}",
        f"eval_batch_size: {config.get('per_device_eval_batch_size')}",
        f"seed: {config.get('seed')}",
    ]
    if processes is not None:
        lines.append(f"distributed_type: {'multi-process' if processes > 1 else 'single process'}")
        lines.append(f"num_devices: {processes}")
    lines.append(f"gradient_accumulation_steps: {config.get('gradient_accumulation_steps')}")
    if processes is not None:
        train_total = record.total_train_batch_size or (
            config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * processes
        )
        eval_total = record.total_eval_batch_size or config["per_device_eval_batch_size"] * processes
        lines.append(f"total_train_batch_size: {train_total}")
        lines.append(f"total_eval_batch_size: {eval_total}")
    lines.append(f"optimizer: {_optimizer(config)}")
    lines.append(f"lr_scheduler_type: {config.get('lr_scheduler_type')}")
    # Transformers 5 reads a warmup_steps below 1 as a ratio of the run.
    warmup_steps = config.get("warmup_steps") or 0
    if config.get("warmup_ratio") or (0 < warmup_steps < 1):
        lines.append(f"lr_scheduler_warmup_ratio: {config.get('warmup_ratio') or warmup_steps}")
    elif warmup_steps >= 1:
        lines.append(f"lr_scheduler_warmup_steps: {int(warmup_steps)}")
    if (config.get("max_steps") or -1) > 0:
        lines.append(f"training_steps: {config['max_steps']}")
    else:
        lines.append(f"num_epochs: {_plain(config.get('num_train_epochs'))}")
    if record.mixed_precision not in (None, "no"):
        lines.append(f"mixed_precision_training: {record.mixed_precision}")
    if config.get("max_length") is not None:
        lines.append(f"max_length: {config['max_length']}")
    if run.stage == "dpo":
        lines += _dpo_hyperparameters(run)
    elif run.stage == "orpo":
        lines += _orpo_hyperparameters(run)
    elif run.stage == "kto":
        lines += _kto_hyperparameters(run)
    elif run.stage in REFERENCE_FREE_STAGES:
        lines += _cpo_hyperparameters(run)
    else:
        lines += [
            f"packing: {config.get('packing')}",
            f"assistant_only_loss: {config.get('assistant_only_loss')}",
        ]
    if config.get("use_peft"):
        targets = config.get("lora_target_modules") or "all-linear"
        lines += [
            f"lora_r: {config.get('lora_r')}",
            f"lora_alpha: {config.get('lora_alpha')}",
            f"lora_dropout: {config.get('lora_dropout')}",
            f"lora_target_modules: {targets if isinstance(targets, str) else ', '.join(targets)}",
        ]
        lines += [
            f"{key}: true"
            for key in ("use_rslora", "use_dora", "load_in_4bit", "load_in_8bit")
            if config.get(key)
        ]
    return lines


def _cpo_hyperparameters(run: Run) -> list[str]:
    """CPO / SimPO: TRL CPOConfig's keys that shape the objective."""
    config = run.config
    lines = [f"beta: {config.get('beta')}", f"loss_type: {config.get('loss_type')}"]
    lines += [
        f"{key}: {config[key]}" for key in ("cpo_alpha", "simpo_gamma", "label_smoothing") if key in config
    ]
    if config.get("max_prompt_length") is not None:
        lines.append(f"max_prompt_length: {config['max_prompt_length']}")
    return lines + ["reference_model: none (reference-free)"]


def _kto_hyperparameters(run: Run) -> list[str]:
    """KTO: TRL KTOConfig's keys that shape the objective; the class weights as the run used them."""
    config = run.config
    lines = [
        f"{key}: {config.get(key)}" for key in ("beta", "loss_type", "desirable_weight", "undesirable_weight")
    ]
    if run.record.reference_model:
        lines.append(f"reference_model: {run.record.reference_model}")
    return lines


def _orpo_hyperparameters(run: Run) -> list[str]:
    """ORPO: TRL ORPOConfig's `beta` (the paper's λ, the odds-ratio term's weight against the NLL)."""
    config = run.config
    lines = [f"beta: {config.get('beta')}"]
    if config.get("max_prompt_length") is not None:
        lines.append(f"max_prompt_length: {config['max_prompt_length']}")
    return lines + ["reference_model: none (reference-free)"]


def _dpo_hyperparameters(run: Run) -> list[str]:
    config = run.config
    losses = _loss_types(config)
    loss = " + ".join(losses)
    if config.get("loss_weights") and len(losses) > 1:
        loss += f" (weights {', '.join(_plain(w) for w in config['loss_weights'])})"
    lines = [f"beta: {config.get('beta')}", f"loss_type: {loss}"]
    if config.get("label_smoothing"):
        lines.append(f"label_smoothing: {config['label_smoothing']}")
    if config.get("max_prompt_length") is not None:
        lines.append(f"max_prompt_length: {config['max_prompt_length']}")
    if config.get("reference_free"):
        lines.append("reference_model: none (reference-free)")
    elif run.record.reference_model:
        lines.append(f"reference_model: {run.record.reference_model}")
    return lines


def _optimizer(config: dict[str, Any]) -> str:
    name = config.get("optim")
    text = name
    if "adam" in str(name):
        betas = f"({config.get('adam_beta1')},{config.get('adam_beta2')})"
        text += f" with betas={betas} and epsilon={config.get('adam_epsilon')}"
    if config.get("weight_decay"):
        text += f", weight_decay={config['weight_decay']}"
    return text


def _results_text(run: Run) -> str:
    log_history = run.record.log_history
    if not any("loss" in entry or "eval_loss" in entry for entry in log_history):
        return "The run logged no training steps."
    text = results_table(log_history, run.stage)
    if (run.folder / "training.png").is_file():
        text += "\n\n![Loss and reward curves over training steps](training.png)"
    return text


def _framework_versions(run: Run) -> list[str]:
    versions = run.record.framework_versions
    if versions:
        return [f"{LIBRARY_NAMES.get(name, name)} {version}" for name, version in versions.items()]
    # Runs recorded before framework_versions: what the folder itself says.
    lines = [f"Zephyr {run.record.zephyr_version}"] if run.record.zephyr_version else []
    written_by = run.generation.get("transformers_version") or run.model_config.get("transformers_version")
    if written_by:
        lines.append(f"Transformers {written_by} (the version that wrote the model files)")
    return lines or ["Not recorded by this run."]


# ---------------------------------------------------------------------------------------------- formatting


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _metric_title(name: str) -> str:
    """A metric's name as the card writes it: rewards/chosen -> Rewards/chosen, mean_token_accuracy -> Mean token
    accuracy."""
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


def _number(value: float) -> str:
    """A metric as the card prints it: a float with more than 4 decimals rounded to 4 (tiny or huge ones to 4
    significant digits), anything shorter as it is."""
    if not isinstance(value, float):
        return str(value)
    text = repr(value)
    if "e" in text:
        return f"{value:.4g}"
    return f"{value:.4f}" if len(text.partition(".")[2]) > 4 else text


def _plain(value: Any) -> str:
    """3.0 -> "3", 0.12 -> "0.12"."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _amount(value: int | float) -> str:
    """A fraction as a percentage, a whole count as rows."""
    return f"{value * 100:g}%" if isinstance(value, float) and value <= 1 else f"{value} rows"


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
