"""`zephyr eval prefs`: DPO's eval metrics on held-out preference pairs, for any trained model.

    zephyr eval prefs --model outputs/dpo --data data/demo/ultrafeedback --split test_prefs --output prefs.json

The numbers are training's eval metrics (`eval_loss`, `eval_rewards/accuracies`, ... in TRL's definitions and
reductions) without the `eval_` prefix: the same data pipeline, objective and `evaluate` the DPO loop runs, so a
run's last eval and this command agree on the same model, reference and data. The reference is the one the run
recorded (a DPO run's `reference_model`, else its base model) unless `--ref-model` says otherwise, and so are beta
and the tokenization settings (max_length, max_prompt_length, truncation_mode, chat template) unless given.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from zephyr.data.prepare import load_recipe_tokenizer, prepare
from zephyr.errors import ZephyrError
from zephyr.models import load_model
from zephyr.recipe import load_config
from zephyr.run_record import RECORD_FILE, RunRecord
from zephyr.train.collate import PreferenceCollator
from zephyr.train.dpo import DPORecipe
from zephyr.train.fused_head import attach_completion_head
from zephyr.train.setup import make_accelerator

METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def recorded_reference(model: str) -> str:
    """The reference model a run's rewards are measured against: what MODEL's `zephyr_run.json` recorded."""
    try:
        record = RunRecord.read(model)
    except ZephyrError as err:
        raise ZephyrError(
            f"{err}; its reference model is unknown: pass --ref-model (the model DPO started from, e.g. the SFT output)"
        ) from err
    reference = record.reference_model or record.base_model
    if not reference:
        raise ZephyrError(f"{Path(model) / RECORD_FILE} names no base or reference model; pass --ref-model")
    return reference


# The settings that shape a pair's tokens and rewards: taken from the run's record unless given, so that this command
# and the run's own last eval measure the same thing.
RECORDED_KEYS = (
    "beta", "max_length", "max_prompt_length", "truncation_mode", "chat_template", "auto_insert_empty_system_msg",
)  # fmt: skip


def recorded_settings(model: str) -> dict:
    """RECORDED_KEYS from MODEL's `zephyr_run.json` (a DPO run's; {} for other folders)."""
    try:
        record = RunRecord.read(model)
    except ZephyrError:
        return {}
    keys = RECORDED_KEYS if record.stage == "dpo" else tuple(k for k in RECORDED_KEYS if k != "beta")
    # an SFT run's beta is the default; its template settings still apply
    return {k: record.config[k] for k in keys if k in record.config}


def eval_prefs(
    model: str,
    *,
    data: str,
    ref_model: str | None = None,
    split: str = "test_prefs",
    beta: float | None = None,
    loss_type: str = "sigmoid",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    schema: str | None = None,
    output: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """DPO eval metrics of MODEL against REF_MODEL on DATA's SPLIT; written to OUTPUT as JSON when given."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    reference = ref_model or recorded_reference(model)
    given = {"beta": beta, "max_length": max_length, "max_prompt_length": max_prompt_length}
    settings = {**recorded_settings(model), **{k: v for k, v in given.items() if v is not None}}
    with tempfile.TemporaryDirectory(prefix="zephyr-eval-") as scratch:
        overrides = {
            **{k: v for k, v in settings.items() if v is not None},
            "model_name_or_path": model,
            "ref_model_name_or_path": reference,
            "dataset_name": data,
            # the split to score is read as the "train" split of a one-split load; nothing is trained
            "dataset_train_split": split,
            "dataset_test_split": split,
            "loss_type": [loss_type],
            "per_device_eval_batch_size": batch_size,
            "output_dir": scratch,
            "bf16": False,
        }
        if schema is not None:
            overrides["schema"] = schema
        cfg = load_config("dpo", None, [f"--{k}={_cli_value(v)}" for k, v in overrides.items()])
        accelerator = make_accelerator(cfg)
        recipe = DPORecipe.for_evaluation(
            cfg, accelerator, ref_model=None
        )  # a bad loss: refused before loading

        tokenizer = load_recipe_tokenizer(cfg)
        pairs = prepare(cfg, stage="dpo", tokenizer=tokenizer).train
        policy, ref = (
            load_model(name, dtype=cfg.dtype).eval().requires_grad_(False) for name in (model, reference)
        )
        for m in (policy, ref):
            attach_completion_head(m)
        policy, ref = (
            accelerator.prepare_model(policy, evaluation_mode=True),
            accelerator.prepare_model(ref, evaluation_mode=True),
        )
        collate = PreferenceCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=cfg.max_length,
            truncation_mode=cfg.truncation_mode,
        )
        loader = accelerator.prepare_data_loader(
            DataLoader(pairs, batch_size=batch_size, shuffle=False, collate_fn=collate)
        )
        if progress and accelerator.is_main_process:
            loader = tqdm(loader, desc=f"scoring {len(pairs)} pairs", unit="batch")
        recipe.ref_model = ref
        metrics = recipe.evaluate(policy, loader)
    result = {key: metrics[f"eval_{key}"] for key in METRIC_KEYS}
    result["pairs"] = len(pairs)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(
            json.dumps(
                {**result, "model": model, "ref_model": reference, "data": data, "split": split}, indent=1
            )
        )
    return result


def _cli_value(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)
