"""`zephyr kto`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306), as TRL 1.16's KTOTrainer.

    zephyr kto --config recipes/zephyr-7b-beta/kto.yaml                    # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr kto --config recipes/zephyr-7b-beta/kto.yaml

KTO learns from single completions labelled desirable or undesirable: rows `prompt` / `completion` / `label`, or
preference pairs, which the data pipeline unpairs as TRL does (`zephyr.data.schemas.unpair`). `KTORecipe` has DPO's
shape and reuses its pieces (the reference model, `dpo.model_inputs`, the completion head, the loop):
- `setup`: the accelerator, the tokenized rows, the class weights, the policy, the reference (a frozen copy of the
  starting model, or with LoRA the policy with its adapters disabled);
- `forward`: the batch's sequences through the completion head (log-probs, entropy and logit sums), and the KL
  sequences without gradient;
- `train_step`: the reference log-probs, `objectives.kto_kl` and `objectives.kto_loss`, TRL's metrics;
- `evaluate`: `train_step` on the held-out rows; `save`: the model folder.

The KL term is TRL's: each micro-batch's completions rotated by one, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}),
scored by policy and reference. TRL rotates within fixed blocks of `per_device_train_batch_size` rows of the dataset
in file order (so it needs sequential sampling); Zephyr's collator rotates within the micro-batch it is given, which is
the same rows under `train_sampling_strategy: sequential` and stays a mismatched batch under random order. For eval
TRL's blocks are still of the train batch size; the two agree when the eval batch size is the same.

Reference log-probs are computed in each step (TRL's `precompute_ref_log_probs` is not implemented yet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from zephyr.data.tokenize import preference_sequence
from zephyr.errors import DataError
from zephyr.train.collate import count_tokens
from zephyr.train.dpo import load_reference_model, model_inputs
from zephyr.train.fused_head import SequenceLogps, attach_completion_head
from zephyr.train.loop import StepOutput, TrainResult, evaluate, train
from zephyr.train.objectives import KTOLossOutput, kto_class_weights, kto_kl, kto_loss
from zephyr.train.save import finish
from zephyr.train.setup import load_policy, start_stage, wrap_lora


def run_kto(cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> TrainResult:
    """Train CFG's KTO stage; ON_SAVED gets the saved folder on the main process (`zephyr.stages` writes the card)."""
    return KTORecipe(cfg, progress=progress, on_saved=on_saved).run()


class KTOLogps(NamedTuple):
    """One KTO forward of B rows.

    policy: `SequenceLogps` of the B completions (sums, token counts, entropy and logit sums); differentiable.
    kl:     [B] Σ log-probs of the mismatched completions (`KTOCollator`), no gradient; None without a KL term.
    """

    policy: SequenceLogps
    kl: Tensor | None


class KTORecipe:
    """setup -> (train: forward -> train_step, evaluate) -> save. See the module docstring."""

    def __init__(self, cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None):
        self.cfg, self.progress, self.on_saved = cfg, progress, on_saved
        self.with_kl = cfg.loss_type == "kto"  # apo_zero_unpaired has no reference point
        self.ref_model = None  # None with LoRA: the reference is the policy with its adapters disabled

    def run(self) -> TrainResult:
        self.setup()
        result = train(
            self.cfg,
            accelerator=self.accelerator,
            model=self.policy,
            objective=self.train_step,
            train_dataset=self.train_rows,
            collate=self.collate,
            eval_dataset=self.test_rows,
            progress=self.progress,
            data_identity=self.data.train._fingerprint,
        )
        return self.save(result)

    # ---- setup

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator, self.tokenizer, self.data = start_stage(cfg, data_stage="kto")
        accelerator = self.accelerator
        self.train_rows, self.test_rows = self.data.train, self.data.test
        cfg.desirable_weight, cfg.undesirable_weight, note = class_weights(cfg, self.train_rows["label"])
        accelerator.print(note)

        self.policy = load_policy(cfg, self.tokenizer)
        attach_completion_head(self.policy)
        self.collate = KTOCollator(pad_token_id=self.tokenizer.pad_token_id, max_length=cfg.max_length)
        self.ref_name = cfg.ref_model_name_or_path or cfg.model_name_or_path
        if not cfg.use_peft or cfg.ref_model_name_or_path:
            self.ref_model = load_reference_model(cfg, self.ref_name, accelerator)
        if cfg.use_peft:
            self.policy = wrap_lora(cfg, self.policy)
            if accelerator.is_main_process:
                self.policy.print_trainable_parameters()

    # ---- a step

    def forward(self, model, batch: dict[str, Tensor], *, with_metrics: bool = True) -> KTOLogps:
        """The batch's B completions through MODEL, and its B mismatched (KL) completions without gradient."""
        inputs, _ = model_inputs(model, batch)
        policy = model(**inputs, with_metrics=with_metrics)
        kl = None
        if self.with_kl:
            kl_inputs, _ = model_inputs(model, kl_batch(batch))
            with torch.no_grad():
                kl = model(**kl_inputs, with_metrics=False).logps
        return KTOLogps(policy, kl)

    def reference_forward(self, model, batch: dict[str, Tensor]) -> KTOLogps:
        """The same through the reference: the frozen model, or for LoRA the policy with its adapters disabled."""
        with torch.no_grad():
            if self.ref_model is not None:
                with self.accelerator.autocast():
                    return self.forward(self.ref_model, batch, with_metrics=False)
            with self.accelerator.unwrap_model(model).disable_adapter():
                return self.forward(model, batch, with_metrics=False)

    def train_step(self, model, batch: dict[str, Tensor]) -> StepOutput:
        """KTO's loss on a micro-batch of labelled completions, and TRL's KTO metrics."""
        cfg = self.cfg
        policy = self.forward(model, batch)
        reference = self.reference_forward(model, batch)
        desirable = batch["label"].bool()
        logratios = policy.policy.logps - reference.policy.logps.to(policy.policy.logps.dtype)
        if self.with_kl:
            kl = kto_kl(policy.kl, reference.kl, gather=self.accelerator.gather)
        else:  # TRL logs kl 0 for loss types without the term
            kl = torch.zeros((), device=logratios.device)
        out = kto_loss(
            logratios[desirable],
            logratios[~desirable],
            kl,
            loss_type=cfg.loss_type,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
        metrics = kto_metrics(out, policy.policy, desirable, gather=self.accelerator.gather)
        return StepOutput(
            loss=out.losses.nanmean(),
            metrics={k: float(v) for k, v in metrics.items()},
            num_rows=len(desirable),
            num_tokens=count_tokens(batch),
        )

    def evaluate(self, model, loader: DataLoader) -> dict[str, float]:
        """`eval_*` metrics of MODEL on LOADER's rows, as the loop logs them."""
        return evaluate(self.accelerator, model, self.train_step, loader)

    # ---- save

    def save(self, result: TrainResult) -> TrainResult:
        extra = {"reference_model": self.ref_name}
        return finish(self.accelerator, result, self.tokenizer, self.cfg, extra=extra, on_saved=self.on_saved)


# ---------------------------------------------------------------------------------------------- data


def class_weights(cfg, labels: list[bool]) -> tuple[float, float, str]:
    """(desirable_weight, undesirable_weight, the line that says so) for the train split's LABELS. Values the recipe
    sets are obeyed; unset ones come from the class counts (`objectives.kto_class_weights`). A split with one class
    only is refused: KTO's loss needs both desirable and undesirable examples."""
    num_desirable = sum(bool(label) for label in labels)
    num_undesirable = len(labels) - num_desirable
    if num_desirable == 0 or num_undesirable == 0:
        raise DataError(
            f"the KTO train split has {num_desirable} desirable and {num_undesirable} undesirable rows; KTO needs "
            "both (label true and label false), or preference pairs (prompt / chosen / rejected), which give one of each"
        )
    counts = f"{num_desirable} desirable and {num_undesirable} undesirable rows"
    if cfg.desirable_weight is None and cfg.undesirable_weight is None:
        desirable, undesirable = kto_class_weights(num_desirable, num_undesirable)
        how = "chosen from the class counts, so that λ_D n_D / λ_U n_U is in [1, 4/3] (KTO paper, Eq. 8)"
    else:
        desirable = 1.0 if cfg.desirable_weight is None else float(cfg.desirable_weight)
        undesirable = 1.0 if cfg.undesirable_weight is None else float(cfg.undesirable_weight)
        how = "as the recipe sets them"
    note = f"kto: {counts}; desirable_weight {desirable:g}, undesirable_weight {undesirable:g}, {how}"
    return desirable, undesirable, note


@dataclass
class KTOCollator:
    """TRL 1.16's `DataCollatorForUnpairedPreference` with its KL sequences built in the batch.

    Rows {prompt_input_ids, completion_input_ids, label} -> input_ids, attention_mask, completion_mask [B, T]
    (right-padded, each sequence cut to max_length from the end), the same under `KL_` for the mismatched sequences
    [B, T'] (prompt i with the completion of row i - 1, row 0 with the last row's), and label [B] bool."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        completions = [row["completion_input_ids"] for row in rows]
        batch = self._sequences(rows, completions)
        batch |= {f"KL_{k}": v for k, v in self._sequences(rows, completions[-1:] + completions[:-1]).items()}
        batch["label"] = torch.tensor([bool(row["label"]) for row in rows])
        return batch

    def _sequences(self, rows: list[dict], completions: list[list[int]]) -> dict[str, Tensor]:
        cut = [
            preference_sequence(
                row["prompt_input_ids"], completion, max_length=self.max_length, truncation_mode="keep_start"
            )
            for row, completion in zip(rows, completions, strict=True)
        ]
        width = max(len(ids) for ids, _ in cut)
        input_ids = torch.full((len(cut), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(cut), width), dtype=torch.long)
        completion_mask = torch.zeros((len(cut), width), dtype=torch.long)
        for i, (ids, mask) in enumerate(cut):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            completion_mask[i, : len(ids)] = torch.tensor(mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def kl_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The KL sequences of a `KTOCollator` batch, under the plain names `dpo.model_inputs` reads."""
    return {k: batch[f"KL_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")}


# ---------------------------------------------------------------------------------------------- metrics


def kto_metrics(
    out: KTOLossOutput,
    policy: SequenceLogps,
    desirable: Tensor,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """TRL 1.16 KTOTrainer's metrics of one micro-batch, as 0-dim float tensors under its names.

    out: the loss's output; policy: the B completions' `SequenceLogps` (with_metrics); desirable: [B] bool.
    gather concatenates a 1-D tensor across processes (`accelerator.gather`); None for one process.
    As TRL: rewards/* and logps/* are sums over one class's rows of all processes divided by that class's count,
    logged only when the micro-batch (all processes) has rows of that class, and rewards/margins only when it has
    both; logits/* and entropy are token-weighted over the class's (all) completion tokens; kl is the step's z0.
    The loop averages each over the micro-batches of a logging window that logged it, as TRL's `_metrics`.
    """
    gather = gather or (lambda t: t)

    def total(values: Tensor) -> Tensor:
        return gather(values.detach().float().nansum().reshape(1)).nansum()

    undesirable = ~desirable
    logps = policy.logps.detach()
    metrics = {"kl": out.kl.float()}
    tokens = total(policy.token_counts)
    metrics["entropy"] = total(policy.entropy_sum) / tokens if tokens > 0 else torch.zeros_like(tokens)
    for name, rows in (("chosen", desirable), ("rejected", undesirable)):
        class_tokens = total(policy.token_counts[rows])
        if class_tokens > 0:
            metrics[f"logits/{name}"] = total(policy.logits_sum[rows]) / class_tokens
    counts = {}
    for name, rows, rewards in (
        ("chosen", desirable, out.chosen_rewards),
        ("rejected", undesirable, out.rejected_rewards),
    ):
        counts[name] = total(rows)
        if counts[name] > 0:
            metrics[f"rewards/{name}"] = total(rewards) / counts[name]
            metrics[f"logps/{name}"] = total(logps[rows]) / counts[name]
    if counts["chosen"] > 0 and counts["rejected"] > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
