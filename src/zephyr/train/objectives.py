"""DPO-family preference losses, with TRL 1.16's `loss_type` names, formulas and defaults.

Each loss is a small pure function of a `PreferencePair` (sequence log-probs of the policy and the reference for a
batch of chosen/rejected completions) that returns one loss per pair, registered in `LOSSES` under its TRL name.
`dpo_loss` builds the pair, adds up the requested losses with `loss_weights`, and returns the implicit rewards
TRL logs; `preference_metrics` reduces them to TRL's metric names and values.

How a DPO step uses this module with `zephyr.train.logprobs` (batch rows are [chosen; rejected], TRL's layout):

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    policy = completion_logps(final_hidden_states(model, ...), lm_head.weight, labels)
    reference = ...same under torch.no_grad() with the reference model and with_metrics=False...
    chosen, rejected = policy.chunk_pairs()
    ref_chosen, ref_rejected = reference.chunk_pairs()
    out = dpo_loss(chosen.logps, rejected.logps, ref_chosen.logps, ref_rejected.logps, loss_type=..., beta=...,
                   chosen_token_counts=chosen.token_counts, rejected_token_counts=rejected.token_counts)
    loss = out.losses.mean()  # TRL's loss for the micro-batch
    metrics = preference_metrics(out, chosen.logps, rejected.logps, chosen, rejected, gather=accelerator.gather)

Where we differ from TRL 1.16, on purpose:
- `sigmoid` honours `label_smoothing` as conservative DPO (cDPO) did in TRL before 1.0; TRL 1.16's `sigmoid`
  ignores it. Identical at the default `label_smoothing=0`.
- `reference_free` and `rpo_alpha`, keys TRL dropped in 1.x, are still accepted (see `dpo_loss`).
- Settings TRL only warns about (robust with label_smoothing >= 0.5, which divides by zero) are refused.

Each loss is registered with its `LossRules` (the label_smoothing it allows, whether an f-divergence generalises it,
whether it keeps per-pair weights); the recipe loader (`zephyr.recipe`) checks a recipe against `LOSSES`,
`LOSS_RULES` and `F_DIVERGENCES` before any model loads, so a new loss is one `@register` here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from zephyr.errors import ConfigError

if TYPE_CHECKING:
    from zephyr.train.logprobs import SequenceLogps


class DPOLossOutput(NamedTuple):
    """losses: [batch] per-pair loss, summed over loss types with their weights; `losses.mean()` is TRL's loss.
    chosen_rewards: [batch] beta * (chosen_logps - ref_chosen_logps), detached.
    rejected_rewards: [batch] beta * (rejected_logps - ref_rejected_logps), detached.

    `sft` is a batch-level term spread evenly over the pairs, and `aot`/`aot_unpaired` pair sorted values rather than
    examples, so for those only `losses.mean()` (or sum) is meaningful, as in TRL.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class PreferencePair(NamedTuple):
    """What a loss sees; every field is [batch].

    chosen_logps / rejected_logps:         policy Σ completion log-probs (LD-DPO weighted when `ld_alpha` is set).
    ref_chosen_logps / ref_rejected_logps: the same under the reference model.
    chosen_scores / rejected_scores:       log-ratios (policy - reference) after the f-divergence transform; equal to
                                           the log-ratios for the default reverse KL.
    chosen_token_counts / rejected_token_counts: completion tokens per sequence (for length-normalised losses), or None.
    chosen_sft_logps:                      policy Σ chosen log-probs without LD weighting (for `sft`), or None.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_token_counts: Tensor | None
    rejected_token_counts: Tensor | None
    chosen_sft_logps: Tensor | None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta(self) -> Tensor:
        """The reward margin every Bradley-Terry style loss is a function of, before beta."""
        return self.chosen_scores - self.rejected_scores

    def length_normalised_delta(self) -> Tensor:
        """delta with each side divided by its completion length (TRL's `ipo` and `sigmoid_norm`)."""
        if self.chosen_token_counts is None or self.rejected_token_counts is None:
            raise ValueError("this loss type needs chosen_token_counts and rejected_token_counts")
        chosen = self.chosen_scores / self.chosen_token_counts.clamp(min=1)
        rejected = self.rejected_scores / self.rejected_token_counts.clamp(min=1)
        return chosen - rejected


class Interval(NamedTuple):
    """The numbers from LOW to HIGH; an open end excludes that bound."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def words(self) -> str:
        """'>= 0 and below 0.5', for error messages."""
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{low} and {'below' if self.high_open else 'at most'} {self.high:g}"


# label_smoothing ε is the probability that a preference label is flipped (cDPO, robust DPO) or the smoothed label's
# mass on the rejected answer (EXO). At 1/2 the label says nothing and above it the data would prefer the rejected
# answer, so every loss allows [0, 0.5], the losses that ignore ε too (the key means one thing across the family).
# TRL 1.16 checks less: it takes any ε for sigmoid (where it ignores ε) and for aot, only warns outside [0, 0.5)
# for robust, and requires ε > 0 for exo_pair. Narrower where the math needs it: robust divides by 1 - 2ε, so
# [0, 0.5); exo_pair takes log ε, so (0, 0.5] (the EXO paper uses 1e-3).
LABEL_SMOOTHING_RANGE = Interval(0.0, 0.5)


class LossRules(NamedTuple):
    """What a recipe may combine with one loss; the recipe loader and `check_loss_config` both check these.

    label_smoothing: the ε values the loss allows.
    f_divergence: built on the chosen-minus-rejected margin, so another f-divergence than the reverse KL applies
        (TRL's rule: the f-DPO reparameterisation leaves a β log Z(x) term that only cancels in that difference).
    sorts_batch: pairs sorted values rather than examples, so per-pair (WPO) weights would lose their pair.
    """

    label_smoothing: Interval = LABEL_SMOOTHING_RANGE
    f_divergence: bool = False
    sorts_batch: bool = False


Loss = Callable[..., Tensor]
LOSSES: dict[str, Loss] = {}
LOSS_RULES: dict[str, LossRules] = {}


def register(
    name: str,
    *,
    label_smoothing: Interval = LABEL_SMOOTHING_RANGE,
    f_divergence: bool = False,
    sorts_batch: bool = False,
) -> Callable[[Loss], Loss]:
    """Add a loss to `LOSSES` under its `loss_type` name, and its rules to `LOSS_RULES`; the loss is called as
    `fn(pair, beta=, label_smoothing=, ...)`."""

    def add(fn: Loss) -> Loss:
        LOSSES[name] = fn
        LOSS_RULES[name] = LossRules(label_smoothing, f_divergence, sorts_batch)
        return fn

    return add


def _smoothed_logistic(margin: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - ε) log σ(m) - ε log σ(-m): the logistic loss when the label is flipped with probability ε."""
    if label_smoothing == 0.0:
        return -F.logsigmoid(margin)
    return -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing


@register("sigmoid", f_divergence=True)
def sigmoid(p: PreferencePair, *, beta: float, label_smoothing: float = 0.0, **_) -> Tensor:
    """DPO: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7: -log σ(β Δ).

    With label_smoothing ε > 0, conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences").
    """
    return _smoothed_logistic(beta * p.delta, label_smoothing)


@register("hinge", f_divergence=True)
def hinge(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """SLiC: Zhao et al. 2023, arXiv:2305.10425, the calibration hinge on the margin: max(0, 1 - β Δ)."""
    return torch.relu(1 - beta * p.delta)


@register("ipo", f_divergence=True)
def ipo(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """IPO: Azar et al. 2023, arXiv:2310.12036, Eq. 17: (Δ̄ - 1 / 2τ)², with τ = beta.

    As in TRL, each side's log-ratio is divided by its completion length first (Δ̄); TRL reports the IPO authors
    confirmed their results use this length-normalised form.
    """
    return (p.length_normalised_delta() - 1 / (2 * beta)) ** 2


@register("exo_pair", label_smoothing=Interval(0.0, 0.5, low_open=True), f_divergence=True)
def exo_pair(p: PreferencePair, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """EXO-pref: Ji et al. 2024, arXiv:2402.00856, Eq. 16 with K = 2.

    KL(q || p_ε) between the model's preference q = softmax(β Δ) over (chosen, rejected) and the smoothed label
    p_ε = (1 - ε, ε); ε = label_smoothing must be > 0 (the paper uses 1e-3).
    """
    margin = beta * p.delta
    kl_chosen = torch.sigmoid(margin) * (F.logsigmoid(margin) - math.log1p(-label_smoothing))
    kl_rejected = torch.sigmoid(-margin) * (F.logsigmoid(-margin) - math.log(label_smoothing))
    return kl_chosen + kl_rejected


@register("nca_pair")
def nca_pair(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """NCA: Chen et al. 2024, arXiv:2402.05369: -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l), r = β log-ratio."""
    chosen_reward, rejected_reward = beta * p.chosen_logratios, beta * p.rejected_logratios
    return (
        -F.logsigmoid(chosen_reward)
        - 0.5 * F.logsigmoid(-chosen_reward)
        - 0.5 * F.logsigmoid(-rejected_reward)
    )


@register("robust", label_smoothing=Interval(0.0, 0.5, high_open=True), f_divergence=True)
def robust(p: PreferencePair, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """Robust DPO: Chowdhury et al. 2024, arXiv:2403.00409, with flip rate ε = label_smoothing in [0, 0.5).

    ((1 - ε) ℓ(β Δ) - ε ℓ(-β Δ)) / (1 - 2ε) with ℓ = -log σ: an unbiased estimate of the clean-label DPO loss.
    """
    margin = beta * p.delta
    clean = -(1 - label_smoothing) * F.logsigmoid(margin)
    flipped = -label_smoothing * F.logsigmoid(-margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@register("bco_pair")
def bco_pair(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """BCO on pairs: Jung et al. 2024, arXiv:2404.04656: -log σ(r_w) - log σ(-r_l), r = β log-ratio.

    TRL 1.16's pair version has no reward shift (the running mean δ of the unpaired BCO trainer).
    """
    return -F.logsigmoid(beta * p.chosen_logratios) - F.logsigmoid(-beta * p.rejected_logratios)


@register("sppo_hard")
def sppo_hard(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """SPPO with hard labels: Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner, 0 for the loser.

    (log-ratio_w - 1/2β)² + (log-ratio_l + 1/2β)².
    """
    return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


@register("aot", sorts_batch=True)
def aot(p: PreferencePair, *, beta: float, label_smoothing: float = 0.0, **_) -> Tensor:
    """AOT (paired): Melnyk et al. 2024, arXiv:2406.05882: smoothed logistic loss on β (sorted policy margins -
    sorted reference margins), margins = chosen - rejected log-probs, sorted over the batch (1-D optimal transport).
    """
    policy_margins, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    reference_margins, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_logistic(beta * (policy_margins - reference_margins), label_smoothing)


@register("aot_unpaired", sorts_batch=True)
def aot_unpaired(p: PreferencePair, *, beta: float, label_smoothing: float = 0.0, **_) -> Tensor:
    """AOT (unpaired): Melnyk et al. 2024, arXiv:2406.05882: smoothed logistic loss on β (sorted chosen log-ratios -
    sorted rejected log-ratios), each sorted over the batch on its own.
    """
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing)


@register("apo_zero")
def apo_zero(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """APO-zero: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7: 1 - σ(r_w) + σ(r_l), r = β log-ratio.

    For chosen answers better than the model's own: push chosen up and rejected down.
    """
    return (1 - torch.sigmoid(beta * p.chosen_logratios)) + torch.sigmoid(beta * p.rejected_logratios)


@register("apo_down")
def apo_down(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """APO-down: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8: σ(r_w) + 1 - σ(r_w - r_l), r = β log-ratio.

    For chosen answers worse than the model's own: push both down, rejected more.
    """
    chosen = beta * p.chosen_logratios
    return torch.sigmoid(chosen) + (1 - torch.sigmoid(beta * (p.chosen_logratios - p.rejected_logratios)))


@register("discopop", f_divergence=True)
def discopop(p: PreferencePair, *, beta: float, discopop_tau: float = 0.05, **_) -> Tensor:
    """DiscoPOP: Lu et al. 2024, arXiv:2406.08414, Eq. 5: a log-ratio-modulated blend of the logistic and the
    exponential loss, m = σ(β Δ / τ): (1 - m) (-log σ(β Δ)) + m exp(-β Δ).
    """
    margin = p.delta * beta
    modulation = torch.sigmoid(margin / discopop_tau)
    return -F.logsigmoid(margin) * (1 - modulation) + torch.exp(-margin) * modulation


@register("sft", f_divergence=True)
def sft(p: PreferencePair, **_) -> Tensor:
    """The NLL of the chosen completions, per token over the whole batch (RPO: Pang et al. 2024, arXiv:2404.19733,
    as `loss_type=[sigmoid, sft]`); spread evenly over the pairs so that `losses.mean()` is the batch NLL.
    """
    if p.chosen_sft_logps is None or p.chosen_token_counts is None:
        raise ValueError("the sft loss type needs chosen_token_counts (and chosen_sft_logps with ld_alpha)")
    nll = -p.chosen_sft_logps.sum() / p.chosen_token_counts.sum().clamp(min=1)
    return nll.expand(p.chosen_sft_logps.shape[0])


@register("sigmoid_norm", f_divergence=True)
def sigmoid_norm(p: PreferencePair, *, beta: float, **_) -> Tensor:
    """Length-normalised DPO (Tülu 3's `dpo_norm`, Lambert et al. 2024, arXiv:2411.15124): -log σ(β Δ̄), where each
    side's log-ratio is divided by its completion length.
    """
    return -F.logsigmoid(beta * p.length_normalised_delta())


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    if abs(alpha - 1.0) < 1e-6:  # the α → 1 limit is the reverse KL
        return logratios
    # exp((α-1) r) overflows the input dtype for large log-ratios; clamp in float32 where it still fits afterwards.
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0
    exponent = torch.clamp(((alpha - 1.0) * logratios).float(), max=clamp_max)
    return (torch.exp(exponent) - 1.0).to(logratios.dtype) * (1.0 / (alpha - 1.0))


# f-DPO (Wang et al. 2023, arXiv:2309.16240): the log-ratio r = log π/π_ref goes through f'(e^r) of the divergence.
F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda r, _alpha: r,
    "forward_kl": lambda r, _alpha: 1 - torch.exp(-r),
    "js_divergence": lambda r, _alpha: math.log(2) + F.logsigmoid(r),
    "alpha_divergence": _alpha_divergence,
}


def check_loss_config(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    use_weighting: bool = False,
) -> tuple[list[str], list[float]]:
    """(loss types, one weight per type) from a DPO recipe's loss keys: a lone name becomes a list, no weights 1.0 each.

    Checks the rules the recipe loader checks (`LOSSES`, `LOSS_RULES`, `F_DIVERGENCES`), for callers that build an
    objective from values `zephyr.recipe.load_config` has not seen; a loaded recipe passes, and a user of the CLI
    meets the loader's error first, which names where each key was set. Once per run, never per step.
    Raises ConfigError.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not loss_types:
        raise ConfigError("loss_type is empty: name at least one loss, e.g. loss_type: sigmoid.")
    for name in loss_types:
        if name not in LOSSES:
            close = difflib.get_close_matches(name, LOSSES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown loss_type '{name}'; choose from {', '.join(sorted(LOSSES))}.{hint}")
    weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(loss_types):
        raise ConfigError(
            f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types; give one weight per loss_type."
        )
    if beta <= 0:
        raise ConfigError(
            f"beta must be positive, got {beta}; the Zephyr recipe uses 0.01, TRL's default is 0.1."
        )
    for name in loss_types:
        allowed = LOSS_RULES[name].label_smoothing
        if label_smoothing not in allowed:
            raise ConfigError(
                f"The {name} loss needs label_smoothing {allowed.words()}, got {label_smoothing}."
            )
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(
            f"Unknown f_divergence_type '{f_divergence_type}'; choose from {', '.join(F_DIVERGENCES)}."
        )
    unsupported = sorted({t for t in loss_types if not LOSS_RULES[t].f_divergence})
    if f_divergence_type != "reverse_kl" and unsupported:
        supported = sorted(t for t, rules in LOSS_RULES.items() if rules.f_divergence)
        raise ConfigError(
            f"f_divergence_type '{f_divergence_type}' only applies to {', '.join(supported)}; "
            f"not to {', '.join(unsupported)}. Use f_divergence_type: reverse_kl with these losses."
        )
    sorting = sorted({t for t in loss_types if LOSS_RULES[t].sorts_batch})
    if use_weighting and sorting:
        raise ConfigError(
            f"use_weighting (WPO) cannot be combined with {' / '.join(sorting)}, which sort the batch and so lose "
            "the pairing the weights refer to. Turn one of them off."
        )
    return loss_types, weights


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    chosen_token_counts: Tensor | None = None,
    rejected_token_counts: Tensor | None = None,
    chosen_sft_logps: Tensor | None = None,
    weights: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    rpo_alpha: float | None = None,
) -> DPOLossOutput:
    """Per-pair DPO-family loss and implicit rewards; every tensor argument is [batch].

    chosen_logps / rejected_logps: policy Σ completion log-probs (after `length_desensitised_logps` for LD-DPO).
    ref_*: the reference model's, computed the same way.
    chosen_token_counts / rejected_token_counts: completion tokens per sequence; needed by ipo, sigmoid_norm, sft.
        TRL counts `completion_mask.sum(-1)`; `SequenceLogps.token_counts` is the same unless a sequence's very
        first token is a completion token.
    chosen_sft_logps: chosen Σ log-probs without LD weighting, for `sft`; defaults to chosen_logps.
    weights: per-pair weights multiplying every loss type (WPO: `wpo_weights` of chosen x of rejected), or None.
    reference_free: ignore the reference (log-probs taken as 0), as TRL's removed `reference_free=True` did.
    rpo_alpha: TRL's removed RPO key; the same as appending `sft` with weight rpo_alpha to the loss types.

    The loss of a micro-batch is `losses.mean()`, which equals TRL's Σ_k loss_weight_k x mean(loss_k).
    """
    # Unchecked, as this runs every step: the recipe loader (or `check_loss_config`, once per run) checked these keys.
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if rpo_alpha is not None:
        loss_types, loss_weights = loss_types + ["sft"], loss_weights + [rpo_alpha]
    if reference_free:
        ref_chosen_logps, ref_rejected_logps = (
            torch.zeros_like(chosen_logps),
            torch.zeros_like(rejected_logps),
        )
    to_scores = F_DIVERGENCES[f_divergence_type]
    pair = PreferencePair(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_scores=to_scores(chosen_logps - ref_chosen_logps, f_alpha_divergence_coef),
        rejected_scores=to_scores(rejected_logps - ref_rejected_logps, f_alpha_divergence_coef),
        chosen_token_counts=chosen_token_counts,
        rejected_token_counts=rejected_token_counts,
        chosen_sft_logps=chosen_logps if chosen_sft_logps is None else chosen_sft_logps,
    )
    losses = torch.zeros_like(chosen_logps)
    for name, loss_weight in zip(loss_types, loss_weights, strict=True):
        per_pair = LOSSES[name](pair, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        if weights is not None:
            per_pair = per_pair * weights
        losses = losses + per_pair * loss_weight
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * pair.chosen_logratios.detach(),
        rejected_rewards=beta * pair.rejected_logratios.detach(),
    )


def wpo_weights(logps: Tensor, log_sum_sq_probs_sum: Tensor, token_counts: Tensor) -> Tensor:
    """WPO weights (Zhou et al. 2024, arXiv:2406.11827, Eq. 2), as TRL's `use_weighting`; all [batch], no gradient.

    exp(mean over completion tokens of log p(token) - log Σ_v p_v²): the sequence's length-normalised probability,
    aligned by each step's own sharpness. Pass the un-weighted log-probs (TRL does, even with LD-DPO) and the sums
    from `completion_logps(..., with_wpo=True)`; the loss weight of a pair is chosen weight x rejected weight.
    """
    with torch.no_grad():
        return torch.exp((logps - log_sum_sq_probs_sum) / token_counts.clamp(min=1))


def length_desensitised_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411): per-pair sequence log-probs that down-weight the verbose tail.

    token_logps / mask: [batch, seq] per-token log-probs and completion masks (`SequenceLogps.token_logps` and
    `labels[:, 1:] != -100`). The first min(len_chosen, len_rejected) completion tokens of each side count fully,
    the rest by ld_alpha. Returns (chosen [batch], rejected [batch]); apply to policy and reference alike.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must be in [0, 1] (1 is plain DPO, 0 drops the tail), got {ld_alpha}.")
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)).unsqueeze(1)

    def weighted(token_logps: Tensor, mask: Tensor) -> Tensor:
        position = mask.long().cumsum(dim=1)  # 1-based index among completion tokens
        in_shared = mask.bool() & (position <= shared)
        return (token_logps * in_shared).sum(dim=1) + ld_alpha * (token_logps * (position > shared)).sum(
            dim=1
        )

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


def preference_metrics(
    out: DPOLossOutput,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """TRL 1.16's DPO metrics for one micro-batch, as 0-dim float tensors keyed by TRL's names.

    chosen_logps / rejected_logps: [batch] the log-probs the loss used (LD-weighted with ld_alpha, as TRL logs them).
    chosen / rejected: the policy's `SequenceLogps` halves, computed `with_metrics=True`.
    gather: concatenates a 1-D tensor across processes (`accelerator.gather`); None for one process.

    Reductions, exactly as TRL: rewards/*, logps/* are means over all pairs of all processes of per-pair values
    (rewards/accuracies: chosen_reward > rejected_reward, ties count as wrong). logits/chosen is token-weighted:
    Σ over chosen completion tokens of all processes of (mean over the vocabulary of that position's logits), divided
    by the number of those tokens (0 when there are none); likewise logits/rejected. entropy is token-weighted over
    chosen and rejected completion tokens together; mean_token_accuracy over chosen completion tokens. TRL then
    averages each metric's per-micro-batch values (unweighted) over the logging window. TRL's remaining metric,
    num_tokens (running total of attention-mask tokens over all processes), belongs to the loop.
    """
    gather = gather or (lambda t: t)

    def mean(values: Tensor) -> Tensor:
        return gather(values.detach().float().reshape(-1)).mean()

    def token_mean(sums: Tensor, counts: Tensor) -> Tensor:
        total = gather(sums.detach().float().sum().reshape(1)).sum()
        tokens = gather(counts.float().sum().reshape(1)).sum()
        return torch.where(tokens > 0, total / tokens.clamp(min=1), torch.zeros_like(total))

    return {
        "entropy": token_mean(
            torch.cat([chosen.entropy_sum, rejected.entropy_sum]),
            torch.cat([chosen.token_counts, rejected.token_counts]),
        ),
        "logits/chosen": token_mean(chosen.logits_sum, chosen.token_counts),
        "logits/rejected": token_mean(rejected.logits_sum, rejected.token_counts),
        "mean_token_accuracy": token_mean(chosen.top1_counts, chosen.token_counts),
        "rewards/chosen": mean(out.chosen_rewards),
        "rewards/rejected": mean(out.rejected_rewards),
        "rewards/accuracies": mean((out.chosen_rewards > out.rejected_rewards).float()),
        "rewards/margins": mean(out.chosen_rewards - out.rejected_rewards),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


# ---------------------------------------------------------------------------------------------- reference-free (CPO)
# TRL 1.16's CPOTrainer losses (`zephyr cpo`, `zephyr simpo`): no reference model, so each is a function of the
# policy's own margin m = chosen_logps - rejected_logps, where the log-probs are sums over completion tokens, or for
# the length-normalised losses means (TRL's `average_log_prob`). The implicit rewards are beta x those log-probs.


class CPOLossOutput(NamedTuple):
    """losses: [batch] the preference term per pair (`losses.mean()` is TRL's, before `cpo_alpha` x NLL).
    chosen_rewards / rejected_rewards: [batch] beta * chosen_logps / beta * rejected_logps, detached.
    chosen_logps / rejected_logps: [batch] the log-probs the loss compared (means for length-normalised losses).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


class CPOLossRules(NamedTuple):
    """length_normalised: compares mean rather than summed completion log-probs.
    label_smoothing: uses label_smoothing (the others would ignore it, so the loader refuses it for them)."""

    length_normalised: bool = False
    label_smoothing: bool = False


CPO_LOSSES: dict[str, Loss] = {}
CPO_LOSS_RULES: dict[str, CPOLossRules] = {}


def register_cpo(name: str, **rules: bool) -> Callable[[Loss], Loss]:
    """Add a reference-free loss to `CPO_LOSSES` under its TRL `loss_type` name; called as
    `fn(margin, beta=, label_smoothing=, simpo_gamma=)` with margin: [batch]."""

    def add(fn: Loss) -> Loss:
        CPO_LOSSES[name] = fn
        CPO_LOSS_RULES[name] = CPOLossRules(**rules)
        return fn

    return add


@register_cpo("sigmoid", label_smoothing=True)
def cpo_sigmoid(margin: Tensor, *, beta: float, label_smoothing: float = 0.0, **_) -> Tensor:
    """CPO: Xu et al. 2024, arXiv:2401.08417, Eq. 3 (L_prefer, DPO with the reference dropped): -log σ(β m).

    With label_smoothing ε > 0, the conservative (cDPO) form, as TRL.
    """
    return _smoothed_logistic(beta * margin, label_smoothing)


@register_cpo("hinge")
def cpo_hinge(margin: Tensor, *, beta: float, **_) -> Tensor:
    """SLiC's calibration hinge (Zhao et al. 2023, arXiv:2305.10425) on the policy margin: max(0, 1 - β m)."""
    return torch.relu(1 - beta * margin)


@register_cpo("ipo", length_normalised=True)
def cpo_ipo(margin: Tensor, *, beta: float, **_) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17) on the policy's mean-log-prob margin: (m̄ - 1 / 2β)²."""
    return (margin - 1 / (2 * beta)) ** 2


@register_cpo("simpo", length_normalised=True, label_smoothing=True)
def simpo(margin: Tensor, *, beta: float, simpo_gamma: float, label_smoothing: float = 0.0, **_) -> Tensor:
    """SimPO: Meng et al. 2024, arXiv:2405.14734, Eq. 6: -log σ(β m̄ - γ), m̄ the margin of mean log-probs and
    γ = simpo_gamma the target reward margin; label-smoothed as TRL.

    Written β (m̄ - γ/β), TRL's order of operations, so that float rounding matches it.
    """
    return _smoothed_logistic(beta * (margin - simpo_gamma / beta), label_smoothing)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_token_counts: Tensor,
    rejected_token_counts: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> CPOLossOutput:
    """Per-pair reference-free preference loss and rewards, as TRL 1.16's `CPOTrainer.cpo_loss`; all tensors [batch].

    chosen_logps / rejected_logps: Σ completion log-probs; divided by the token counts first for `ipo` and `simpo`.
    """
    if CPO_LOSS_RULES[loss_type].length_normalised:
        chosen_logps = chosen_logps / chosen_token_counts.clamp(min=1)
        rejected_logps = rejected_logps / rejected_token_counts.clamp(min=1)
    losses = CPO_LOSSES[loss_type](
        chosen_logps - rejected_logps, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma
    )
    return CPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logps.detach(),
        rejected_rewards=beta * rejected_logps.detach(),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
    )


def chosen_nll(chosen_logps: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """[] CPO's behaviour-cloning term (Xu et al. 2024, arXiv:2401.08417, Eq. 4, L_NLL): the cross-entropy of the
    chosen completions per token over the micro-batch, -Σ chosen_logps / Σ tokens (TRL's `nll_loss`).

    chosen_logps: [batch] Σ completion log-probs; chosen_token_counts: [batch].
    """
    return -chosen_logps.sum() / chosen_token_counts.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- unpaired (KTO)
# KTO (Ethayarajh et al. 2024, arXiv:2402.01306), as TRL 1.16's KTOTrainer (`zephyr kto`): each example is one
# completion labelled desirable or undesirable, scored against a reference point z0, the policy's KL from the
# reference estimated on mismatched (prompt, completion) pairs of the same batch.


class KTOLossOutput(NamedTuple):
    """losses:           [n_chosen + n_rejected] weighted losses, desirable rows first (TRL's `losses`; the step's
                      loss is their mean).
    chosen_rewards:   [n_chosen] β (log π - log π_ref) of the desirable rows, detached.
    rejected_rewards: [n_rejected] the same for the undesirable rows.
    kl:               [] the reference point z0 the losses used, detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


KTO_LOSSES = ("kto", "apo_zero_unpaired")  # TRL's KTOConfig loss_type choices


def kto_kl(
    kl_logps: Tensor, ref_kl_logps: Tensor, *, gather: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """[] z0 = max(0, E[log π(y'|x) - log π_ref(y'|x)]) over the batch's mismatched pairs (x, y'), KTO's Eq. 7
    reference point, as TRL: the mean per process, averaged over processes, clamped at 0, no gradient.

    kl_logps / ref_kl_logps: [batch] Σ completion log-probs of the mismatched pairs under the policy / reference.
    """
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl.reshape(1)).mean()
    return kl.clamp(min=0)


def kto_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    kl: Tensor,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO's per-example losses, as TRL 1.16's `KTOTrainer._compute_loss`.

    chosen_logratios:   [n_chosen] log π(y|x) - log π_ref(y|x) of the desirable rows (Σ over completion tokens).
    rejected_logratios: [n_rejected] the same for the undesirable rows; kl: [] z0 (`kto_kl`).
    `kto` (Eq. 7, λ_D = desirable_weight, λ_U = undesirable_weight; TRL drops the paper's constant λ_y):
        desirable:   λ_D (1 - σ(β (r - z0)))      undesirable: λ_U (1 - σ(β (z0 - r)))
    `apo_zero_unpaired` (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7 unpaired, no z0):
        desirable:   λ_D (1 - σ(β r))             undesirable: λ_U σ(β r)
    """
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; choose from {', '.join(KTO_LOSSES)}")
    return KTOLossOutput(
        losses=torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        kl=kl.detach(),
    )


def kto_class_weights(num_desirable: int, num_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) that put λ_D n_D / (λ_U n_U) in [1, 4/3], KTO's recommended range
    (arXiv:2402.01306, Eq. 8; TRL's KTOTrainer warns outside it): 1 and 1 when the counts already fall in it,
    otherwise the minority class is up-weighted to the nearer end of the range and the majority keeps 1."""
    ratio = num_desirable / num_undesirable
    if ratio < 1:
        return num_undesirable / num_desirable, 1.0
    if ratio > 4 / 3:
        return 1.0, num_desirable / (num_undesirable * 4 / 3)
    return 1.0, 1.0


# ---------------------------------------------------------------------------------------------- odds ratio (ORPO)
# ORPO (Hong, Lee and Thorne 2024, arXiv:2403.07691), as TRL 1.16's ORPOTrainer (`zephyr orpo`): no reference model
# and no separate SFT stage; the loss is the NLL of the chosen sequences plus λ (TRL's `beta`) times the odds-ratio
# term below. The odds are of the length-averaged completion log-probs, P = exp(mean log p), as TRL computes them.


class ORPOLossOutput(NamedTuple):
    """losses:           [batch] L_OR = -log σ(log odds ratio) per pair (the loss adds λ x their mean).
    chosen_rewards / rejected_rewards: [batch] λ x the mean log-probs, detached (TRL's `rewards/*`).
    log_odds:         [batch] log odds(chosen) - log odds(rejected), detached (TRL's `log_odds_chosen` is its mean).
    log_odds_ratio:   [batch] log σ(log_odds), detached (TRL's `log_odds_ratio` is its mean).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds: Tensor
    log_odds_ratio: Tensor


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, elementwise; branched at -ln 2 to avoid cancellation (Mächler 2012, "Accurately
    Computing log(1 - exp(-|a|))"), as TRL."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y|x) = log P - log(1 - P) with P = exp(mean_logps) (Hong et al. 2024, Eq. 4); [batch] -> [batch]."""
    return mean_logps - log1mexp(mean_logps)


def odds_ratio_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, *, beta: float) -> ORPOLossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024, Eqs. 6-7): L_OR = -log σ(log odds(y_w|x) - log odds(y_l|x)).

    chosen_mean_logps / rejected_mean_logps: [batch] completion log-probs averaged over their tokens, in float32.
    The rewards, as TRL's, are beta x those means.
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    ratio = log_odds(chosen) - log_odds(rejected)
    log_sigmoid = F.logsigmoid(ratio)
    return ORPOLossOutput(
        losses=-log_sigmoid,
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        log_odds=ratio.detach(),
        log_odds_ratio=log_sigmoid.detach(),
    )


def orpo_loss(nll: Tensor, odds_ratio_losses: Tensor, *, beta: float) -> Tensor:
    """[] ORPO's objective (Hong et al. 2024, Eq. 6): L_SFT + λ L_OR, with nll: [] the chosen sequences' NLL
    (`chosen_nll`) and odds_ratio_losses: [batch] (`odds_ratio_loss(...).losses`), λ = beta."""
    return nll + beta * odds_ratio_losses.mean()
