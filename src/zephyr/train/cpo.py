"""`zephyr cpo` and `zephyr simpo`: reference-free preference optimisation, as TRL 1.16's CPOTrainer.

    zephyr cpo --config recipes/R/cpo.yaml          # CPO: sigmoid preference loss + cpo_alpha x NLL of the chosen
    zephyr simpo --config recipes/R/simpo.yaml      # SimPO: loss_type simpo, length-normalised, cpo_alpha 0
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m zephyr simpo --config recipes/R/simpo.yaml

`CPORecipe` has DPO's shape and reuses its pieces: the same tokenized pairs (`zephyr.data.tokenize`), batch layout
(`dpo.preference_collator`: TRL's two padded rows per pair, or one packed row with each prompt once), inputs
(`dpo.model_inputs`), fused completion head and loop. There is no reference model and no reference pass.
- `setup`: the accelerator, the tokenized pairs, the policy and the batch layout;
- `concatenated_forward`: chosen and rejected through one forward, completion log-probs (sums and token counts);
- `train_step`: `objectives.cpo_loss` of `loss_type` plus `cpo_alpha` x `objectives.chosen_nll`, with TRL's metrics;
- `evaluate`: `train_step` on the held-out pairs; `save`: the model folder.

Tokens: Zephyr's preference tokenization (the chat template's tokens, as `zephyr dpo` and TRL's DPOTrainer), not
TRL's CPO `tokenize_row`, which also puts a BOS before every prompt that does not start with one and an EOS after
every completion that does not end with one. With a template that writes both, the two give the same ids.

`logits/chosen` and `logits/rejected` are TRL's: the mean of the full logits of the chosen (rejected) rows over every
position of the padded batch, prompt and padding included, and the whole vocabulary. The packed layout has no
padding positions to average over, so with prefix sharing those two metrics are not logged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from zephyr.errors import ConfigError
from zephyr.train.collate import count_tokens
from zephyr.train.dpo import PairLogps, model_inputs, preference_collator
from zephyr.train.fused_head import attach_completion_head
from zephyr.train.loop import StepOutput, TrainResult, evaluate, train
from zephyr.train.objectives import CPO_LOSSES, CPOLossOutput, chosen_nll, cpo_loss
from zephyr.train.save import finish
from zephyr.train.setup import load_policy, start_stage, wrap_lora
from zephyr.train.shared_prefix import SharedPrefixCollator


def run_cpo(cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None) -> TrainResult:
    """Train CFG's CPO or SimPO stage; ON_SAVED gets the saved folder on the main process (the card is written there)."""
    return CPORecipe(cfg, progress=progress, on_saved=on_saved).run()


class CPORecipe:
    """setup -> (train: concatenated_forward -> train_step, evaluate) -> save. See the module docstring."""

    def __init__(self, cfg, *, progress: bool = True, on_saved: Callable[[Path], None] | None = None):
        self.cfg, self.progress, self.on_saved = cfg, progress, on_saved
        if (
            cfg.loss_type not in CPO_LOSSES
        ):  # the recipe loader refuses it first; this guards configs built in code
            raise ConfigError(
                f"Unknown CPO loss_type '{cfg.loss_type}'; choose from {', '.join(CPO_LOSSES)}."
            )
        self.logits_probe: MeanLogitProbe | None = None

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
        # The preference pipeline is DPO's ("dpo" names it there); the rows and their cache are the same.
        self.accelerator, self.tokenizer, self.data = start_stage(cfg, data_stage="dpo")
        accelerator = self.accelerator
        self.train_pairs, self.test_pairs = self.data.train, self.data.test

        self.policy = load_policy(cfg, self.tokenizer)
        attach_completion_head(self.policy)
        self.collate = preference_collator(cfg, self.tokenizer, self.policy, accelerator)
        cfg.prefix_sharing = packed = isinstance(self.collate, SharedPrefixCollator)  # for the run record
        if packed:
            accelerator.print(
                "note: pairs are packed with shared prompts, which leaves no padding positions for TRL's "
                "logits/chosen and logits/rejected; they are not logged (prefix_sharing: false logs them)"
            )
        if cfg.use_peft:
            self.policy = wrap_lora(cfg, self.policy)
            if accelerator.is_main_process:
                self.policy.print_trainable_parameters()

    # ---- a step

    def concatenated_forward(self, model, batch: dict[str, Tensor]) -> PairLogps:
        """Chosen and rejected of the batch's B pairs through one forward of MODEL (2B rows, or one packed row)."""
        if self.logits_probe is None and not self.cfg.prefix_sharing:
            # Hooked at the first step, after accelerate has prepared the model, so that a sharding engine's own
            # pre-forward hook (which gathers the head's weight) runs before this one.
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            self.logits_probe = MeanLogitProbe(head)
        inputs, labels = model_inputs(model, batch)
        out = model(**inputs, with_metrics=False)
        chosen, rejected = out.chunk_pairs()
        return PairLogps(chosen.logps, rejected.logps, chosen, rejected, labels)

    def train_step(self, model, batch: dict[str, Tensor]) -> StepOutput:
        """`loss_type`'s loss plus `cpo_alpha` x the chosen NLL on a batch of pairs, and TRL's CPO metrics."""
        cfg = self.cfg
        policy = self.concatenated_forward(model, batch)
        chosen, rejected = policy.chosen, policy.rejected
        out = cpo_loss(
            chosen.logps,
            rejected.logps,
            chosen.token_counts,
            rejected.token_counts,
            loss_type=cfg.loss_type,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
        )
        loss = out.losses.mean()
        if cfg.cpo_alpha != 0:
            nll = chosen_nll(chosen.logps, chosen.token_counts)
            loss = loss + cfg.cpo_alpha * nll
        else:  # TRL skips the term and logs nll_loss 0
            nll = torch.zeros((), device=chosen.logps.device)
        logits = self.logits_probe.pop() if self.logits_probe is not None else None
        metrics = cpo_metrics(out, nll, logits, gather=self.accelerator.gather)
        return StepOutput(
            loss=loss,
            metrics={k: float(v) for k, v in metrics.items()},
            num_rows=len(chosen.logps),
            num_tokens=count_tokens(batch),
        )

    def evaluate(self, model, loader: DataLoader) -> dict[str, float]:
        """`eval_*` metrics of MODEL on LOADER's pairs, as the loop logs them."""
        return evaluate(self.accelerator, model, self.train_step, loader)

    # ---- save

    def save(self, result: TrainResult) -> TrainResult:
        return finish(self.accelerator, result, self.tokenizer, self.cfg, on_saved=self.on_saved)


# ---------------------------------------------------------------------------------------------- metrics


class MeanLogitProbe:
    """TRL's `logits/chosen` / `logits/rejected` without the [2B, T, V] logits.

    A forward pre-hook on the LM head reduces the hidden states it receives, [2B, T, d] with the chosen rows first
    (TRL's padded layout): the mean over the vocabulary of h·W_v + b_v is h·mean_v(W_v) + mean(b), so the mean over
    B rows, T positions and V logits is mean_{b,t}(h)·mean_v(W_v) + mean(b). That is two [d] vectors per step.
    With drop_last_position, the last of the T positions is left out (TRL's ORPO averages `logits[:, :-1]`)."""

    def __init__(self, head: torch.nn.Module, *, drop_last_position: bool = False):
        self.values: tuple[Tensor, Tensor] | None = None
        self.drop_last_position = drop_last_position
        head.register_forward_pre_hook(self._reduce)

    def _reduce(self, head: torch.nn.Module, args: tuple) -> None:
        hidden = args[0].detach().float()
        if hidden.dim() != 3:  # not a [rows, T, d] batch (a generation call, say): nothing to record
            return
        weight_mean = head.weight.detach().float().mean(dim=0)
        bias = getattr(head, "bias", None)
        bias_mean = bias.detach().float().mean() if bias is not None else 0.0
        if self.drop_last_position:
            hidden = hidden[:, :-1]
        chosen, rejected = hidden.chunk(2)
        self.values = tuple(side.mean(dim=(0, 1)) @ weight_mean + bias_mean for side in (chosen, rejected))

    def pop(self) -> tuple[Tensor, Tensor] | None:
        """(chosen [], rejected []) mean logits of the last forward, which they are then cleared of."""
        values, self.values = self.values, None
        return values


def cpo_metrics(
    out: CPOLossOutput,
    nll: Tensor,
    logits: tuple[Tensor, Tensor] | None,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """TRL 1.16 CPOTrainer's metrics of one micro-batch, as 0-dim float tensors under its names.

    out: the loss's output (rewards and the log-probs it compared, [batch] each); nll: [] this process's chosen NLL
    (0 with cpo_alpha 0, as TRL); logits: (chosen [], rejected []) mean logits (`MeanLogitProbe`), or None to leave
    them out. gather concatenates a 1-D tensor across processes (`accelerator.gather`); None for one process.
    As TRL: per-pair values are averaged over all pairs of all processes; logits/* and nll_loss are per-process means,
    averaged over processes. The loop then averages each over the micro-batches of a logging window.
    """
    gather = gather or (lambda t: t)

    def mean(values: Tensor) -> Tensor:
        return gather(values.detach().float().reshape(-1)).mean()

    metrics = {
        "rewards/chosen": mean(out.chosen_rewards),
        "rewards/rejected": mean(out.rejected_rewards),
        "rewards/accuracies": mean((out.chosen_rewards > out.rejected_rewards).float()),
        "rewards/margins": mean(out.chosen_rewards - out.rejected_rewards),
        "logps/chosen": mean(out.chosen_logps),
        "logps/rejected": mean(out.rejected_logps),
        "nll_loss": mean(nll),
    }
    if logits is not None:
        metrics["logits/chosen"], metrics["logits/rejected"] = (mean(side) for side in logits)
    return metrics
