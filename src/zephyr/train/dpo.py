"""`zephyr dpo`: Direct Preference Optimization, the second stage of the Zephyr recipe.

    zephyr dpo --config recipes/zephyr-7b-beta/dpo.yaml                    # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr dpo --config recipes/zephyr-7b-beta/dpo.yaml

Sections: setup -> data -> policy and reference -> (reference log-probs, precomputed and cached) -> loop -> save.
A step puts chosen and rejected through one forward pass ([chosen; rejected] rows, TRL's layout), computes
completion log-probs with the chunked LM head (never the full [tokens, vocab] logits), gets the reference log-probs
(a frozen copy, the base model with LoRA adapters disabled, or the precomputed cache), and applies the objective
named by `loss_type`. Metrics carry TRL's names and reductions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from zephyr.errors import ConfigError
from zephyr.models import model_identity
from zephyr.train.checkpoint import fault_point
from zephyr.train.collate import PreferenceCollator
from zephyr.train.distributed import is_sharded, shard_reference, whole_weights_on_every_process
from zephyr.train.fused_head import attach_completion_head
from zephyr.train.objectives import (
    check_loss_config,
    dpo_loss,
    length_desensitised_logps,
    preference_metrics,
    wpo_weights,
)

REF_CACHE_FORMAT = 1


class DPOObjective:
    """`(model, batch) -> (loss, metrics)` for the loop; batch from `PreferenceCollator`."""

    def __init__(self, cfg, accelerator, ref_model=None):
        self.cfg = cfg
        self.accelerator = accelerator
        self.ref_model = ref_model
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

    def reference_logps(self, model, batch, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        inputs, labels = model_inputs(model, batch)
        inputs["with_metrics"] = False
        with torch.no_grad():
            if self.ref_model is not None:
                with self.accelerator.autocast():
                    ref = self.ref_model(**inputs)
            else:  # LoRA: the reference is the base model, adapters off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    ref = model(**inputs)
        return pair_logps(ref, labels, self.cfg.ld_alpha)

    def __call__(self, model, batch):
        cfg = self.cfg
        inputs, labels = model_inputs(model, batch)
        policy = model(**inputs, with_metrics=True, with_wpo=cfg.use_weighting)
        chosen, rejected = policy.chunk_pairs()
        chosen_logps, rejected_logps = pair_logps(policy, labels, cfg.ld_alpha)
        if cfg.reference_free:
            ref_chosen = ref_rejected = torch.zeros_like(chosen.logps)
        else:
            ref_chosen, ref_rejected = self.reference_logps(model, batch, labels)
        weights = None
        if cfg.use_weighting:  # WPO weights from the un-weighted log-probs, even with LD-DPO (as TRL)
            weights = wpo_weights(
                chosen.logps, chosen.log_sum_sq_probs_sum, chosen.token_counts
            ) * wpo_weights(rejected.logps, rejected.log_sum_sq_probs_sum, rejected.token_counts)
        out = dpo_loss(
            chosen_logps,
            rejected_logps,
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
            out, chosen_logps, rejected_logps, chosen, rejected, gather=self.accelerator.gather
        )
        return out.losses.mean(), {k: float(v) for k, v in metrics.items()}


def model_inputs(model, batch) -> tuple[dict, torch.Tensor]:
    """The completion-head forward's inputs for BATCH and its labels [2B, T]: TRL's two padded rows per pair
    (`PreferenceCollator`), or one packed row with a shared prompt (`SharedPrefixCollator`)."""
    if "completion_gather" in batch:
        from zephyr.train import pair_attention
        from zephyr.train.shared_prefix import attention_implementation, model_attention_mask

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
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
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
    chosen_mask, rejected_mask = (labels[:, 1:] != -100).chunk(2)
    return length_desensitised_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, ld_alpha)


# ---------------------------------------------------------------------------------------------- reference cache


def reference_cache_path(cfg, ref_name: str, dataset, precision: str) -> Path:
    from zephyr.models import zephyr_cache_dir

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
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

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
        from accelerate.utils import gather_object

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


# ---------------------------------------------------------------------------------------------- the stage


def preference_collator(cfg, tokenizer, model, accelerator):
    """TRL's layout (two padded rows per pair), or with `prefix_sharing` / `padding_free` one packed row per
    micro-batch with each prompt once, when the model's attention takes the block mask that needs. An sdpa MODEL
    is then switched to `pair_attention`, which computes only the blocks that mask lets through."""
    from zephyr.train import pair_attention
    from zephyr.train.shared_prefix import SUPPORTED_ATTENTION, SharedPrefixCollator, attention_implementation

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


def run_dpo(cfg, *, progress: bool = True):
    from zephyr.data.prepare import load_recipe_tokenizer, prepare
    from zephyr.models import load_model
    from zephyr.train import pair_attention
    from zephyr.train.loop import train
    from zephyr.train.runtime import claim_output_dir, finish, load_policy, make_accelerator, wrap_lora
    from zephyr.train.shared_prefix import SharedPrefixCollator

    # ---- setup
    accelerator = make_accelerator(cfg)
    DPOObjective(cfg, accelerator)  # refuse a bad loss configuration before any model loads
    tokenizer = load_recipe_tokenizer(cfg)
    claim_output_dir(accelerator, cfg)
    with accelerator.main_process_first():  # rank 0 tokenizes, the others read its cache
        data = prepare(cfg, stage="dpo", tokenizer=tokenizer)
    if accelerator.is_main_process:
        print(data.summary())

    # ---- policy and reference
    policy = load_policy(cfg, tokenizer)
    attach_completion_head(policy)
    collate = preference_collator(cfg, tokenizer, policy, accelerator)
    ref_name = cfg.ref_model_name_or_path or cfg.model_name_or_path
    ref_model = None
    needs_ref_model = not cfg.reference_free and (not cfg.use_peft or cfg.ref_model_name_or_path)
    if needs_ref_model:
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
        if isinstance(collate, SharedPrefixCollator):
            pair_attention.enable(ref_model)
        ref_model = shard_reference(ref_model, accelerator)
    if cfg.use_peft:
        policy = wrap_lora(cfg, policy)
        if accelerator.is_main_process:
            policy.print_trainable_parameters()

    train_ds, test_ds = data.train, data.test
    cfg.prefix_sharing = isinstance(collate, SharedPrefixCollator)  # what runs, for the run record and card
    cfg.precompute_ref_log_probs, why = precompute_choice(
        cfg, len(train_ds), accelerator.num_processes, sharded=is_sharded(accelerator)
    )
    if why:
        accelerator.print(why)
    if cfg.precompute_ref_log_probs:
        precision = accelerator.mixed_precision
        if ref_model is None:  # LoRA without an explicit reference: the base model before any adapter step
            ref_model = policy
        ctx = ref_model.disable_adapter() if ref_model is policy else contextlib.nullcontext()
        if ref_model is policy:
            policy.to(accelerator.device)
        with ctx:
            train_ds = precompute_reference(
                cfg, accelerator, ref_model, train_ds, collate, ref_name=ref_name, precision=precision
            )
            if test_ds is not None:
                test_ds = precompute_reference(
                    cfg, accelerator, ref_model, test_ds, collate, ref_name=ref_name, precision=precision
                )
        if ref_model is not policy:
            del ref_model  # training holds only the policy in memory
        ref_model = None

    # ---- loop
    objective = DPOObjective(cfg, accelerator, ref_model=ref_model)
    result = train(
        cfg,
        accelerator=accelerator,
        model=policy,
        objective=objective,
        train_dataset=train_ds,
        collate=collate,
        eval_dataset=test_ds,
        progress=progress,
        data_identity=data.train._fingerprint,
    )

    # ---- save
    return finish(accelerator, result, tokenizer, cfg, extra={"reference_model": ref_name})
