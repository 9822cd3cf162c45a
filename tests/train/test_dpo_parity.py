"""`zephyr dpo` against TRL's DPOTrainer (the oracle): same tiny model, data, order and hyperparameters give the same
loss and metrics step by step, and the same held-out eval metrics as TRL's `evaluate()`."""

from __future__ import annotations

import json
import math

import pytest

trl = pytest.importorskip("trl")

STEPS = 4
TOLERANCE = 1e-4  # relative, per the issue
COMPARED = [
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
    "mean_token_accuracy", "num_tokens",
]  # fmt: skip


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = [{"role": "user", "content": f"What is {i} + {i + 1}?"}]
        if i % 3 == 0:  # some multi-turn prompts with a system message
            prompt = [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."},
                *prompt,
            ]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": f"The answer is {2 * i + 1}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + 3}, I think, " + "maybe " * (i % 4)}],
        })  # fmt: skip
    return rows


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-7)


# Settings beyond plain DPO whose numbers TRL defines (LD-DPO's length-desensitised log-probs, WPO's weights), in
# TRL's layout of two padded rows per pair, and Zephyr's default packed layout with shared prompts, which must give
# TRL's numbers: (TRL's keys, Zephyr's extra keys).
TRL_LAYOUT = {"prefix_sharing": False}
VARIANTS = {
    "dpo": ({}, TRL_LAYOUT),
    "ld_alpha": ({"ld_alpha": 0.5}, TRL_LAYOUT),
    "wpo": ({"use_weighting": True}, TRL_LAYOUT),
    "prefix_sharing": ({}, {}),  # the default
    "prefix_sharing_ld_alpha": ({"ld_alpha": 0.5}, {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def parity_runs(request, tmp_path_factory, tiny_model_dir):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from zephyr.recipe import load_config
    from zephyr.train.dpo import run_dpo

    tmp = tmp_path_factory.mktemp(f"parity-{request.param}")
    train_rows, test_rows = _rows(16), _rows(6, offset=100)
    data_dir = tmp / "prefs"
    data_dir.mkdir()
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    common = dict(
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        max_length=96,
        beta=0.1,
        seed=0,
        warmup_steps=1,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        **VARIANTS[request.param][0],
    )
    trl_args = DPOConfig(
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
    trainer = DPOTrainer(
        model=str(tiny_model_dir),
        args=trl_args,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=None,
    )
    trainer.train()
    trl_steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    trl_eval = trainer.evaluate(Dataset.from_list(test_rows))

    overrides = [f"--{k}={v}" for k, v in common.items()] + [
        f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data_dir}", f"--output_dir={tmp / 'zephyr'}",
        "--bf16=false", "--train_sampling_strategy=sequential", "--auto_insert_empty_system_msg=false",
        "--chat_template=auto", "--save_strategy=no", "--eval_strategy=steps", f"--eval_steps={STEPS}",
        "--gradient_checkpointing=false",
    ] + [f"--{k}={v}" for k, v in VARIANTS[request.param][1].items()]  # fmt: skip
    from transformers import AttentionInterface

    from zephyr.train import pair_attention

    pair_attention.register()
    original, per_pair = AttentionInterface._global_mapping[pair_attention.NAME], []

    def counting(*args, **kwargs):  # prefix sharing must run its per-pair attention, not the masked row
        per_pair.append(kwargs.get("pair_segments") is not None)
        return original(*args, **kwargs)

    AttentionInterface._global_mapping[pair_attention.NAME] = counting
    try:
        result = run_dpo(load_config("dpo", None, overrides), progress=False)
    finally:
        AttentionInterface._global_mapping[pair_attention.NAME] = original
    sharing = VARIANTS[request.param][1].get("prefix_sharing", True)
    assert any(per_pair) == sharing, (
        "per-pair attention ran" if not sharing else "per-pair attention never ran"
    )
    log = result.state.log_history
    ours = [r for r in log if "loss" in r]
    our_eval = next(r for r in log if "eval_loss" in r)
    longest = max(
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
        for r in trainer.train_dataset
    )
    assert longest > common["max_length"], "the data should exercise truncation"
    if request.param == "wpo":  # the weights are < 1, so even the first step (policy = reference) shows them
        assert ours[0]["loss"] < math.log(2) - 1e-3
    return trl_steps, ours, trl_eval, our_eval


def test_training_metrics_match_trl_step_by_step(parity_runs):
    trl_steps, ours, _, _ = parity_runs
    assert len(trl_steps) == len(ours) == STEPS
    for step, (theirs, mine) in enumerate(zip(trl_steps, ours, strict=True), start=1):
        for key in COMPARED:
            assert _close(mine[key], theirs[key]), (
                f"step {step} {key}: zephyr {mine[key]} vs TRL {theirs[key]}"
            )
    # the run actually learned something, so agreement is not the trivial loss = log 2 everywhere
    assert ours[-1]["rewards/margins"] > 0 and ours[-1]["loss"] < math.log(2) - 1e-3


def test_eval_metrics_match_trl_evaluate(parity_runs):
    _, _, trl_eval, our_eval = parity_runs
    for key in ["loss", *COMPARED[3:13]]:
        name = f"eval_{key}"
        assert _close(our_eval[name], trl_eval[name]), (
            f"{name}: zephyr {our_eval[name]} vs TRL {trl_eval[name]}"
        )
