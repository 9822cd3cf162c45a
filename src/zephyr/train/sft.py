"""`zephyr sft`: supervised fine-tuning, the first stage of the Zephyr recipe.

    zephyr sft --config recipes/zephyr-7b-beta/sft.yaml                    # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr sft --config recipes/zephyr-7b-beta/sft.yaml

`SFTRecipe` has the shape of `DPORecipe`: `setup` (the accelerator, the tokenized dialogues, optionally packed, the
model) -> `forward` -> `train_step` -> `evaluate` -> `save`. The loss is the cross-entropy of the labelled tokens
(assistant tokens by default, every token with `assistant_only_loss: false`), computed through the chunked LM head
and averaged over the labelled tokens of the whole accumulation window on all processes, as transformers' Trainer
does with `num_items_in_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from zephyr.errors import ConfigError
from zephyr.train.collate import PackedSFTCollator, SFTCollator, count_tokens, pack_examples
from zephyr.train.fused_head import SequenceLogps, attach_completion_head
from zephyr.train.loop import StepOutput, TrainResult, evaluate, train
from zephyr.train.save import finish
from zephyr.train.setup import load_policy, start_stage, wrap_lora


def run_sft(cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> TrainResult:
    """Train CFG's SFT stage; ON_SAVED gets the saved folder on the main process (`zephyr.stages` writes the card)."""
    return SFTRecipe(cfg, progress=progress, on_saved=on_saved).run()


class SFTRecipe:
    """setup -> (train: forward -> train_step, evaluate) -> save. See the module docstring."""

    def __init__(self, cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None):
        self.cfg, self.progress, self.on_saved = cfg, progress, on_saved
        if cfg.packing and not cfg.max_length:
            raise ConfigError("packing: true needs max_length (the length of a packed sequence)")

    def run(self) -> TrainResult:
        self.setup()
        result = train(
            self.cfg,
            accelerator=self.accelerator,
            model=self.model,
            objective=self.train_step,
            train_dataset=self.train_rows,
            collate=self.collate,
            eval_dataset=self.data.test,
            eval_collate=SFTCollator(pad_token_id=self.tokenizer.pad_token_id),
            progress=self.progress,
            data_identity=self.data.train._fingerprint,
            normalize_over_window=True,
        )
        return self.save(result)

    # ---- setup

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator, self.tokenizer, self.data = start_stage(cfg, data_stage="sft")
        self.train_rows, self.collate = self.data.train, SFTCollator(pad_token_id=self.tokenizer.pad_token_id)
        if cfg.packing:
            self.pack()
        self.model = load_policy(cfg, self.tokenizer)
        attach_completion_head(self.model)
        if cfg.use_peft:
            self.model = wrap_lora(cfg, self.model)

    def pack(self) -> None:
        """Several examples per sequence of `max_length` tokens, each attending only to itself."""
        cfg = self.cfg
        # Shuffle before packing so that packs mix examples; the loop then shuffles the packs every epoch.
        rows = self.train_rows.shuffle(seed=cfg.seed).select_columns(["input_ids", "labels"]).to_list()
        packs = pack_examples(rows, cfg.max_length)
        if self.accelerator.is_main_process:
            print(
                f"packing: {len(rows)} examples into {len(packs)} sequences of at most {cfg.max_length} tokens"
            )
        self.train_rows = Dataset.from_list(packs)
        self.collate = PackedSFTCollator(pad_token_id=self.tokenizer.pad_token_id)

    # ---- a step

    def forward(self, model, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Log-probs of the labelled tokens of the batch's rows [batch, seq], and TRL's metric sums."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        return model(**inputs, completion_labels=batch["labels"], with_metrics=True)

    def train_step(self, model, batch: dict[str, torch.Tensor]) -> StepOutput:
        """The mean cross-entropy of the batch's labelled tokens; metrics as TRL's SFTTrainer logs them (weighted by
        tokens over all processes). The loop turns the mean into one over the whole accumulation window."""
        out = self.forward(model, batch)
        tokens = out.token_counts.sum()
        loss = -out.logps.sum() / tokens.clamp(min=1)
        gather = self.accelerator.gather
        total = gather(tokens.float().reshape(1)).sum().clamp(min=1)
        metrics = {
            "mean_token_accuracy": gather(out.top1_counts.float().sum().reshape(1)).sum() / total,
            "entropy": gather(out.entropy_sum.float().sum().reshape(1)).sum() / total,
        }
        return StepOutput(
            loss=loss,
            metrics={k: float(v) for k, v in metrics.items()},
            num_rows=batch["input_ids"].shape[0],
            num_tokens=count_tokens(batch),
            loss_tokens=float(tokens),
        )

    def evaluate(self, model, loader: DataLoader) -> dict[str, float]:
        return evaluate(self.accelerator, model, self.train_step, loader)

    # ---- save

    def save(self, result: TrainResult) -> TrainResult:
        return finish(self.accelerator, result, self.tokenizer, self.cfg, on_saved=self.on_saved)
