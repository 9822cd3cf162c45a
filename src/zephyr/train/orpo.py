"""`zephyr orpo`: Odds Ratio Preference Optimization, as TRL 1.16's ORPOTrainer (`trl.experimental.orpo`).

    zephyr orpo --config recipes/zephyr-7b-beta/orpo.yaml
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr orpo --config recipes/zephyr-7b-beta/orpo.yaml

ORPO (Hong, Lee and Thorne 2024, arXiv:2403.07691) trains a base model on preference pairs in one stage, with no
separate SFT step and no reference model: the loss is the NLL of the chosen sequences plus λ (`beta`) times the
odds-ratio term of `objectives.odds_ratio_loss`, on length-averaged completion log-probs.

`ORPORecipe` is `cpo.CPORecipe` (setup, the loop, evaluate, save: the same tokenized pairs, policy and fused
completion head) with its own step:
- `concatenated_forward`: chosen and rejected through one forward; the chosen rows are scored on every token, the
  rejected on their completions;
- `train_step`: `objectives.orpo_loss` of the chosen NLL and the odds-ratio losses, with TRL's ORPO metrics.

As TRL, the NLL covers the whole chosen sequence, prompt included (TRL's `cross_entropy_loss` over every attended
token), while the odds compare the completions only. Scoring the prompt needs its hidden states, which the packed
layout (`shared_prefix`) does not gather, so ORPO always uses TRL's two padded rows per pair (the recipe loader
refuses `padding_free`); `logits/*` are then TRL's, from `cpo.MeanLogitProbe` over positions `[:-1]` as TRL's ORPO
averages them.

Tokens: Zephyr's preference tokenization, as `zephyr cpo` (see `zephyr.train.cpo`): TRL's ORPO `tokenize_row` adds a
BOS and EOS where the chat template writes none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from zephyr.data.tokenize import IGNORE_INDEX
from zephyr.train.collate import count_tokens
from zephyr.train.cpo import CPORecipe, MeanLogitProbe, cpo_metrics
from zephyr.train.dpo import model_inputs
from zephyr.train.loop import StepOutput, TrainResult
from zephyr.train.objectives import CPOLossOutput, ORPOLossOutput, chosen_nll, odds_ratio_loss, orpo_loss


def run_orpo(cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> TrainResult:
    """Train CFG's ORPO stage; ON_SAVED gets the saved folder on the main process (the card is written there)."""
    return ORPORecipe(cfg, progress=progress, on_saved=on_saved).run()


class ORPOForward(NamedTuple):
    """One [chosen; rejected] forward of B pairs.

    chosen_logps, rejected_logps: [B] completion log-probs averaged over completion tokens (the odds' P = exp of them).
    nll:                          [] the chosen sequences' NLL per token, prompt and completion (TRL's `nll_loss`).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    nll: Tensor


class ORPORecipe(CPORecipe):
    """setup -> (train: concatenated_forward -> train_step, evaluate) -> save. See the module docstring."""

    def __init__(self, cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None):
        self.cfg, self.progress, self.on_saved = cfg, progress, on_saved
        self.logits_probe: MeanLogitProbe | None = None

    # ---- a step

    def concatenated_forward(self, model, batch: dict[str, Tensor]) -> ORPOForward:
        """Chosen and rejected of the batch's B pairs through one forward of MODEL (2B padded rows)."""
        if self.logits_probe is None:
            # Hooked at the first step, after accelerate has prepared the model (see CPORecipe.concatenated_forward).
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            self.logits_probe = MeanLogitProbe(head, drop_last_position=True)
        inputs, labels = model_inputs(model, batch)
        pairs = len(labels) // 2
        # The chosen rows are scored on every attended token (the NLL's), the rejected on their completions.
        every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        inputs["completion_labels"] = torch.cat([every_token[:pairs], labels[pairs:]])
        out = model(**inputs, with_metrics=False)
        chosen, rejected = out.chunk_pairs()
        # The chosen completions' tokens, shifted as the head shifts its labels.
        completion = labels[:pairs, 1:] != IGNORE_INDEX
        chosen_counts = completion.sum(-1).clamp(min=1)
        chosen_logps = (chosen.token_logps * completion).sum(-1) / chosen_counts
        rejected_logps = rejected.logps / rejected.token_counts.clamp(min=1)
        return ORPOForward(chosen_logps, rejected_logps, chosen_nll(chosen.logps, chosen.token_counts))

    def train_step(self, model, batch: dict[str, Tensor]) -> StepOutput:
        """The chosen NLL plus `beta` x the odds-ratio loss on a batch of pairs, and TRL's ORPO metrics."""
        policy = self.concatenated_forward(model, batch)
        out = odds_ratio_loss(policy.chosen_logps, policy.rejected_logps, beta=self.cfg.beta)
        loss = orpo_loss(policy.nll, out.losses, beta=self.cfg.beta)
        metrics = orpo_metrics(out, policy, self.logits_probe.pop(), gather=self.accelerator.gather)
        return StepOutput(
            loss=loss,
            metrics={k: float(v) for k, v in metrics.items()},
            num_rows=len(policy.chosen_logps),
            num_tokens=count_tokens(batch),
        )


def orpo_metrics(
    out: ORPOLossOutput,
    policy: ORPOForward,
    logits: tuple[Tensor, Tensor] | None,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """TRL 1.16 ORPOTrainer's metrics of one micro-batch, as 0-dim float tensors under its names: CPO's
    (`cpo.cpo_metrics`: rewards/*, logps/* of the mean log-probs, logits/*, nll_loss) plus log_odds_ratio and
    log_odds_chosen, which as TRL are per-process means averaged over processes."""
    as_cpo = CPOLossOutput(
        out.losses, out.chosen_rewards, out.rejected_rewards, policy.chosen_logps, policy.rejected_logps
    )
    metrics = cpo_metrics(as_cpo, policy.nll, logits, gather=gather)
    gather = gather or (lambda t: t)
    for name, values in (("log_odds_ratio", out.log_odds_ratio), ("log_odds_chosen", out.log_odds)):
        metrics[name] = gather(values.float().mean().reshape(1)).mean()
    return metrics
