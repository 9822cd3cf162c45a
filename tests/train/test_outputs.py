"""What a finished `zephyr dpo` run leaves in OUTPUT_DIR, read the way people read it: the zephyr-7b-alpha card's
`pipeline(...)` snippet, the generation defaults, the chat template, the results table, the plot and the run record.
Plus `results_rows` on a hand-made log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zephyr.train.results import results_rows, results_table

STEPS = 2


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pair(i: int) -> dict:
    return {
        "prompt": f"What is {i} + {i}?",
        "chosen": f"{2 * i}.",
        "rejected": f"I think it is {2 * i + 1}, or so.",
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A 2-step DPO run with the Zephyr chat template and an eval after each step; its output folder and config."""
    from zephyr.recipe import load_config
    from zephyr.stages import run_stage

    tmp = tmp_path_factory.mktemp("outputs")
    _jsonl(tmp / "prefs" / "train.jsonl", [_pair(i) for i in range(8)])
    _jsonl(tmp / "prefs" / "test.jsonl", [_pair(i) for i in range(100, 104)])
    out = tmp / "zephyr-tiny-dpo"
    cfg = load_config("dpo", None, [
        f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={tmp / 'prefs'}", f"--output_dir={out}",
        f"--max_steps={STEPS}", "--per_device_train_batch_size=4", "--learning_rate=1e-3", "--logging_steps=1",
        "--eval_strategy=steps", "--eval_steps=1", "--bf16=false", "--gradient_checkpointing=false",
        "--max_length=64", "--save_strategy=no", "--chat_template=zephyr", "--beta=0.05",
    ])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
        result = run_stage(cfg, progress=False)
    return out, cfg, result.state.log_history


@pytest.mark.slow
def test_the_card_pipeline_snippet_generates_from_the_output_folder(run):
    import torch
    from transformers import pipeline

    out, _, _ = run
    pipe = pipeline("text-generation", model=str(out), dtype=torch.float32)
    messages = [
        {
            "role": "system",
            "content": "You are a friendly chatbot who always responds in the style of a pirate",
        },
        {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
    ]
    prompt = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|system|>\nYou are a friendly chatbot") and prompt.endswith("<|assistant|>\n")
    torch.manual_seed(0)
    outputs = pipe(prompt, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
    text = outputs[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)  # random weights: some text, seeded


@pytest.mark.slow
def test_generation_config_has_the_card_sampling_defaults_and_the_tokenizers_eos(run):
    from transformers import AutoTokenizer

    out, _, _ = run
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is True
    assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (0.7, 50, 0.95)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert generation["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")


@pytest.mark.slow
def test_the_recipes_chat_template_is_saved_in_both_places(run):
    from transformers import AutoTokenizer

    from zephyr.data.templates import ZEPHYR_TEMPLATE

    out, _, _ = run
    assert (out / "chat_template.jinja").read_text() == ZEPHYR_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR_TEMPLATE
    assert AutoTokenizer.from_pretrained(out).chat_template == ZEPHYR_TEMPLATE


@pytest.mark.slow
def test_results_md_has_the_cards_columns_and_one_row_per_eval(run):
    out, _, log = run
    lines = (out / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    titles = [c.strip() for c in table[0].strip("|").split("|")]
    assert titles == [
        "Training Loss", "Epoch", "Step", "Validation Loss", "Rewards/chosen", "Rewards/rejected",
        "Rewards/accuracies", "Rewards/margins", "Logps/rejected", "Logps/chosen", "Logits/rejected", "Logits/chosen",
    ]  # fmt: skip
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    evals = [r for r in log if "eval_loss" in r]
    assert len(rows) == len(evals) == STEPS
    for row, ev in zip(rows, evals, strict=True):
        train = next(r for r in log if "loss" in r and r["step"] == ev["step"])
        assert row[2] == str(ev["step"])
        values = [float(cell) for i, cell in enumerate(row) if i != 2]  # every cell filled, none "No log"
        expected = [train["loss"], train["epoch"]] + [ev[f"eval_{key.lower()}"] for key in titles[4:]]
        assert values[:2] == pytest.approx(expected[:2], abs=5e-5)
        assert values[2] == pytest.approx(ev["eval_loss"], abs=5e-5)
        assert values[3:] == pytest.approx(expected[2:], abs=5e-5)


@pytest.mark.slow
def test_training_png_is_a_png(run):
    out, _, _ = run
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_zephyr_run_json_records_the_base_model_and_the_config(run, tiny_model_dir):
    from zephyr.config import config_to_dict

    out, cfg, log = run
    record = json.loads((out / "zephyr_run.json").read_text())
    assert record["stage"] == "dpo"
    assert record["base_model"] == record["reference_model"] == str(tiny_model_dir)
    assert record["config"] == json.loads(json.dumps(config_to_dict(cfg), default=str))
    assert record["config"]["beta"] == 0.05 and record["config"]["chat_template"] == "zephyr"
    assert record["log_history"] == log


# ---------------------------------------------------------------------------------------------- results_rows by hand

LOG = [
    {"step": 1, "eval_loss": 0.69314718, "eval_rewards/chosen": 0.0},  # an eval before any training log
    {"step": 2, "epoch": 0.5, "loss": 0.6931, "grad_norm": 1.0},
    {"step": 3, "epoch": 0.75, "loss": 0.68126},
    {"step": 3, "eval_loss": 0.6875, "eval_rewards/chosen": 0.0125, "eval_rewards/rejected": -0.25,
     "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.2625, "eval_logps/rejected": -40.5,
     "eval_logps/chosen": -12.0, "eval_logits/rejected": 0.123456, "eval_logits/chosen": -0.00004},
    {"step": 4, "epoch": 1.0, "loss": 0.5},
]  # fmt: skip


def test_results_rows_one_per_eval_with_the_latest_training_loss():
    # numbers as the cards print them: more than 4 decimals rounded to 4, shorter ones (epoch 0.75) as they are
    assert results_rows(LOG, "dpo") == [
        ["No log", "No log", "1", "0.6931", "0.0", "No log", "No log", "No log", "No log", "No log", "No log",
         "No log"],
        ["0.6813", "0.75", "3", "0.6875", "0.0125", "-0.25", "1.0", "0.2625", "-40.5", "-12.0", "0.1235", "-4e-05"],
    ]  # fmt: skip


def test_results_rows_take_the_evals_own_epoch_when_it_has_one():
    log = [{"step": 2, "epoch": 0.5, "loss": 0.6931}, {"step": 3, "epoch": 0.75, "eval_loss": 0.5}]
    assert results_rows(log, "sft") == [["0.6931", "0.75", "3", "0.5"]]


def test_results_rows_for_sft_and_without_evals():
    assert results_rows(LOG, "sft") == [
        ["No log", "No log", "1", "0.6931"],
        ["0.6813", "0.75", "3", "0.6875"],
    ]
    train_only = [r for r in LOG if "eval_loss" not in r]
    assert results_rows(train_only, "sft") == [
        ["0.6931", "0.5", "2", "No log"],
        ["0.6813", "0.75", "3", "No log"],
        ["0.5", "1.0", "4", "No log"],
    ]


def test_results_table_is_markdown_with_centred_columns():
    assert results_table(LOG[1:3], "sft").splitlines() == [
        "| Training Loss | Epoch | Step | Validation Loss |",
        "|:---:|:---:|:---:|:---:|",
        "| 0.6931 | 0.5 | 2 | No log |",
        "| 0.6813 | 0.75 | 3 | No log |",
    ]


# ---------------------------------------------------------------------------------------------- push_to_hub and notes


class FakeHub:
    """Stands in for huggingface_hub.HfApi (nothing can reach the Hub here): records the calls, or fails."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))
        if FakeHub.fail:
            raise FakeHub.fail
        return type("Url", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, folder_path, repo_id, commit_message, allow_patterns=None, ignore_patterns=None):
        """Records the files the real client would upload, filtered by its own pattern matching."""
        from huggingface_hub.utils import filter_repo_objects

        every = sorted(
            p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()
        )
        files = list(
            filter_repo_objects(every, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        FakeHub.calls.append(("upload_folder", repo_id, files, every))


def _dpo_run(tiny_model_dir, tmp_path, *extra, max_steps=1, save_strategy="no"):
    from zephyr.recipe import load_config
    from zephyr.stages import run_stage

    data = tmp_path / "prefs"
    if not data.is_dir():
        _jsonl(data / "train.jsonl", [_pair(i) for i in range(4)])
    args = [f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data}", f"--output_dir={tmp_path / 'out'}",
            f"--max_steps={max_steps}", "--per_device_train_batch_size=2", "--bf16=false",
            "--gradient_checkpointing=false", "--max_length=64", f"--save_strategy={save_strategy}", *extra]  # fmt: skip
    return run_stage(load_config("dpo", None, args), progress=False)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_push_to_hub_uploads_the_finished_folder_once_and_says_so(tiny_model_dir, tmp_path, fake_hub, capsys):
    _dpo_run(
        tiny_model_dir, tmp_path, "--push_to_hub=true", "--hub_model_id=tiny-dpo", "--hub_private_repo=true"
    )
    printed = capsys.readouterr().out
    assert (
        "hub_strategy every_save: Zephyr pushes the finished model once, at the end (to tiny-dpo)" in printed
    )
    (create, upload) = fake_hub.calls
    assert create == ("create_repo", "tiny-dpo", True, True)
    assert upload[1] == "someone/tiny-dpo" and {"model.safetensors", "README.md", "zephyr_run.json"} <= set(
        upload[2]
    )
    assert "pushed " in printed and "someone/tiny-dpo" in printed


def test_push_to_hub_uploads_deliverables_only_into_a_private_repo(tiny_model_dir, tmp_path, fake_hub):
    """Never the rejected rows (raw data), checkpoints or the run lock; private unless hub_private_repo: false."""
    data = tmp_path / "prefs"
    _jsonl(data / "train.jsonl", [_pair(i) for i in range(4)] + [{"prompt": "no answers"}])
    _dpo_run(tiny_model_dir, tmp_path, "--push_to_hub=true", "--skip_invalid=true", "--save_steps=1",
             max_steps=2, save_strategy="steps")  # fmt: skip
    (create, upload) = fake_hub.calls
    assert create[2] is True  # hub_private_repo unset: private
    uploaded, present = set(upload[2]), set(upload[3])
    assert {"rejects.jsonl", "checkpoint-1/model.safetensors"} <= present
    assert uploaded == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "README.md", "results.md", "training.png", "zephyr_run.json", "metrics.jsonl",
    } & present  # fmt: skip
    assert "model.safetensors" in uploaded

    fake_hub.calls.clear()
    _dpo_run(
        tiny_model_dir,
        tmp_path,
        "--push_to_hub=true",
        "--hub_private_repo=false",
        "--skip_invalid=true",
        "--overwrite_output_dir=true",
    )
    assert fake_hub.calls[0][2] is False


def test_a_failed_push_keeps_the_model_and_says_how_to_push_it_later(tiny_model_dir, tmp_path, fake_hub):
    from zephyr.errors import ZephyrError

    fake_hub.fail = OSError("no network")
    with pytest.raises(
        ZephyrError, match=r"the model is saved in .*out, but pushing it to the Hub as out failed"
    ):
        _dpo_run(tiny_model_dir, tmp_path, "--push_to_hub=true", "--hub_strategy=end")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_keys_without_effect_are_named_when_set(tmp_path):
    from zephyr.recipe import load_config
    from zephyr.train.setup import unused_key_notes

    cfg = load_config("dpo", None, [f"--output_dir={tmp_path}", "--do_eval=true", "--use_liger_kernel=true"])
    (line,) = unused_key_notes(cfg)
    assert line.startswith("note: set but without effect in Zephyr: do_eval (")
    assert "use_liger_kernel (Zephyr's chunked completion head" in line
    assert unused_key_notes(load_config("dpo", None, [f"--output_dir={tmp_path}"])) == []
