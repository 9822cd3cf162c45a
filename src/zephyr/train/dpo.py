"""`zephyr dpo`: Direct Preference Optimization, the second stage of the Zephyr recipe.

    zephyr dpo --config recipes/zephyr-7b-beta/dpo.yaml                    # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr dpo --config recipes/zephyr-7b-beta/dpo.yaml

`DPORecipe` reads top to bottom:
- `setup`: the accelerator, the tokenized pairs, the policy, the batch layout (TRL's two padded rows per pair, or
  one packed row per micro-batch with each prompt once), the reference (a frozen copy, the base model with LoRA
  adapters disabled, or its log-probs precomputed and cached);
- `concatenated_forward`: chosen and rejected through one forward pass, completion log-probs from the chunked LM
  head (never the full [tokens, vocab] logits);
- `train_step`: the reference log-probs and the objective `loss_type` names (`zephyr.train.objectives`), with TRL's
  metric names and reductions;
- `evaluate`: `train_step` on the held-out pairs; `save`: the model folder.
The loop between them is `zephyr.train.loop.train`, shared with SFT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zephyr.data.tokenize import IGNORE_INDEX
from zephyr.errors import ConfigError
from zephyr.fetch import zephyr_cache_dir
from zephyr.models import load_model, model_identity
from zephyr.train import pair_attention
from zephyr.train.checkpoint import fault_point
from zephyr.train.collate import PreferenceCollator, count_tokens
from zephyr.train.distributed import is_sharded, shard_reference, whole_weights_on_every_process
from zephyr.train.fused_head import SequenceLogps, attach_completion_head
from zephyr.train.loop import StepOutput, TrainResult, evaluate, train
from zephyr.train.objectives import (
    check_loss_config,
    dpo_loss,
    length_desensitised_logps,
    preference_metrics,
    wpo_weights,
)
from zephyr.train.save import finish
from zephyr.train.setup import load_policy, start_stage, wrap_lora
from zephyr.train.shared_prefix import (
    SUPPORTED_ATTENTION,
    SharedPrefixCollator,
    attention_implementation,
    model_attention_mask,
)

REF_CACHE_FORMAT = 1


def run_dpo(cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> TrainResult:
    """Train CFG's DPO stage; ON_SAVED gets the saved folder on the main process (`zephyr.stages` writes the card)."""
    return DPORecipe(cfg, progress=progress, on_saved=on_saved).run()


class PairLogps(NamedTuple):
    """One [chosen; rejected] forward of B pairs.

    chosen_logps, rejected_logps: [B] sequence log-probs as the loss reads them (LD-DPO's weighting with ld_alpha).
    chosen, rejected:             `SequenceLogps` of the B chosen / B rejected completions: plain sums, token
                                  counts and the sums TRL's metrics are built from.
    labels:                       [2B, T] completion labels, IGNORE_INDEX outside completions.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen: SequenceLogps
    rejected: SequenceLogps
    labels: torch.Tensor


class DPORecipe:
    """setup -> (train: concatenated_forward -> train_step, evaluate) -> save. See the module docstring."""

    def __init__(self, cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None):
        self.cfg, self.progress, self.on_saved = cfg, progress, on_saved
        # Normalised loss types and weights; a bad combination is refused here, before anything loads.
        self.loss_types, self.loss_weights = check_loss_config(
            cfg.loss_type,
            cfg.loss_weights,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            f_divergence_type=cfg.f_divergence_type,
            use_weighting=cfg.use_weighting,
        )
        # A TRL key the config accepts that this stage does not implement yet: refused, never silently ignored.
        if cfg.sync_ref_model:
            raise ConfigError(
                "sync_ref_model is not supported by zephyr dpo yet and would be ignored; remove it from the recipe"
            )
        self.ref_model = None  # None: precomputed log-probs, LoRA's disabled adapters, or reference_free

    @classmethod
    def for_evaluation(cls, cfg, accelerator, ref_model) -> DPORecipe:
        """A recipe whose `train_step` scores pairs of an already loaded policy against REF_MODEL (eval prefs)."""
        recipe = cls(cfg, progress=False)
        recipe.accelerator, recipe.ref_model = accelerator, ref_model
        return recipe

    def run(self) -> TrainResult:
        self.setup()
        result = train(
            self.cfg,
            accelerator=self.accelerator,
            model=self.policy,
            objective=self.train_step,
            train_dataset=self.train_pairs,
            collate=self.collate,
            eval_dataset=self.test_pairs,
            progress=self.progress,
            data_identity=self.data.train._fingerprint,
        )
        return self.save(result)

    # ---- setup

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator, self.tokenizer, self.data = start_stage(cfg, data_stage="dpo")
        accelerator = self.accelerator
        self.train_pairs, self.test_pairs = self.data.train, self.data.test

        self.policy = load_policy(cfg, self.tokenizer)
        attach_completion_head(self.policy)
        self.collate = preference_collator(cfg, self.tokenizer, self.policy, accelerator)
        cfg.prefix_sharing = isinstance(self.collate, SharedPrefixCollator)  # what runs, for the run record
        self.ref_name = cfg.ref_model_name_or_path or cfg.model_name_or_path
        if not cfg.reference_free and (not cfg.use_peft or cfg.ref_model_name_or_path):
            self.ref_model = self.load_reference()
        if cfg.use_peft:
            self.policy = wrap_lora(cfg, self.policy)
            if accelerator.is_main_process:
                self.policy.print_trainable_parameters()

        cfg.precompute_ref_log_probs, why = precompute_choice(
            cfg, len(self.train_pairs), accelerator.num_processes, sharded=is_sharded(accelerator)
        )
        if why:
            accelerator.print(why)
        if cfg.precompute_ref_log_probs:
            self.precompute_reference_logps()

    def load_reference(self) -> torch.nn.Module:
        """The frozen reference model, with the policy's completion head and attention, sharded like the policy."""
        packed = isinstance(self.collate, SharedPrefixCollator)
        return load_reference_model(self.cfg, self.ref_name, self.accelerator, packed=packed)

    def precompute_reference_logps(self) -> None:
        """Reference log-probs as columns of the pairs, from one cached pass; the reference model then leaves
        memory. Without an explicit reference, LoRA's is the base model before any adapter step."""
        cfg, accelerator = self.cfg, self.accelerator
        ref_model = self.ref_model if self.ref_model is not None else self.policy
        uses_policy = ref_model is self.policy
        if uses_policy:
            self.policy.to(accelerator.device)
        with ref_model.disable_adapter() if uses_policy else contextlib.nullcontext():
            options = dict(ref_name=self.ref_name, precision=accelerator.mixed_precision)
            self.train_pairs = precompute_reference(
                cfg, accelerator, ref_model, self.train_pairs, self.collate, **options
            )
            if self.test_pairs is not None:
                self.test_pairs = precompute_reference(
                    cfg, accelerator, ref_model, self.test_pairs, self.collate, **options
                )
        self.ref_model = None  # training holds only the policy in memory

    # ---- a step

    def concatenated_forward(
        self, model, batch: dict[str, torch.Tensor], *, with_metrics: bool = True
    ) -> PairLogps:
        """Chosen and rejected of the batch's B pairs through one forward of MODEL (2B rows, or one packed row)."""
        inputs, labels = model_inputs(model, batch)
        out = model(**inputs, with_metrics=with_metrics, with_wpo=self.cfg.use_weighting and with_metrics)
        chosen, rejected = out.chunk_pairs()
        chosen_logps, rejected_logps = pair_logps(out, labels, self.cfg.ld_alpha)
        return PairLogps(chosen_logps, rejected_logps, chosen, rejected, labels)

    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) reference log-probs: precomputed columns, the frozen reference model, or for
        LoRA the policy with its adapters disabled."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                with self.accelerator.autocast():
                    ref = self.concatenated_forward(self.ref_model, batch, with_metrics=False)
            else:  # LoRA: the reference is the base model, adapters off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    ref = self.concatenated_forward(model, batch, with_metrics=False)
        return ref.chosen_logps, ref.rejected_logps

    def train_step(self, model, batch: dict[str, torch.Tensor]) -> StepOutput:
        """The loss of `loss_type` on a batch of pairs, and TRL's metrics (`rewards/*`, `logps/*`, `logits/*`)."""
        cfg = self.cfg
        policy = self.concatenated_forward(model, batch)
        chosen, rejected = policy.chosen, policy.rejected
        if cfg.reference_free:
            ref_chosen = ref_rejected = torch.zeros_like(chosen.logps)
        else:
            ref_chosen, ref_rejected = self.reference_logps(model, batch)
        weights = None
        if cfg.use_weighting:  # WPO weights from the un-weighted log-probs, even with LD-DPO (as TRL)
            weights = wpo_weights(
                chosen.logps, chosen.log_sum_sq_probs_sum, chosen.token_counts
            ) * wpo_weights(rejected.logps, rejected.log_sum_sq_probs_sum, rejected.token_counts)
        out = dpo_loss(
            policy.chosen_logps,
            policy.rejected_logps,
            ref_chosen.to(chosen.logps.dtype),
            ref_rejected.to(chosen.logps.dtype),
            loss_type=self.loss_types,
            loss_weights=self.loss_weights,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            chosen_token_counts=chosen.token_counts,
            rejected_token_counts=rejected.token_counts,
            chosen_sft_logps=chosen.logps,
            f_divergence_type=cfg.f_divergence_type,
            f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
            discopop_tau=cfg.discopop_tau,
            rpo_alpha=cfg.rpo_alpha,
            weights=weights,
        )
        metrics = preference_metrics(
            out, policy.chosen_logps, policy.rejected_logps, chosen, rejected, gather=self.accelerator.gather
        )
        return StepOutput(
            loss=out.losses.mean(),
            metrics={k: float(v) for k, v in metrics.items()},
            num_rows=len(chosen.logps),
            num_tokens=count_tokens(batch),
        )

    def evaluate(self, model, loader: DataLoader) -> dict[str, float]:
        """`eval_*` metrics of MODEL on LOADER's pairs, as the loop logs them."""
        return evaluate(self.accelerator, model, self.train_step, loader)

    # ---- save

    def save(self, result: TrainResult) -> TrainResult:
        extra = {"reference_model": self.ref_name}
        return finish(self.accelerator, result, self.tokenizer, self.cfg, extra=extra, on_saved=self.on_saved)


def load_reference_model(cfg, ref_name: str, accelerator, *, packed: bool = False) -> torch.nn.Module:
    """REF_NAME frozen, with the completion head (and with PACKED the pair attention) the policy has, sharded like
    the policy (`zephyr dpo`, `zephyr kto`)."""
    with whole_weights_on_every_process():
        ref_model = load_model(
            ref_name,
            dtype=cfg.dtype,
            revision=cfg.model_revision,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
    ref_model.eval().requires_grad_(False)
    attach_completion_head(ref_model)
    if packed:
        pair_attention.enable(ref_model)
    return shard_reference(ref_model, accelerator)


# ---------------------------------------------------------------------------------------------- batch layout


def model_inputs(model, batch) -> tuple[dict, torch.Tensor]:
    """The completion-head forward's inputs for BATCH and its labels [2B, T]: TRL's two padded rows per pair
    (`PreferenceCollator`), or one packed row with a shared prompt (`SharedPrefixCollator`)."""
    if "completion_gather" in batch:
        unwrapped = getattr(model, "module", model)
        labels = batch["completion_labels"]
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": model_attention_mask(unwrapped, batch["attention_mask"], unwrapped.dtype),
            "completion_gather": batch["completion_gather"],
            "completion_labels": labels,
        }
        if attention_implementation(unwrapped) == pair_attention.NAME:
            inputs["pair_segments"] = pair_attention.segments_argument(batch["pair_segments"])
        return inputs, labels
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_labels": labels,
    }, labels


def pair_logps(out, labels: torch.Tensor, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) sequence log-probs of a [chosen; rejected] forward OUT (`SequenceLogps` of 2B
    rows): plain sums, or with `ld_alpha` LD-DPO's, whose tokens past the shorter completion count ld_alpha times."""
    if ld_alpha is None:
        return out.logps.chunk(2)
    chosen_tokens, rejected_tokens = out.token_logps.chunk(2)
    chosen_mask, rejected_mask = (labels[:, 1:] != IGNORE_INDEX).chunk(2)
    return length_desensitised_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, ld_alpha)


def preference_collator(cfg, tokenizer, model, accelerator):
    """TRL's layout (two padded rows per pair), or with `prefix_sharing` / `padding_free` one packed row per
    micro-batch with each prompt once, when the model's attention takes the block mask that needs. An sdpa MODEL
    is then switched to `pair_attention`, which computes only the blocks that mask lets through."""
    pad = cfg.padding_value if cfg.padding_value is not None else tokenizer.pad_token_id
    asked = cfg.prefix_sharing is True or cfg.padding_free
    window = _sliding_window(model)
    if window is not None and (cfg.max_length is None or cfg.max_length > window):
        # The packed layouts compute full causal attention within a pair; beyond the window that is not the model.
        if asked:
            accelerator.print(
                f"note: prefix sharing does not apply this model's sliding window of {window} tokens, which "
                f"max_length {cfg.max_length} exceeds; pairs go in TRL's two padded rows"
            )
    elif asked or cfg.prefix_sharing is None:  # unset: the fast layout wherever it runs
        implementation = attention_implementation(model)
        if implementation in SUPPORTED_ATTENTION:
            pair_attention.enable(model)
            return SharedPrefixCollator(
                pad_token_id=pad, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode
            )
        if asked:
            accelerator.print(
                f"note: prefix sharing needs an attention that takes a block mask "
                f"({', '.join(SUPPORTED_ATTENTION)}); this model uses {implementation}, so pairs go in TRL's two "
                "padded rows"
            )
    return PreferenceCollator(
        pad_token_id=pad, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode
    )


def _sliding_window(model) -> int | None:
    """The attention window of MODEL (Mistral, Qwen2 with use_sliding_window), or None for full attention."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) else None


# ---------------------------------------------------------------------------------------------- reference cache


def reference_cache_path(cfg, ref_name: str, dataset, precision: str) -> Path:
    key = json.dumps(
        {
            "format": REF_CACHE_FORMAT,
            "model": model_identity(ref_name, cfg.model_revision),
            "data": dataset._fingerprint,
            "max_length": cfg.max_length,
            "truncation_mode": cfg.truncation_mode,
            "ld_alpha": cfg.ld_alpha,
            "precision": precision,
            "dtype": cfg.dtype,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return zephyr_cache_dir() / "ref_logps" / f"{digest}.pt"


def precompute_reference(cfg, accelerator, ref_model, dataset, collate, *, ref_name: str, precision: str):
    """Add `ref_chosen_logps` / `ref_rejected_logps` columns from one pass of the reference model, cached on disk
    keyed by reference model, tokenized data and truncation, so a second run (or a resumed one) reuses them. A cache
    file that cannot be read, or holds another number of rows, is computed again."""
    path = reference_cache_path(cfg, ref_name, dataset, precision)
    cached = None
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            rows = {side: tuple(cached[side].shape) for side in ("chosen", "rejected")}
            if set(rows.values()) != {(len(dataset),)}:
                raise ValueError(f"it holds {rows}, the data {len(dataset)} rows")
        except Exception as err:  # noqa: BLE001 - truncated, corrupt or foreign: any of these means recompute
            accelerator.print(
                f"reference log-probs: {path} is unreadable ({type(err).__name__}: {err}); computing them again"
            )
            cached = None
        else:
            accelerator.print(f"reference log-probs: reusing {path}")
    if cached is None:
        batch_size = cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size
        rank, world = accelerator.process_index, accelerator.num_processes
        indices = list(range(rank, len(dataset), world))
        # A sharded model's forward is collective: every process runs as many rows (the extra are dropped below).
        padded = indices + [indices[0] if indices else 0] * (math.ceil(len(dataset) / world) - len(indices))
        loader = DataLoader(
            torch.utils.data.Subset(dataset, padded), batch_size=batch_size, collate_fn=collate
        )
        chosen, rejected = [], []
        for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            inputs, labels = model_inputs(ref_model, batch)
            with torch.no_grad(), accelerator.autocast():
                out = ref_model(**inputs, with_metrics=False)
            fault_point("precompute")
            c, r = (side.float() for side in pair_logps(out, labels, cfg.ld_alpha))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        local = {
            "index": torch.tensor(indices, dtype=torch.long),
            "chosen": torch.cat(chosen)[: len(indices)] if chosen else torch.zeros(0),
            "rejected": torch.cat(rejected)[: len(indices)] if rejected else torch.zeros(0),
        }
        parts = gather_object([local]) if world > 1 else [local]
        order = torch.cat([p["index"] for p in parts]).argsort()
        cached = {side: torch.cat([p[side] for p in parts])[order] for side in ("chosen", "rejected")}
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(cached, tmp)
            fault_point("reference-cache")
            os.replace(tmp, path)  # never a half-written cache under the real name
        accelerator.wait_for_everyone()
    dataset = dataset.add_column("ref_chosen_logps", cached["chosen"].tolist())
    return dataset.add_column("ref_rejected_logps", cached["rejected"].tolist())


def precompute_choice(
    cfg, num_pairs: int, num_processes: int, *, sharded: bool = False
) -> tuple[bool, str | None]:
    """(precompute the reference log-probs?, what to tell the user when Zephyr chose).

    A LoRA run's reference is its own base model, which under FSDP / ZeRO-3 is sharded only once the loop prepares
    it: its reference log-probs are computed in the step, where the sharded model's forward gathers its weights.

    Set, `precompute_ref_log_probs` is obeyed. Unset, they are precomputed whenever the run trains on every pair at
    least once: one no-grad pass (cached on disk, so later runs on the same data and reference skip it) replaces a
    reference forward in every step, and for full fine-tuning the reference model leaves memory. A run of
    `max_steps` that sees only part of the data would pay for rows it never trains on, so its reference runs
    alongside the policy instead."""
    if sharded and cfg.use_peft and not cfg.reference_free and not cfg.ref_model_name_or_path:
        if cfg.precompute_ref_log_probs:
            raise ConfigError(
                "precompute_ref_log_probs: true with LoRA under FSDP or ZeRO-3 is not supported (the base model is "
                "not sharded before training starts); leave it unset to compute the reference in each step"
            )
        return False, "reference log-probs: computed in each step (LoRA on sharded weights)"
    if cfg.precompute_ref_log_probs is not None:
        return bool(cfg.precompute_ref_log_probs) and not cfg.reference_free, None
    if cfg.reference_free or cfg.sync_ref_model:
        return False, None
    if cfg.max_steps > 0:
        seen = cfg.max_steps * cfg.global_batch_size(num_processes)
        if seen < num_pairs:
            return False, (
                f"reference log-probs: computed in each step, as this run trains on {seen} of {num_pairs} pairs "
                "(precompute_ref_log_probs: true computes them for all pairs first)"
            )
    return True, (
        "reference log-probs: precomputed before training, as the run trains on every pair "
        "(precompute_ref_log_probs: false keeps the reference model in each step)"
    )
