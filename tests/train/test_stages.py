"""`zephyr sft` and `zephyr dpo` features on the tiny model, run in process: SFT metrics and its loss against
transformers' own, the precomputed reference cache, LoRA DPO (adapter or merged output), the other loss types, the
NaN guard, falling back from an unreadable checkpoint, and recipes refused before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import zephyr.models
import zephyr.train.dpo
import zephyr.train.setup
from zephyr.errors import ConfigError, ZephyrError
from zephyr.recipe import load_config


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Tokenized data and reference log-probs go to a cache of this module's own."""
    path = tmp_path_factory.mktemp("zephyr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(path))
        yield path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dialogue(i: int) -> dict:
    """An ultrachat_200k row; every third one has two exchanges."""
    messages = [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."},
    ]
    if i % 3 == 0:
        messages += [
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, quite sure."},
        ]
    return {"prompt": messages[0]["content"], "prompt_id": f"{i:04d}", "messages": messages}


def _pair(i: int) -> dict:
    return {
        "prompt": f"What is {i} + {i}?",
        "chosen": f"{2 * i}.",
        "rejected": f"I think it is {2 * i + 1}, or so.",
    }


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ultrachat")
    _jsonl(folder / "train.jsonl", [_dialogue(i) for i in range(8)])
    _jsonl(folder / "test.jsonl", [_dialogue(i) for i in range(100, 104)])
    return folder


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prefs")
    _jsonl(folder / "train.jsonl", [_pair(i) for i in range(8)])
    _jsonl(folder / "test.jsonl", [_pair(i) for i in range(100, 104)])
    return folder


def _config(stage: str, model: Path, data: Path, out: Path, *extra: str):
    """The stage's config for a short run on the tiny model; EXTRA (`--key=value`) replaces a default of the same key."""
    settings = {
        "model_name_or_path": model, "dataset_name": data, "output_dir": out, "max_steps": 2,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
        "bf16": False, "gradient_checkpointing": False, "max_length": 64, "save_strategy": "no",
        "train_sampling_strategy": "sequential",
    }  # fmt: skip
    settings.update(token[2:].split("=", 1) for token in extra)
    return load_config(stage, None, [f"--{key}={value}" for key, value in settings.items()])


def _sft(model: Path, data: Path, out: Path, *extra: str):
    from zephyr.train.sft import run_sft

    return run_sft(_config("sft", model, data, out, *extra), progress=False)


def _dpo(model: Path, data: Path, out: Path, *extra: str):
    from zephyr.train.dpo import run_dpo

    return run_dpo(_config("dpo", model, data, out, *extra), progress=False)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def _hf_loss(model_dir: Path, rows: list[dict], pad_token_id: int) -> float:
    """transformers' own causal-LM loss on ROWS as one right-padded batch: the mean over all labelled tokens."""
    from transformers import AutoModelForCausalLM

    from zephyr.train.collate import SFTCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = SFTCollator(pad_token_id=pad_token_id)(rows)
    with torch.no_grad():
        return model(**batch).loss.item()


# ---------------------------------------------------------------------------------------------- SFT


@pytest.mark.slow
def test_sft_logs_train_and_eval_metrics_and_its_loss_is_transformers_loss(tmp_path, tiny_model_dir, chat):
    from zephyr.data.prepare import prepare

    out = tmp_path / "sft"
    result = _sft(tiny_model_dir, chat, out, "--max_steps=4", "--eval_strategy=steps", "--eval_steps=2")
    records = _records(out)
    steps, evals = _steps(records), [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for r in steps:
        assert math.isfinite(r["loss"]) and 0 <= r["mean_token_accuracy"] <= 1
    assert all(math.isfinite(r["eval_loss"]) and "eval_mean_token_accuracy" in r for r in evals)
    assert records == result.state.log_history

    # step 1's loss is the starting model's loss on the first 4 rows (sequential order); the last eval loss is the
    # saved model's loss on the whole test split (4 rows, one eval batch)
    cfg = _config("sft", tiny_model_dir, chat, out)
    assert cfg.assistant_only_loss  # the default
    data = prepare(cfg, stage="sft")
    pad = data.tokenizer.pad_token_id
    first_rows = data.train.select(range(4)).to_list()
    assert steps[0]["loss"] == pytest.approx(_hf_loss(tiny_model_dir, first_rows, pad), rel=1e-5)
    assert evals[-1]["eval_loss"] == pytest.approx(_hf_loss(out, data.test.to_list(), pad), rel=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.slow
def test_sft_on_every_token_has_another_loss(tmp_path, tiny_model_dir, chat):
    from zephyr.data.prepare import prepare

    assistant = _sft(tiny_model_dir, chat, tmp_path / "assistant", "--max_steps=1")
    every = _sft(tiny_model_dir, chat, tmp_path / "every", "--max_steps=1", "--assistant_only_loss=false")
    (a,), (e,) = _steps(assistant.state.log_history), _steps(every.state.log_history)
    assert a["num_tokens"] == e["num_tokens"]  # the same sequences...
    assert abs(a["loss"] - e["loss"]) > 1e-3  # ...with other tokens labelled
    data = prepare(
        _config("sft", tiny_model_dir, chat, tmp_path / "every", "--assistant_only_loss=false"), stage="sft"
    )
    rows = data.train.select(range(4)).to_list()
    assert all(r["labels"] == r["input_ids"] for r in rows)
    assert e["loss"] == pytest.approx(_hf_loss(tiny_model_dir, rows, data.tokenizer.pad_token_id), rel=1e-5)


# ---------------------------------------------------------------------------------------------- reference cache

COMPARED = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "entropy"]  # fmt: skip


@pytest.fixture
def reference_passes(monkeypatch) -> list[str]:
    """Records each batch of a reference pass (the pass calls `fault_point("precompute")` once per batch)."""
    import zephyr.train.dpo

    seen: list[str] = []
    monkeypatch.setattr(zephyr.train.dpo, "fault_point", seen.append)
    return seen


@pytest.mark.slow
def test_precomputed_reference_matches_the_frozen_model_and_is_reused(
    tmp_path, tiny_model_dir, prefs, cache, reference_passes, capsys
):
    frozen = _dpo(
        tiny_model_dir, prefs, tmp_path / "frozen", "--max_steps=3", "--precompute_ref_log_probs=false"
    )
    assert not reference_passes
    precomputed = _dpo(
        tiny_model_dir, prefs, tmp_path / "pre", "--max_steps=3", "--precompute_ref_log_probs=true"
    )
    assert reference_passes  # train and test splits went through the reference model once
    files = sorted((cache / "ref_logps").glob("*.pt"))
    assert len(files) == 2  # one per split
    want, got = _steps(frozen.state.log_history), _steps(precomputed.state.log_history)
    assert len(want) == len(got) == 3
    for a, b in zip(want, got, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert got[-1]["rewards/margins"] != 0  # the policy moved away from the reference

    reference_passes.clear()
    capsys.readouterr()
    again = _dpo(
        tiny_model_dir, prefs, tmp_path / "again", "--max_steps=1", "--precompute_ref_log_probs=true"
    )
    assert not reference_passes
    printed = capsys.readouterr().out
    assert printed.count("reference log-probs: reusing") == 2
    assert sorted((cache / "ref_logps").glob("*.pt")) == files
    assert _steps(again.state.log_history)[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], True),  # an epoch: every pair is trained on
        (["--max_steps=3"], False),  # 3 x 2 pairs of 8: precomputing would pay for 2 never used
        (["--max_steps=2", "--gradient_accumulation_steps=2"], True),  # 2 x 4: all 8
        (["--max_steps=1", "--precompute_ref_log_probs=true"], True),  # set: obeyed
        (["--precompute_ref_log_probs=false"], False),
        (["--reference_free=true"], False),  # no reference at all
        (["--reference_free=true", "--precompute_ref_log_probs=true"], False),
    ],
)
def test_the_reference_is_precomputed_by_default_when_the_run_uses_every_pair(extra, expected, tmp_path):
    from zephyr.train.dpo import precompute_choice

    cfg = load_config(
        "dpo",
        None,
        ["--per_device_train_batch_size=2", "--num_train_epochs=1", f"--output_dir={tmp_path}", *extra],
    )
    chosen, why = precompute_choice(cfg, num_pairs=8, num_processes=1)
    assert chosen is expected
    if (
        "precompute_ref_log_probs" not in " ".join(extra) and not cfg.reference_free
    ):  # Zephyr chose: it says so
        assert why and ("precomputed" in why if expected else "6 of 8 pairs" in why)


def test_the_fast_layout_and_cache_are_the_defaults_and_the_record_says_what_ran(
    tmp_path, tiny_model_dir, prefs, cache, capsys
):
    """Unset, prefix sharing runs (the tiny model's attention is sdpa) and a run over every pair precomputes its
    reference; the run record and card name what ran, not `null`."""
    out = tmp_path / "defaults"
    result = _dpo(tiny_model_dir, prefs, out)  # 2 steps x 4 = the 8 pairs
    assert len(_steps(result.state.log_history)) == 2
    assert "reference log-probs: precomputed before training" in capsys.readouterr().out  # computed or reused
    record = json.loads((out / "zephyr_run.json").read_text())
    config = record["config"]
    assert config["prefix_sharing"] is True and config["precompute_ref_log_probs"] is True
    plain = _dpo(
        tiny_model_dir,
        prefs,
        tmp_path / "plain",
        "--prefix_sharing=false",
        "--precompute_ref_log_probs=false",
    )
    for a, b in zip(_steps(plain.state.log_history), _steps(result.state.log_history), strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_the_reference_cache_key_follows_data_and_truncation(tmp_path, tiny_model_dir, prefs):
    from zephyr.data.prepare import prepare
    from zephyr.train.dpo import reference_cache_path

    def path(data: Path, *extra: str) -> Path:
        cfg = _config("dpo", tiny_model_dir, data, tmp_path / "out", *extra)
        return reference_cache_path(cfg, str(tiny_model_dir), prepare(cfg, stage="dpo").train, "no")

    edited = tmp_path / "edited"
    _jsonl(edited / "train.jsonl", [_pair(i) for i in range(7)] + [{**_pair(7), "chosen": "Fourteen."}])
    base = path(prefs)
    assert path(prefs) == base  # stable: a second run finds it
    assert path(edited) != base
    assert path(prefs, "--max_length=48") != base
    assert path(prefs, "--max_prompt_length=8") != base

    # a hub reference is known by id and revision (nothing is downloaded to compute the key)
    def hub(revision: str) -> Path:
        cfg = _config("dpo", tiny_model_dir, prefs, tmp_path / "out", f"--model_revision={revision}")
        return reference_cache_path(
            cfg, "HuggingFaceH4/mistral-7b-sft-beta", prepare(cfg, stage="dpo").train, "no"
        )

    assert hub("main") == hub("main") != hub("v0.2")


# ---------------------------------------------------------------------------------------------- LoRA


LORA = ["--use_peft=true", "--lora_r=4", "--lora_target_modules=q_proj,v_proj"]


@pytest.mark.slow
def test_lora_dpo_uses_the_base_model_as_reference_and_saves_an_adapter(tmp_path, tiny_model_dir, prefs):
    out = tmp_path / "lora"
    steps = _steps(_dpo(tiny_model_dir, prefs, out, *LORA, "--max_steps=3").state.log_history)
    # the base model's log-probs precomputed once give the same run: disable_dropout reaches LoRA's dropout too, so
    # the random draws of the reference pass change nothing
    precomputed = _dpo(
        tiny_model_dir, prefs, tmp_path / "pre", *LORA, "--max_steps=3", "--precompute_ref_log_probs=true"
    )
    for a, b in zip(steps, _steps(precomputed.state.log_history), strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # LoRA's B matrices start at zero, so at step 1 the policy is exactly the base model with adapters off
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    # afterwards the adapter moves the policy and the reference stays where it was
    assert steps[-1]["rewards/margins"] != 0.0 and steps[-1]["loss"] != steps[0]["loss"]

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # an adapter on top of the base model, not a full model
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b)  # 2 layers x (q, v), trained


@pytest.mark.slow
def test_lora_with_merge_adapter_saves_the_merged_model_and_the_adapter(tmp_path, tiny_model_dir, prefs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    _dpo(tiny_model_dir, prefs, out, *LORA, "--merge_adapter=true")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base_plus_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 60, 7, 80, 9, 100, 11]])
    with torch.no_grad():
        want = base_plus_adapter.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        before = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-4  # the merge changed the weights


# ---------------------------------------------------------------------------------------------- loss types


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "first_loss"),
    [
        # at step 1 the policy is the reference, so every log-ratio and the margin h are 0 (beta = 0.1):
        (["--loss_type=ipo"], 25.0),  # (h - 1 / (2 beta))^2 = 5^2
        (["--loss_type=hinge"], 1.0),  # relu(1 - beta h)
        # (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e) = (0.9 - 0.1) log 2 / 0.8
        (["--loss_type=robust", "--label_smoothing=0.1"], math.log(2)),
    ],
    ids=["ipo", "hinge", "robust"],
)
def test_other_loss_types_train(tmp_path, tiny_model_dir, prefs, extra, first_loss):
    steps = _steps(_dpo(tiny_model_dir, prefs, tmp_path / "out", *extra).state.log_history)
    assert steps[0]["loss"] == pytest.approx(first_loss, rel=1e-6)
    assert math.isfinite(steps[1]["loss"]) and steps[1]["loss"] != steps[0]["loss"]


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_names_the_step(tmp_path, tiny_model_dir, prefs, monkeypatch):
    from zephyr.train.dpo import DPORecipe

    original = DPORecipe.train_step
    calls = []

    def poisoned(self, model, batch):
        out = original(self, model, batch)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(DPORecipe, "train_step", poisoned)
    with pytest.raises(ZephyrError, match=r"the loss became nan at step 2; no checkpoint was written yet"):
        _dpo(tiny_model_dir, prefs, tmp_path / "nan", "--max_steps=3", "--per_device_train_batch_size=2")
    assert len(calls) == 2


@pytest.mark.slow
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, prefs, capsys):
    out = tmp_path / "run"
    args = ["--max_steps=6", "--per_device_train_batch_size=2", "--save_strategy=steps", "--save_steps=2",
            "--train_sampling_strategy=random"]  # fmt: skip
    first = _steps(_dpo(tiny_model_dir, prefs, out, *args).state.log_history)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    weights = out / "checkpoint-4" / "model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"\0" * 64)  # a torn write, or a disk that lost it

    capsys.readouterr()
    resumed = _dpo(tiny_model_dir, prefs, out, *args, "--resume_from_checkpoint=true")
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoint-4'} is unreadable" in printed
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in printed
    got = _steps(_records(out))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert _steps(resumed.state.log_history) == got
    for a, b in zip(first[2:], got[2:], strict=True):  # steps 3-6 redone from checkpoint-2 exactly
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_prompt_length=64"], "max_prompt_length = 64 .* must be less than max_length = 64"),
        (["--loss_type=sigmod"], "sigmoid"),
        # refused by the loss's own range (it divides by 1 - 2 label_smoothing)
        (["--loss_type=robust", "--label_smoothing=0.5"], "label_smoothing"),
        # TRL keys the stage does not implement: refused rather than silently ignored
        (["--sync_ref_model=true"], "sync_ref_model is not supported"),
        (["--use_weighting=true", "--loss_type=aot"], "use_weighting"),
    ],
    ids=["prompt-fills-max_length", "unknown-loss_type", "robust-at-0.5", "sync_ref_model", "wpo-with-aot"],
)
def test_a_bad_recipe_fails_before_any_model_loads(
    tmp_path, tiny_model_dir, prefs, monkeypatch, extra, message
):
    from zephyr.train.dpo import run_dpo

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a recipe that should have been refused")

    for module in (zephyr.models, zephyr.train.setup, zephyr.train.dpo):  # every name the stage loads through
        monkeypatch.setattr(module, "load_model", no_model)
    with pytest.raises(ConfigError, match=message):
        run_dpo(_config("dpo", tiny_model_dir, prefs, tmp_path / "bad", *extra), progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_sft_gradient_accumulation_gives_the_one_big_batch_step(tmp_path, tiny_model_dir):
    """2 micro-batches of 2 rows with accumulation = 1 batch of 4 rows: the loss is the token mean over all 4 rows
    (Trainer's num_items_in_batch), not the mean of two per-micro-batch means, and so are the gradient and the
    update. The rows have different numbers of assistant tokens, so the two definitions differ here."""
    from safetensors.torch import load_file

    from tiny import tiny_model, tiny_tokenizer
    from zephyr.data.prepare import prepare

    chat = tmp_path / "chat"  # the first micro-batch's rows are two exchanges long, the second's one
    _jsonl(chat / "train.jsonl", [_dialogue(i) for i in (0, 3, 1, 2)])
    # Random init predicts nearly uniformly, making every token's loss about log(vocab) and both definitions agree:
    # sharpen the output layer so that tokens' losses differ.
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30)
    tiny_model_dir = tmp_path / "sharp"
    model.save_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tiny_model_dir)
    big = _sft(
        tiny_model_dir,
        chat,
        tmp_path / "big",
        "--max_steps=1",
        "--per_device_train_batch_size=4",
        "--max_length=256",
    )
    acc = _sft(
        tiny_model_dir, chat, tmp_path / "acc", "--max_steps=1", "--per_device_train_batch_size=2",
        "--gradient_accumulation_steps=2", "--max_length=256",
    )  # fmt: skip
    (b,), (a,) = _steps(big.state.log_history), _steps(acc.state.log_history)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)

    data = prepare(_config("sft", tiny_model_dir, chat, tmp_path / "big", "--max_length=256"), stage="sft")
    rows, pad = data.train.select(range(4)).to_list(), data.tokenizer.pad_token_id
    assert len(set(sum(label != -100 for label in r["labels"]) for r in rows)) > 1
    micro_means = (_hf_loss(tiny_model_dir, rows[:2], pad) + _hf_loss(tiny_model_dir, rows[2:], pad)) / 2
    assert abs(micro_means - b["loss"]) > 1e-4  # the old definition would have been caught
    assert a["loss"] == pytest.approx(_hf_loss(tiny_model_dir, rows, pad), rel=1e-5)

    wa, wb = (
        load_file(tmp_path / "acc" / "model.safetensors"),
        load_file(tmp_path / "big" / "model.safetensors"),
    )
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ld_alpha_precomputed_reference_matches_the_frozen_one(tmp_path, tiny_model_dir, prefs, cache):
    """LD-DPO weights the reference's log-probs too: the precomputed cache (keyed by ld_alpha) must hold the weighted
    ones, so both paths train identically, and differently from plain DPO."""
    frozen = _dpo(tiny_model_dir, prefs, tmp_path / "frozen", "--max_steps=2", "--ld_alpha=0.3")
    pre = _dpo(
        tiny_model_dir,
        prefs,
        tmp_path / "pre",
        "--max_steps=2",
        "--ld_alpha=0.3",
        "--precompute_ref_log_probs=true",
    )
    plain = _dpo(tiny_model_dir, prefs, tmp_path / "plain", "--max_steps=2")
    want, got, base = (_steps(r.state.log_history) for r in (frozen, pre, plain))
    for a, b in zip(want, got, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert abs(want[-1]["logps/rejected"] - base[-1]["logps/rejected"]) > 1e-3
