"""`zephyr kto` end to end through the CLI on the tiny model (the model folder, run record, card and TRL-named
metrics), the refusal of single-class data, and KTO's data: unpaired rows, and pairs unpaired as TRL does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zephyr.cli import main
from zephyr.data.rejects import Rejects
from zephyr.data.schemas import adapt_records, detect_schema, load_split, unpair
from zephyr.data.sources import Record
from zephyr.errors import DataError
from zephyr.run_record import RunRecord
from zephyr.train.kto import KTOCollator


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zephyr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(path))
        yield path


def _write(folder: Path, rows_by_split: dict[str, list[dict]]) -> Path:
    folder.mkdir(exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _unpaired(numbers, label=None) -> list[dict]:
    return [
        {
            "prompt": f"What is {i} + {i}?",
            "completion": f"{2 * i}." if (label if label is not None else i % 2) else f"I think {2 * i + 1}.",
            "label": bool(label if label is not None else i % 2),
        }
        for i in numbers
    ]


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main([
        "kto", f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}", "--max_steps=2",
        "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4", "--learning_rate=1e-3",
        "--logging_steps=1", "--bf16=false", "--gradient_checkpointing=false", "--max_length=64",
        "--save_strategy=no", "--eval_strategy=steps", "--eval_steps=2", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_kto_runs_through_the_cli_and_writes_a_model_folder(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "data", {"train": _unpaired(range(12)), "test": _unpaired(range(100, 104))})
    out = tmp_path / "kto"
    assert _train(tiny_model_dir, data, out, "--train_sampling_strategy=sequential") == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed
    # 6 and 6: already in KTO's range, so both weights are 1, said once at the start
    assert (
        "kto: 6 desirable and 6 undesirable rows; desirable_weight 1, undesirable_weight 1, chosen" in printed
    )
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    record = RunRecord.read(out)
    assert record.stage == "kto" and record.config["loss_type"] == "kto"
    assert (record.config["desirable_weight"], record.config["undesirable_weight"]) == (1.0, 1.0)
    card = (out / "README.md").read_text()
    assert "Kahneman-Tversky Optimization (KTO)" in card and "desirable_weight: 1.0" in card
    assert "| KL |" in card and "Rewards/accuracies" not in card  # KTO's own columns, none DPO-only
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in steps if "loss" in r]
    assert len(train) == 2
    for key in ("kl", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "num_tokens"):  # fmt: skip
        assert key in train[0], key
    assert any("eval_kl" in r for r in steps)


@pytest.mark.slow
def test_kto_obeys_explicit_weights_and_trains_on_pairs(tmp_path, tiny_model_dir, capsys):
    pairs = [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": "No idea."} for i in range(6)
    ]
    data = _write(tmp_path / "pairs", {"train": pairs, "test": pairs[:2]})
    out = tmp_path / "kto"
    assert _train(tiny_model_dir, data, out, "--undesirable_weight=1.25") == 0
    assert (
        "kto: 6 desirable and 6 undesirable rows; desirable_weight 1, undesirable_weight 1.25, as the recipe"
        in (capsys.readouterr().out)
    )


@pytest.mark.parametrize("label", [True, False])
def test_kto_refuses_data_with_one_class_and_says_the_counts(tmp_path, tiny_model_dir, capsys, label):
    data = _write(tmp_path / "data", {"train": _unpaired(range(6), label=label)})
    assert _train(tiny_model_dir, data, tmp_path / "kto") == 2
    err = capsys.readouterr().err
    counts = "6 desirable and 0 undesirable" if label else "0 desirable and 6 undesirable"
    assert f"the KTO train split has {counts} rows; KTO needs both" in err
    assert not (tmp_path / "kto" / "model.safetensors").exists()


def test_a_kto_batch_of_one_is_refused_before_any_model_loads(tmp_path, capsys):
    assert main(["kto", "--per_device_train_batch_size=1", f"--output_dir={tmp_path}"]) == 2
    assert "per_device_train_batch_size = 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- data


def _records(rows: list[dict]) -> list[Record]:
    return [Record(origin="rows.jsonl", row=i + 1, data=r, error=None) for i, r in enumerate(rows)]


def test_unpaired_rows_are_detected_and_adapted():
    rows = [{"prompt": "Hi?", "completion": "Hello.", "label": True}]
    assert detect_schema(rows[0], kind="unpaired") == "unpaired"
    (row,) = adapt_records(_records(rows), kind="unpaired", rejects=Rejects())
    assert row["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert row["completion"] == [{"role": "assistant", "content": "Hello."}] and row["label"] is True


def test_an_unpaired_label_must_be_a_boolean():
    rows = [{"prompt": "Hi?", "completion": "Hello.", "label": "yes"}]
    with pytest.raises(DataError, match="label"):
        adapt_records(_records(rows), kind="unpaired", rejects=Rejects())


def test_pairs_are_unpaired_as_trl_does():
    """TRL's `unpair_preference_dataset`: per block of 1000 pairs, the chosen rows (true) then the rejected (false)."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(2500)]
    theirs = list(unpair_preference_dataset(Dataset.from_list(pairs)))
    ours = unpair(pairs)
    assert [(r["prompt"], r["completion"], r["label"]) for r in ours] == [
        (r["prompt"], r["completion"], r["label"]) for r in theirs
    ]


def test_a_kto_stage_reads_preference_files_as_unpaired_rows(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(3)]
    data = _write(tmp_path / "pairs", {"train": rows})
    ds = load_split(str(data), split="train", kind="unpaired", rejects=Rejects())
    assert ds["label"] == [True, True, True, False, False, False]
    assert ds[3]["completion"] == [{"role": "assistant", "content": "No 0."}]


def test_the_kto_collator_builds_trls_mismatched_kl_sequences():
    """TRL's docstring example, with the KL completions rotated by one within the batch as its dataset map does."""
    rows = [
        {"prompt_input_ids": [1, 2, 3], "completion_input_ids": [4, 5], "label": True},
        {"prompt_input_ids": [7, 8], "completion_input_ids": [9], "label": False},
    ]
    batch = KTOCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["KL_input_ids"].tolist() == [[1, 2, 3, 9], [7, 8, 4, 5]]
    assert batch["KL_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["KL_completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert batch["label"].tolist() == [True, False]
    assert batch["label"].dtype == torch.bool


@pytest.mark.slow
def test_kto_with_lora_uses_the_base_model_as_reference(tmp_path, tiny_model_dir):
    """No second model: the reference is the policy with its adapters disabled, so at the first step (adapters
    still zero in B) every reward and the KL are 0."""
    data = _write(tmp_path / "data", {"train": _unpaired(range(8)), "test": _unpaired(range(100, 104))})
    out = tmp_path / "kto-lora"
    lora = ["--use_peft=true", "--lora_r=4", "--lora_target_modules=q_proj,v_proj"]
    assert _train(tiny_model_dir, data, out, "--train_sampling_strategy=sequential", *lora) == 0
    first = next(r for r in RunRecord.read(out).log_history if "loss" in r)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["kl"] == 0.0
