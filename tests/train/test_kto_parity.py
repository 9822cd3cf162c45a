"""`zephyr kto` against TRL 1.16's KTOTrainer (the oracle): same tiny model, data, order and hyperparameters give the
same loss and metrics step by step, and the same held-out eval metrics.

Two data shapes: unpaired rows (prompt / completion / label, classes mixed within batches, explicit class weights),
and preference pairs that each side unpairs its own way (TRL's `unpair_preference_dataset`, Zephyr's
`schemas.unpair`) into blocks of desirable then undesirable rows, so that whole micro-batches hold one class and the
metrics TRL logs only for a class present (rewards/rejected, logits/rejected, rewards/margins, ...) are left out of
those steps on both sides. Both tokenize with their own code; the test checks the ids agree (the tiny ChatML template
renders a prompt the same way alone and followed by a reply).
"""

from __future__ import annotations

import json
import math

import pytest

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.slow

STEPS = 3
TOLERANCE = 1e-4  # relative, per the issue
METRICS = [
    "kl", "entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "logps/chosen", "rewards/rejected",
    "logps/rejected", "rewards/margins",
]  # fmt: skip
COMPARED = ["loss", "grad_norm", "learning_rate", *METRICS]


def _prompt(i: int) -> list[dict]:
    prompt = [{"role": "user", "content": f"What is {i} + {i + 1}?"}]
    if i % 3 == 0:  # some multi-turn prompts with a system message
        prompt = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi."},
            *prompt,
        ]
    return prompt


def _good(i: int) -> list[dict]:
    return [{"role": "assistant", "content": f"The answer is {2 * i + 1}."}]


def _bad(i: int) -> list[dict]:
    return [{"role": "assistant", "content": f"It is {2 * i + 3}, I think, " + "maybe " * (i % 4)}]


def unpaired_rows(n: int, offset: int = 0) -> list[dict]:
    """Mixed labels: every micro-batch of 4 holds both classes, in varying numbers."""
    return [
        {"prompt": _prompt(i), "completion": _good(i) if i % 3 else _bad(i), "label": bool(i % 3)}
        for i in range(offset, offset + n)
    ]


def paired_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt": _prompt(i), "chosen": _good(i), "rejected": _bad(i)} for i in range(offset, offset + n)
    ]


# (rows, TRL's keys; Zephyr is given the same). Paired data: balanced, so Zephyr's default weights are TRL's 1 and 1.
VARIANTS = {
    "unpaired": (unpaired_rows, {"desirable_weight": 1.0, "undesirable_weight": 1.3}),
    "paired": (paired_rows, {}),
}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-7)


def _write_data(directory, rows_by_split):
    directory.mkdir()
    for name, rows in rows_by_split.items():
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return directory


@pytest.fixture(scope="module", params=list(VARIANTS))
def parity_runs(request, tmp_path_factory, tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from zephyr.data.prepare import prepare
    from zephyr.recipe import load_config
    from zephyr.train.kto import run_kto

    make_rows, trl_keys = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(f"kto-parity-{request.param}")
    n_train = 8 if request.param == "paired" else 16
    train_rows, test_rows = make_rows(n_train), make_rows(4 if request.param == "paired" else 8, offset=100)
    data_dir = _write_data(tmp / "data", {"train": train_rows, "test": test_rows})
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
        gradient_checkpointing=False,
        **trl_keys,
    )
    trl_args = KTOConfig(
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
    trainer = KTOTrainer(
        model=str(tiny_model_dir),
        args=trl_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(test_rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    trl_steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    trl_eval = trainer.evaluate()

    overrides = [f"--{k}={v}" for k, v in common.items()] + [
        f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data_dir}", f"--output_dir={tmp / 'zephyr'}",
        "--bf16=false", "--train_sampling_strategy=sequential", "--auto_insert_empty_system_msg=false",
        "--chat_template=auto", "--save_strategy=no", "--eval_strategy=steps", f"--eval_steps={STEPS}",
    ]  # fmt: skip
    cfg = load_config("kto", None, overrides)

    # Both sides tokenized and unpaired with their own code: the same rows, labels and ids.
    ours = prepare(cfg, stage="kto").train
    assert len(ours) == len(trainer.train_dataset)
    for mine, theirs in zip(ours, trainer.train_dataset, strict=True):
        assert mine["prompt_input_ids"] == theirs["prompt_ids"]
        assert mine["completion_input_ids"] == theirs["completion_ids"]
        assert mine["label"] == theirs["label"]
    longest = max(len(r["prompt_input_ids"]) + len(r["completion_input_ids"]) for r in ours)
    assert longest > common["max_length"], "the data should exercise truncation"

    result = run_kto(cfg, progress=False)
    log = result.state.log_history
    mine = [r for r in log if "loss" in r]
    our_eval = next(r for r in log if "eval_loss" in r)
    return trl_steps, mine, trl_eval, our_eval


def test_training_metrics_match_trl_step_by_step(parity_runs):
    trl_steps, ours, _, _ = parity_runs
    assert len(trl_steps) == len(ours) == STEPS
    worst = {}
    for step, (theirs, mine) in enumerate(zip(trl_steps, ours, strict=True), start=1):
        logged = [k for k in COMPARED if k in theirs]
        assert [k for k in COMPARED if k in mine] == logged, f"step {step}: metrics logged differ"
        for key in logged:
            worst[key] = max(worst.get(key, 0.0), _relative(mine[key], theirs[key]))
            assert _close(mine[key], theirs[key]), (
                f"step {step} {key}: zephyr {mine[key]} vs TRL {theirs[key]}"
            )
    print("largest relative difference per metric:", json.dumps(worst))
    assert ours[-1]["rewards/chosen" if "rewards/chosen" in ours[-1] else "rewards/rejected"] != 0  # it moved


def test_eval_metrics_match_trl_evaluate(parity_runs):
    _, _, trl_eval, our_eval = parity_runs
    names = [f"eval_{k}" for k in ["loss", *METRICS] if f"eval_{k}" in trl_eval]
    assert names == [f"eval_{k}" for k in ["loss", *METRICS] if f"eval_{k}" in our_eval]
    print("eval relative differences:", json.dumps({k: _relative(our_eval[k], trl_eval[k]) for k in names}))
    for name in names:
        assert _close(our_eval[name], trl_eval[name]), (
            f"{name}: zephyr {our_eval[name]} vs TRL {trl_eval[name]}"
        )
