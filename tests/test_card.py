"""The model card (zephyr.card) written from hand-made run folders: every section of the zephyr-7b-alpha layout,
filled from the record, valid YAML metadata, no placeholders, and the recipe's `card:` key (zephyr.config)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from zephyr.card import write_card
from zephyr.config import config_to_dict
from zephyr.errors import ConfigError, ZephyrError
from zephyr.recipe import load_config
from zephyr.run_record import RECORD_FILE
from zephyr.train.results import results_table

UFB = "HuggingFaceH4/ultrafeedback_binarized"
GENERATION = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95, "max_new_tokens": 256,
              "transformers_version": "5.24.0"}  # fmt: skip
DPO_LOG = [
    {"step": 1, "epoch": 0.5, "loss": 0.6931, "rewards/chosen": 0.0, "rewards/accuracies": 0.0},
    {"step": 1, "epoch": 0.5, "eval_loss": 0.69, "eval_rewards/chosen": 0.01, "eval_rewards/rejected": -0.01},
    {"step": 2, "epoch": 1.0, "loss": 0.51234567},
    {"step": 2, "epoch": 1.0, "eval_loss": 0.46051234, "eval_rewards/chosen": -0.50531, "eval_rewards/rejected":
     -1.87524, "eval_rewards/accuracies": 0.78125, "eval_rewards/margins": 1.36993, "eval_logps/rejected":
     -258.04421, "eval_logps/chosen": -253.97662, "eval_logits/rejected": -2.78551, "eval_logits/chosen": -2.80602,
     "eval_runtime": 12.3, "eval_samples_per_second": 40.1},
]  # fmt: skip
# The final eval as the card's list writes it: 4 decimals, card order, timings left out.
DPO_FINAL = [
    "Loss: 0.4605", "Rewards/chosen: -0.5053", "Rewards/rejected: -1.8752", "Rewards/accuracies: 0.7812",
    "Rewards/margins: 1.3699", "Logps/rejected: -258.0442", "Logps/chosen: -253.9766", "Logits/rejected: -2.7855",
    "Logits/chosen: -2.8060",
]  # fmt: skip
SFT_LOG = [
    {"step": 5, "epoch": 0.5, "loss": 1.5},
    {"step": 10, "epoch": 1.0, "loss": 1.25},
    {"step": 10, "epoch": 1.0, "eval_loss": 1.3125, "eval_mean_token_accuracy": 0.625},
]
SECTIONS = [
    "## Model description", "## Intended uses & limitations", "## Bias, Risks, and Limitations",
    "## Training and evaluation data", "### Training hyperparameters", "### Training results",
    "### Framework versions",
]  # fmt: skip
DPO_ARGS = [
    f"--dataset_name={UFB}", "--dataset_train_split=train_prefs", "--dataset_test_split=test_prefs",
    "--per_device_train_batch_size=2", "--per_device_eval_batch_size=3", "--gradient_accumulation_steps=4",
    "--learning_rate=5e-7", "--warmup_ratio=0.1", "--num_train_epochs=1", "--beta=0.01", "--optim=adamw_torch",
    "--eval_strategy=steps", "--max_prompt_length=512",
]  # fmt: skip


def record(stage: str = "dpo", args=(), *, processes: int | None = 4, log=None, **extra) -> dict:
    """A zephyr_run.json as save_final writes it, for a recipe of ARGS run on PROCESSES processes (None: an older
    record without the process count, the totals and framework_versions)."""
    base = DPO_ARGS if stage == "dpo" else []
    merged = {arg.split("=")[0]: arg for arg in [*base, *args]}  # later arguments win
    cfg = load_config(stage, None, list(merged.values()))
    out = {"zephyr_version": "0.1.0", "stage": stage, "base_model": "alignment-handbook/zephyr-7b-sft-full"}
    if processes is not None:
        out |= {
            "num_processes": processes,
            "total_train_batch_size": cfg.global_batch_size(processes),
            "total_eval_batch_size": cfg.per_device_eval_batch_size * processes,
            "mixed_precision": "bf16",
            "framework_versions": {"zephyr": "0.1.0", "transformers": "5.24.0", "torch": "2.13.0"},
        }
    out |= {"config": config_to_dict(cfg), "log_history": DPO_LOG if log is None else log}
    if stage == "dpo":
        out["reference_model"] = out["base_model"]
    return out | extra


def make_run(
    folder: Path, rec: dict, *, generation: dict | None = GENERATION, files: dict | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(rec))  # by hand: some tests need old or broken records
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def split(card: str) -> tuple[dict, str]:
    """(front matter, Markdown body) of a card."""
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n\n", 1)
    return yaml.safe_load(front), body


def section(body: str, heading: str) -> str:
    """The text under HEADING, up to the next heading (code blocks skipped)."""
    text = body.split(f"\n{heading}\n", 1)[1]
    stops = [m.start() for m in re.finditer(r"^#+ ", _without_code(text), flags=re.M)]
    return text[: stops[0]] if stops else text


def _without_code(text: str) -> str:
    """TEXT with the characters of fenced code blocks blanked (same length), so '# comments' are not headings."""
    return re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)


def bullets(text: str) -> dict[str, str]:
    """{key: value} of TEXT's "- key: value" and "- **Key:** value" list lines."""
    found = (re.fullmatch(r"- (?:\*\*(.+?):\*\*|([^:]+):) (.*)", line) for line in text.splitlines())
    return {m[1] or m[2]: m[3] for m in found if m}


def write(tmp_path, rec=None, **kwargs) -> tuple[dict, str]:
    card = kwargs.pop("card", None)
    folder = make_run(tmp_path / "zephyr-7b-dpo", record() if rec is None else rec, **kwargs)
    path = write_card(folder, card=card)
    assert path == folder / "README.md"
    return split(path.read_text())


# ---------------------------------------------------------------------------------------------- layout


def test_every_section_is_there_in_the_cards_order_with_no_placeholder(tmp_path):
    meta, body = write(tmp_path)
    headings = [line for line in _without_code(body).splitlines() if line.startswith("#")]
    assert headings == ["# Model Card for zephyr-7b-dpo", *SECTIONS]
    for heading in SECTIONS:
        assert section(body, heading).strip(), heading
    card = (tmp_path / "zephyr-7b-dpo" / "README.md").read_text()
    for placeholder in ("[More Information Needed]", "{", "}", "TODO", "None", "nan"):
        assert placeholder not in card, placeholder


def test_defaults_say_plainly_what_the_recipe_did_not_declare(tmp_path):
    meta, body = write(tmp_path)
    facts = bullets(section(body, "## Model description"))
    assert facts["License"].startswith("not declared by the recipe")
    assert facts["Language(s) (NLP)"] == "not declared by the recipe"
    assert facts["Finetuned from model"] == "`alignment-handbook/zephyr-7b-sft-full`"
    intro = body.split("\n\n")[1]
    assert (
        "`alignment-handbook/zephyr-7b-sft-full` fine-tuned with Direct Preference Optimization (DPO)"
        in intro
    )
    assert f"on `{UFB}` for 2 optimizer steps (1 epoch)" in intro
    assert "output of its DPO stage" in intro and "against a frozen reference model" in intro
    assert (
        section(body, "## Bias, Risks, and Limitations")
        .strip()
        .startswith("The recipe states no limitations")
    )
    assert meta["license"] == "unknown" and "language" not in meta


def test_eval_results_are_the_final_evaluation_as_the_card_lists_them(tmp_path):
    _, body = write(tmp_path)
    data = section(body, "## Training and evaluation data")
    assert "Training used the `train_prefs` split of" in data and "its `test_prefs` split" in data
    listed = [line[2:] for line in data.splitlines() if line.startswith("- ")]
    assert listed == DPO_FINAL  # the step-2 eval, not step 1's; eval_runtime and samples/s left out
    assert "at the end of training (step 2)" in data


def test_hyperparameters_come_from_the_record(tmp_path):
    _, body = write(tmp_path)
    params = bullets(section(body, "### Training hyperparameters"))
    assert params == {
        "learning_rate": "5e-07",
        "train_batch_size": "2",
        "eval_batch_size": "3",
        "seed": "42",
        "distributed_type": "multi-process",
        "num_devices": "4",
        "gradient_accumulation_steps": "4",
        "total_train_batch_size": "32",  # 2 per device x 4 accumulation steps x 4 processes
        "total_eval_batch_size": "12",  # 3 per device x 4 processes
        "optimizer": "adamw_torch with betas=(0.9,0.999) and epsilon=1e-08",
        "lr_scheduler_type": "linear",
        "lr_scheduler_warmup_ratio": "0.1",
        "num_epochs": "1",
        "mixed_precision_training": "bf16",
        "max_length": "1024",
        "beta": "0.01",
        "loss_type": "sigmoid",
        "max_prompt_length": "512",
        "reference_model": "alignment-handbook/zephyr-7b-sft-full",
    }


def test_total_batch_sizes_are_computed_when_the_record_lacks_them(tmp_path):
    rec = record(processes=2)
    del rec["total_train_batch_size"], rec["total_eval_batch_size"]
    _, body = write(tmp_path, rec)
    params = bullets(section(body, "### Training hyperparameters"))
    assert (params["total_train_batch_size"], params["total_eval_batch_size"]) == ("16", "6")  # 2*4*2, 3*2
    assert (params["num_devices"], params["distributed_type"]) == ("2", "multi-process")


def test_step_budget_mixed_losses_and_warmup_steps(tmp_path):
    args = ["--max_steps=60", "--loss_type=sigmoid,sft", "--loss_weights=1.0,0.5", "--warmup_ratio=0",
            "--warmup_steps=7", "--weight_decay=0.01", "--label_smoothing=0.1", "--reference_free=true"]  # fmt: skip
    meta, body = write(tmp_path, record(args=args, processes=1))
    params = bullets(section(body, "### Training hyperparameters"))
    assert params["training_steps"] == "60" and "num_epochs" not in params
    assert params["loss_type"] == "sigmoid + sft (weights 1, 0.5)"
    assert params["lr_scheduler_warmup_steps"] == "7" and "lr_scheduler_warmup_ratio" not in params
    assert params["optimizer"].endswith(", weight_decay=0.01") and params["label_smoothing"] == "0.1"
    assert params["distributed_type"] == "single process"
    assert params["reference_model"] == "none (reference-free)" and "without a reference model" in body
    assert meta["tags"] == ["zephyr", "dpo", "sigmoid", "sft"]


def test_training_results_are_the_results_table(tmp_path):
    _, body = write(tmp_path, files={"training.png": "png"})
    results = section(body, "### Training results")
    assert results_table(DPO_LOG, "dpo") in results
    assert "| 0.5123 | 1.0 | 2 | 0.4605 | -0.5053 |" in results
    assert "![" in results and "(training.png)" in results


def test_framework_versions(tmp_path):
    _, body = write(tmp_path)
    versions = section(body, "### Framework versions").strip().splitlines()
    assert versions == ["- Zephyr 0.1.0", "- Transformers 5.24.0", "- PyTorch 2.13.0"]


def test_an_older_record_without_process_counts_or_versions(tmp_path):
    # as /tmp/cc/outputs/demo/dpo: no num_processes, total_*, mixed_precision or framework_versions
    _, body = write(tmp_path, record(processes=None))
    params = bullets(section(body, "### Training hyperparameters"))
    for key in ("distributed_type", "num_devices", "total_train_batch_size", "total_eval_batch_size"):
        assert key not in params
    assert params["gradient_accumulation_steps"] == "4"
    versions = section(body, "### Framework versions").strip().splitlines()
    assert versions == ["- Zephyr 0.1.0", "- Transformers 5.24.0 (the version that wrote the model files)"]
    assert "None" not in body and "{" not in body


# ---------------------------------------------------------------------------------------------- metadata


def test_yaml_metadata_parses_and_its_model_index_is_the_final_eval(tmp_path):
    meta, _ = write(tmp_path)
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert meta["base_model"] == "alignment-handbook/zephyr-7b-sft-full" and meta["datasets"] == [UFB]
    assert meta["tags"] == ["zephyr", "dpo", "sigmoid"]
    (index,) = meta["model-index"]
    assert index["name"] == "zephyr-7b-dpo"
    (result,) = index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": UFB, "type": UFB, "split": "test_prefs"}
    final = {k.removeprefix("eval_"): v for k, v in DPO_LOG[-1].items() if k.startswith("eval_")}
    del final["runtime"], final["samples_per_second"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == final  # exact values, not the rounded ones
    assert [m["name"] for m in result["metrics"]][:2] == ["Loss", "Rewards/chosen"]


def test_local_paths_stay_out_of_the_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "sft").mkdir(parents=True)  # an owner/name that exists here is a local folder
    rec = record(args=[f"--dataset_name={tmp_path / 'prefs'}"], base_model="outputs/sft")
    meta, body = write(tmp_path, rec)
    assert "base_model" not in meta and "datasets" not in meta
    assert bullets(section(body, "## Model description"))["Finetuned from model"] == "`outputs/sft`"
    meta, _ = write(tmp_path, rec, card={"base_model": "me/zephyr-sft", "datasets": [UFB]})
    assert (meta["base_model"], meta["datasets"]) == ("me/zephyr-sft", [UFB])


def test_no_evaluation(tmp_path):
    rec = record(args=["--eval_strategy=no"], log=[r for r in DPO_LOG if "loss" in r])
    meta, body = write(tmp_path, rec)
    assert meta["model-index"][0]["results"] == []
    assert "No evaluation ran during training (eval_strategy: no)." in body
    assert "evaluation used" not in body and "Training used the `train_prefs` split of" in body


# ---------------------------------------------------------------------------------------------- card mapping


def test_the_card_mapping_fills_what_the_run_cannot_know(tmp_path):
    card = {
        "license": "mit", "language": ["en"], "model_id": "me/zephyr-tiny", "datasets": [UFB],
        "description": "A small Zephyr for tests.", "intended_uses": "Testing card writers.",
        "limitations": "Knows nothing.", "tags": ["tiny"],
    }  # fmt: skip
    meta, body = write(tmp_path, card=card)
    assert (meta["license"], meta["language"], meta["datasets"]) == ("mit", ["en"], [UFB])
    assert meta["tags"] == ["zephyr", "dpo", "sigmoid", "tiny"]
    assert meta["model-index"][0]["name"] == "zephyr-tiny"
    assert body.startswith("# Model Card for zephyr-tiny\n\nA small Zephyr for tests.\n")
    facts = bullets(section(body, "## Model description"))
    assert (facts["License"], facts["Language(s) (NLP)"]) == ("mit", "en")
    assert section(body, "## Intended uses & limitations").strip().startswith("Testing card writers.")
    assert section(body, "## Bias, Risks, and Limitations").strip() == "Knows nothing."
    assert 'model="me/zephyr-tiny"' in body


def test_the_recorded_card_mapping_is_used_when_none_is_given(tmp_path):
    rec = record(args=["--card={license: apache-2.0, language: [en, fr]}"])
    assert rec["config"]["card"] == {"license": "apache-2.0", "language": ["en", "fr"]}
    meta, body = write(tmp_path, rec)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "fr"]
    assert bullets(section(body, "## Model description"))["Language(s) (NLP)"] == "en, fr"


def test_a_bad_card_mapping_is_refused(tmp_path):
    folder = make_run(tmp_path / "run", record())
    with pytest.raises(ConfigError, match="Unknown key 'licence' in card .*did you mean 'license'"):
        write_card(folder, card={"licence": "mit"})


# ---------------------------------------------------------------------------------------------- inference example


def _run_example(body: str, monkeypatch) -> dict:
    """Run the card's Python block against a stand-in `transformers.pipeline`; what it was called with."""
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    seen: dict = {}

    class Tokenizer:
        def apply_chat_template(self, messages, **kwargs):
            seen["messages"], seen["template_kwargs"] = messages, kwargs
            return "PROMPT"

    class Pipe:
        tokenizer = Tokenizer()

        def __call__(self, prompt, **kwargs):
            seen["prompt"], seen["generate_kwargs"] = prompt, kwargs
            return [{"generated_text": prompt + " reply"}]

    def pipeline(task, **kwargs):
        seen["task"], seen["pipeline_kwargs"] = task, kwargs
        return Pipe()

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(pipeline=pipeline))
    exec(compile(code, "card", "exec"), {"print": lambda *a: seen.setdefault("printed", a)})
    return seen


def test_the_inference_example_runs_with_the_folders_sampling_defaults(tmp_path, monkeypatch):
    generation = {"do_sample": True, "temperature": 0.3, "top_k": 20, "top_p": 0.8, "max_new_tokens": 64}
    _, body = write(tmp_path, generation=generation)
    seen = _run_example(section(body, "## Intended uses & limitations"), monkeypatch)
    assert seen["task"] == "text-generation"
    assert seen["pipeline_kwargs"]["model"] == str(tmp_path / "zephyr-7b-dpo")  # no model_id: the folder
    assert [m["role"] for m in seen["messages"]] == ["system", "user"]
    assert seen["template_kwargs"] == {"tokenize": False, "add_generation_prompt": True}
    assert seen["generate_kwargs"] == generation
    assert seen["printed"] == ("PROMPT reply",)


def test_the_example_loads_hub_model_id_and_greedy_folders_are_not_sampled(tmp_path, monkeypatch):
    rec = record(args=["--hub_model_id=me/zephyr-7b-dpo-test"])
    _, body = write(tmp_path, rec, generation={"do_sample": False, "temperature": 0.7, "max_new_tokens": 32})
    seen = _run_example(body, monkeypatch)
    assert seen["pipeline_kwargs"]["model"] == "me/zephyr-7b-dpo-test"
    assert seen["generate_kwargs"] == {"max_new_tokens": 32, "do_sample": False}


# ---------------------------------------------------------------------------------------------- evaluations


def test_mt_bench_scores_are_on_the_card_when_scores_json_exists(tmp_path):
    scores = {"overall": 6.5, "turn_1": 7.0, "turn_2": 6.0, "categories": {"writing": 8.1, "coding": 4.2},
              "failed_judgments": 2, "model": "zephyr-7b-dpo", "judge_model": "gpt-4", "questions": 80}  # fmt: skip
    meta, body = write(tmp_path, files={"mt-bench/scores.json": scores, "mt-bench/categories.png": "png"})
    results = meta["model-index"][0]["results"]
    assert [r["dataset"]["name"] for r in results] == [UFB, "MT-Bench"]
    assert [m["value"] for m in results[1]["metrics"]] == [6.5, 7.0, 6.0, 8.1, 4.2]
    mt_bench = section(body, "#### MT-Bench")
    assert bullets(mt_bench) == {"Overall": "6.5", "Turn 1": "7.0", "Turn 2": "6.0", "Writing": "8.1",
                                 "Coding": "4.2"}  # fmt: skip
    assert "judged by `gpt-4` over 80 questions" in mt_bench and "2 judgments could not be parsed" in mt_bench
    assert "(mt-bench/categories.png)" in mt_bench
    card = (tmp_path / "zephyr-7b-dpo" / "README.md").read_text()
    # Three results share one task mapping: each written out again, no YAML anchor or alias.
    assert "&id" not in card and "*id" not in card
    _, without = write(tmp_path / "other")
    assert "MT-Bench" not in without


def test_held_out_preference_metrics_from_eval_prefs_json(tmp_path):
    prefs = {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 1.234567}
    meta, body = write(tmp_path, files={"eval_prefs.json": prefs})
    results = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results[1]["metrics"]} == prefs
    data = section(body, "## Training and evaluation data")
    assert "- Rewards/accuracies: 0.75\n- Rewards/margins: 1.2346" in data


# ---------------------------------------------------------------------------------------------- SFT and LoRA


def test_sft_card(tmp_path):
    args = [f"--dataset_name={'HuggingFaceH4/ultrachat_200k'}", "--dataset_train_split=train_sft",
            "--dataset_test_split=test_sft", "--per_device_train_batch_size=16", "--gradient_accumulation_steps=2",
            "--lr_scheduler_type=cosine", "--packing=true"]  # fmt: skip
    rec = record("sft", args, processes=16, log=SFT_LOG, base_model="mistralai/Mistral-7B-v0.1")
    meta, body = write(tmp_path, rec)
    assert meta["tags"] == ["zephyr", "sft"] and meta["base_model"] == "mistralai/Mistral-7B-v0.1"
    params = bullets(section(body, "### Training hyperparameters"))
    assert params["total_train_batch_size"] == "512"  # 16 x 2 x 16, the zephyr-7b SFT batch
    assert (params["packing"], params["assistant_only_loss"], params["lr_scheduler_type"]) == (
        "True", "True", "cosine"
    )  # fmt: skip
    assert "beta" not in params and "loss_type" not in params
    assert "fine-tuned with supervised fine-tuning (SFT)" in body and "DPO step" not in body
    data = section(body, "## Training and evaluation data")
    assert [line for line in data.splitlines() if line.startswith("- ")] == ["- Loss: 1.3125",
                                                                              "- Mean token accuracy: 0.625"]  # fmt: skip
    assert results_table(SFT_LOG, "sft") in body and "Rewards/chosen" not in body


def _weights(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    save_file({name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}, str(path))


def test_full_model_parameter_count_and_architecture(tmp_path):
    folder = make_run(tmp_path / "run", record(), files={"config.json": {"model_type": "llama"}})
    _weights(folder / "model.safetensors", {"embed": (1000, 64), "norm": (64,)})
    _, body = split(write_card(folder).read_text())
    kind = bullets(section(body, "## Model description"))["Model type"]
    assert kind.startswith(
        "A 64.1K-parameter causal language model (llama architecture), fine-tuned with"
    )  # 64064


def test_lora_adapter_card(tmp_path, monkeypatch):
    args = ["--use_peft=true", "--lora_r=8", "--lora_alpha=16"]
    folder = make_run(tmp_path / "run", record(args=args), files={
        "adapter_config.json": {"peft_type": "LORA"}, "base_config/config.json": {"model_type": "mistral"},
    })  # fmt: skip
    _weights(folder / "adapter_model.safetensors", {"a": (8, 64), "b": (64, 8)})  # 1024 parameters
    meta, body = split(write_card(folder).read_text())
    assert meta["library_name"] == "peft" and meta["tags"] == ["zephyr", "dpo", "sigmoid", "lora"]
    kind = bullets(section(body, "## Model description"))["Model type"]
    assert kind.startswith(
        "A LoRA adapter of 1.02K parameters (r=8, alpha=16) on `alignment-handbook/zephyr-7b-sft-full` "
        "(mistral architecture)"
    )
    params = bullets(section(body, "### Training hyperparameters"))
    assert (params["lora_r"], params["lora_alpha"], params["lora_target_modules"]) == (
        "8",
        "16",
        "all-linear",
    )
    assert (
        "pip install peft" in body and "Direct Preference Optimization (DPO) through a LoRA adapter" in body
    )
    assert _run_example(body, monkeypatch)["pipeline_kwargs"]["model"] == str(folder)


def test_merged_lora_card(tmp_path):
    args = ["--use_peft=true", "--merge_adapter=true", "--lora_target_modules=q_proj,v_proj"]
    meta, body = write(tmp_path, record(args=args))
    assert meta["library_name"] == "transformers" and "lora" in meta["tags"]
    assert "with its LoRA adapter merged in" in body
    assert bullets(section(body, "### Training hyperparameters"))["lora_target_modules"] == "q_proj, v_proj"


def test_mixture_data_is_described_entry_by_entry(tmp_path):
    mixture = "--dataset_mixture={datasets: [{id: a/one, split: train, weight: 0.5}, {id: b/two}], test_split_size: 0.1}"
    meta, body = write(tmp_path, record(args=["--dataset_name=null", mixture]))
    data = section(body, "## Training and evaluation data")
    assert "- `a/one`, split `train`, 50% of it\n- `b/two`, split `train`" in data
    assert "Evaluation used a held-out 10% of the mixture." in data
    assert meta["datasets"] == ["a/one", "b/two"]
    assert meta["model-index"][0]["results"][0]["dataset"] == {"name": "a/one, b/two", "type": "mixture"}


# ---------------------------------------------------------------------------------------------- errors


def test_a_missing_folder_or_one_without_a_run_record(tmp_path):
    with pytest.raises(ZephyrError, match=r"nowhere is not a folder.*`zephyr sft` or `zephyr dpo`"):
        write_card(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZephyrError, match=r"empty has no zephyr_run.json.*`zephyr sft` or `zephyr dpo`"):
        write_card(tmp_path / "empty")


@pytest.mark.parametrize("name", ["zephyr_run.json", "generation_config.json", "mt-bench/scores.json"])
def test_corrupt_json_names_the_file(tmp_path, name):
    folder = make_run(tmp_path / "run", record())
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_text('{"stage": "dpo",')
    with pytest.raises(ZephyrError, match=re.escape(str(folder / name)) + " is not valid JSON"):
        write_card(folder)
    assert not (folder / "README.md").exists()


def test_a_json_file_that_is_not_a_run_record(tmp_path):
    folder = make_run(tmp_path / "run", {"stage": "dpo", "log_history": []})
    with pytest.raises(ZephyrError, match="zephyr_run.json has no valid 'config'"):
        write_card(folder)


# ---------------------------------------------------------------------------------------------- config key


def test_card_key_in_a_recipe(tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        "card:\n  license: mit\n  language: en\n  datasets: [a/b]\n  model_id: me/m\n  tags: null\n"
    )
    cfg = load_config("dpo", recipe)
    assert cfg.card == {"license": "mit", "language": ["en"], "datasets": ["a/b"], "model_id": "me/m"}
    assert load_config("sft").card == {}
    assert config_to_dict(cfg)["card"] == cfg.card


@pytest.mark.parametrize(
    "text, message",
    [
        ("card:\n  descripton: x\n", "Unknown key 'descripton' in card in .*; did you mean 'description'"),
        ("card:\n  colour: x\n", "Unknown key 'colour' in card .*valid keys: model_id, base_model, license"),
        ("card: [mit]\n", "card in .* must be a mapping"),
        ("card:\n  language: {en: 1}\n", r"card.language = \{'en': 1\} in .* expected a list"),
    ],
)
def test_bad_card_keys_are_named(tmp_path, text, message):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config("sft", recipe)
