"""`zephyr orpo` against TRL's ORPOTrainer (the oracle): same tiny model, data, order and hyperparameters give the
same loss and metrics step by step, and the same held-out eval metrics.

Tokens, as in test_cpo_parity.py: TRL's ORPO `tokenize_row` (CPO's) adds a BOS before a prompt that does not start
with one and an EOS after a completion that does not end with one; Zephyr keeps the chat template's tokens. The
runs use a template that writes both, so that each side tokenizes with its own code and the ids agree (checked).
"""

from __future__ import annotations

import json

import pytest
from test_cpo_parity import BOS_EOS_TEMPLATE, _close, _relative, _rows, _write_data

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.slow

STEPS = 3
COMPARED = [
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss",
    "log_odds_ratio", "log_odds_chosen",
]  # fmt: skip


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from tiny import save_tiny, tiny_tokenizer
    from zephyr.data.prepare import prepare
    from zephyr.data.tokenize import preference_sequence
    from zephyr.recipe import load_config
    from zephyr.train.orpo import run_orpo

    tmp = tmp_path_factory.mktemp("orpo-parity")
    model_dir = save_tiny(tmp / "tiny-bos-eos")
    tiny_tokenizer(BOS_EOS_TEMPLATE).save_pretrained(model_dir)
    train_rows, test_rows = _rows(16), _rows(6, offset=100)
    data_dir = _write_data(tmp / "prefs", {"train": train_rows, "test": test_rows})
    common = dict(
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        max_length=96,
        beta=0.25,
        seed=0,
        warmup_steps=1,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
    )
    trl_args = ORPOConfig(
        output_dir=str(tmp / "trl"),
        report_to=[],
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        optim="adamw_torch",
        **common,
    )
    trainer = ORPOTrainer(
        model=str(model_dir),
        args=trl_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(test_rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    trl_steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    trl_eval = trainer.evaluate()

    overrides = [f"--{k}={v}" for k, v in common.items()] + [
        f"--model_name_or_path={model_dir}", f"--dataset_name={data_dir}", f"--output_dir={tmp / 'zephyr'}",
        "--bf16=false", "--train_sampling_strategy=sequential", "--auto_insert_empty_system_msg=false",
        "--chat_template=auto", "--save_strategy=no", "--eval_strategy=steps", f"--eval_steps={STEPS}",
    ]  # fmt: skip
    cfg = load_config("orpo", None, overrides)

    # Both sides tokenized with their own code: the same ids, and the same truncation (TRL cuts the completion's end).
    ours = prepare(cfg, stage="dpo").train
    for mine, theirs in zip(ours, trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected"):
            ids, mask = preference_sequence(
                mine["prompt_input_ids"],
                mine[f"{side}_input_ids"],
                max_length=96,
                truncation_mode="keep_start",
            )
            assert ids == theirs[f"{side}_input_ids"]
            assert [t if m else -100 for t, m in zip(ids, mask, strict=True)] == theirs[f"{side}_labels"]
    longest = max(len(r["prompt_input_ids"]) + len(r["rejected_input_ids"]) for r in ours)
    assert longest > common["max_length"], "the data should exercise truncation"

    result = run_orpo(cfg, progress=False)
    log = result.state.log_history
    mine = [r for r in log if "loss" in r]
    our_eval = next(r for r in log if "eval_loss" in r)
    return trl_steps, mine, trl_eval, our_eval


def test_training_metrics_match_trl_step_by_step(parity_runs):
    trl_steps, ours, _, _ = parity_runs
    assert len(trl_steps) == len(ours) == STEPS
    worst = {k: max(_relative(m[k], t[k]) for m, t in zip(ours, trl_steps, strict=True)) for k in COMPARED}
    print("largest relative difference per metric:", json.dumps(worst))
    for step, (theirs, mine) in enumerate(zip(trl_steps, ours, strict=True), start=1):
        for key in COMPARED:
            assert _close(mine[key], theirs[key]), (
                f"step {step} {key}: zephyr {mine[key]} vs TRL {theirs[key]}"
            )
    assert ours[-1]["loss"] < ours[0]["loss"]  # it learned, so agreement is not trivial


def test_eval_metrics_match_trl_evaluate(parity_runs):
    _, _, trl_eval, our_eval = parity_runs
    names = [f"eval_{key}" for key in ["loss", *COMPARED[3:]]]
    print("eval relative differences:", json.dumps({k: _relative(our_eval[k], trl_eval[k]) for k in names}))
    for name in names:
        assert _close(our_eval[name], trl_eval[name]), (
            f"{name}: zephyr {our_eval[name]} vs TRL {trl_eval[name]}"
        )
