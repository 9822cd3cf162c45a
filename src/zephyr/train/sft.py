"""`zephyr sft`: supervised fine-tuning, the first stage of the Zephyr recipe.

    zephyr sft --config recipes/zephyr-7b-beta/sft.yaml                    # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr sft --config recipes/zephyr-7b-beta/sft.yaml

Sections: setup -> data (optionally packed) -> model -> loop -> save. The loss is the cross-entropy of the labelled
tokens (assistant tokens by default, every token with `assistant_only_loss: false`), computed through the chunked LM
head and averaged over the labelled tokens of the whole accumulation window on all processes, as transformers'
Trainer does with `num_items_in_batch`.
"""

from __future__ import annotations

from zephyr.train.collate import PackedSFTCollator, SFTCollator, pack_examples
from zephyr.train.fused_head import attach_completion_head


class SFTObjective:
    """`(model, batch) -> (loss, metrics)`; metrics as TRL's SFTTrainer logs them (token-weighted)."""

    # The loop divides the token-sum gradient by the labelled tokens of the whole accumulation window (see loop.py).
    normalize_over_window = True

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        out = model(**inputs, completion_labels=batch["labels"], with_metrics=True)
        tokens = out.token_counts.sum()
        loss = -out.logps.sum() / tokens.clamp(min=1)
        gather = self.accelerator.gather
        total = gather(tokens.float().reshape(1)).sum().clamp(min=1)
        metrics = {
            "mean_token_accuracy": gather(out.top1_counts.float().sum().reshape(1)).sum() / total,
            "entropy": gather(out.entropy_sum.float().sum().reshape(1)).sum() / total,
        }
        return loss, {**{k: float(v) for k, v in metrics.items()}, "_items": float(tokens)}


def run_sft(cfg, *, progress: bool = True):
    from datasets import Dataset

    from zephyr.data.prepare import load_recipe_tokenizer, prepare
    from zephyr.train.loop import train
    from zephyr.train.runtime import claim_output_dir, finish, load_policy, make_accelerator, wrap_lora

    # ---- setup and data
    accelerator = make_accelerator(cfg)
    tokenizer = load_recipe_tokenizer(cfg)
    claim_output_dir(accelerator, cfg)
    with accelerator.main_process_first():
        data = prepare(cfg, stage="sft", tokenizer=tokenizer)
    if accelerator.is_main_process:
        print(data.summary())
    train_ds, test_ds = data.train, data.test
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    if cfg.packing:
        if not cfg.max_length:
            from zephyr.errors import ConfigError

            raise ConfigError("packing: true needs max_length (the length of a packed sequence)")
        # Shuffle before packing so that packs mix examples; the loop then shuffles the packs every epoch.
        rows = train_ds.shuffle(seed=cfg.seed).select_columns(["input_ids", "labels"]).to_list()
        packs = pack_examples(rows, cfg.max_length)
        if accelerator.is_main_process:
            print(
                f"packing: {len(rows)} examples into {len(packs)} sequences of at most {cfg.max_length} tokens"
            )
        train_ds = Dataset.from_list(packs)
        collate = PackedSFTCollator(pad_token_id=tokenizer.pad_token_id)

    # ---- model
    model = load_policy(cfg, tokenizer)
    attach_completion_head(model)
    if cfg.use_peft:
        model = wrap_lora(cfg, model)

    # ---- loop and save
    result = train(
        cfg,
        accelerator=accelerator,
        model=model,
        objective=SFTObjective(accelerator),
        train_dataset=train_ds,
        collate=collate,
        eval_dataset=test_ds,
        eval_collate=SFTCollator(pad_token_id=tokenizer.pad_token_id),
        progress=progress,
        data_identity=data.train._fingerprint,
    )
    return finish(accelerator, result, tokenizer, cfg)
