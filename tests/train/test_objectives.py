"""DPO-family losses: three-pair cases worked by hand, then parity with TRL 1.16's DPOTrainer on random tensors."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from zephyr.errors import ConfigError
from zephyr.train.logprobs import SequenceLogps
from zephyr.train.objectives import (
    CPO_LOSSES,
    KTO_LOSSES,
    LOSSES,
    check_loss_config,
    chosen_nll,
    cpo_loss,
    dpo_loss,
    kto_class_weights,
    kto_kl,
    kto_loss,
    length_desensitised_logps,
    log1mexp,
    odds_ratio_loss,
    orpo_loss,
    preference_metrics,
    wpo_weights,
)


def ell(x: float) -> float:
    """The logistic loss -log σ(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Three pairs with a zero reference, so log-ratios are the log-probs themselves:
#   chosen log-ratios c = [1, 0, -1], rejected r = [-1, 0, 1], Δ = c - r = [2, 0, -2]; with β = 0.5, βΔ = [1, 0, -1].
# Completion lengths: chosen [1, 2, 4], rejected [1, 1, 2].
CHOSEN = torch.tensor([1.0, 0.0, -1.0])
REJECTED = torch.tensor([-1.0, 0.0, 1.0])
ZERO = torch.zeros(3)
CHOSEN_COUNTS = torch.tensor([1, 2, 4])
REJECTED_COUNTS = torch.tensor([1, 1, 2])
BETA = 0.5


def _losses(loss_type, **kw):
    kw.setdefault("beta", BETA)
    out = dpo_loss(
        CHOSEN,
        REJECTED,
        ZERO,
        ZERO,
        loss_type=loss_type,
        chosen_token_counts=CHOSEN_COUNTS,
        rejected_token_counts=REJECTED_COUNTS,
        **kw,
    )
    return out.losses


def _check(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_sigmoid():
    """-log σ(βΔ) = [ℓ(1), ℓ(0), ℓ(-1)] = [0.3133, 0.6931, 1.3133]."""
    _check(_losses("sigmoid"), [ell(1), math.log(2), ell(-1)])


def test_sigmoid_label_smoothing_is_cdpo():
    """cDPO with ε = 0.1: 0.9 ℓ(βΔ) + 0.1 ℓ(-βΔ) = [0.9ℓ(1) + 0.1ℓ(-1), ln 2, 0.9ℓ(-1) + 0.1ℓ(1)]."""
    _check(
        _losses("sigmoid", label_smoothing=0.1),
        [0.9 * ell(1) + 0.1 * ell(-1), math.log(2), 0.9 * ell(-1) + 0.1 * ell(1)],
    )


def test_hinge():
    """relu(1 - βΔ) = relu([0, 1, 2])."""
    _check(_losses("hinge"), [0.0, 1.0, 2.0])


def test_ipo_normalises_by_length():
    """Per-token log-ratios: c/len = [1, 0, -0.25], r/len = [-1, 0, 0.5], Δ̄ = [2, 0, -0.75];
    (Δ̄ - 1/(2β))² = (Δ̄ - 1)² = [1, 1, 3.0625]."""
    _check(_losses("ipo"), [1.0, 1.0, 3.0625])


def test_sigmoid_norm():
    """-log σ(β Δ̄) with Δ̄ = [2, 0, -0.75]: [ℓ(1), ln 2, ℓ(-0.375)]."""
    _check(_losses("sigmoid_norm"), [ell(1), math.log(2), ell(-0.375)])


def test_robust():
    """ε = 0.1: (0.9 ℓ(βΔ) - 0.1 ℓ(-βΔ)) / 0.8; at βΔ = 0 that is (0.9 - 0.1) ln 2 / 0.8 = ln 2."""
    _check(
        _losses("robust", label_smoothing=0.1),
        [(0.9 * ell(1) - 0.1 * ell(-1)) / 0.8, math.log(2), (0.9 * ell(-1) - 0.1 * ell(1)) / 0.8],
    )


def test_exo_pair():
    """ε = 1e-3, m = βΔ: σ(m)(log σ(m) - log(1-ε)) + σ(-m)(log σ(-m) - log ε)."""

    def exo(m, eps=1e-3):
        return sig(m) * (math.log(sig(m)) - math.log(1 - eps)) + sig(-m) * (math.log(sig(-m)) - math.log(eps))

    _check(_losses("exo_pair", label_smoothing=1e-3), [exo(1), exo(0), exo(-1)])


def test_nca_pair():
    """βc = [0.5, 0, -0.5], βr = [-0.5, 0, 0.5]: ℓ(βc) + ½ℓ(-βc) + ½ℓ(-βr); the middle pair is 2 ln 2."""
    _check(
        _losses("nca_pair"),
        [
            ell(0.5) + 0.5 * ell(-0.5) + 0.5 * ell(0.5),
            2 * math.log(2),
            ell(-0.5) + 0.5 * ell(0.5) + 0.5 * ell(-0.5),
        ],
    )


def test_bco_pair():
    """ℓ(βc) + ℓ(-βr) = [2ℓ(0.5), 2 ln 2, 2ℓ(-0.5)]."""
    _check(_losses("bco_pair"), [2 * ell(0.5), 2 * math.log(2), 2 * ell(-0.5)])


def test_sppo_hard():
    """1/(2β) = 1: (c - 1)² + (r + 1)² = [0 + 0, 1 + 1, 4 + 4]."""
    _check(_losses("sppo_hard"), [0.0, 2.0, 8.0])


def test_apo_zero():
    """1 - σ(βc) + σ(βr) = [2σ(-0.5), 1, 2σ(0.5)]."""
    _check(_losses("apo_zero"), [2 * sig(-0.5), 1.0, 2 * sig(0.5)])


def test_apo_down():
    """σ(βc) + 1 - σ(β(c - r)) = [σ(0.5) + 1 - σ(1), 1, σ(-0.5) + 1 - σ(-1)]."""
    _check(_losses("apo_down"), [sig(0.5) + 1 - sig(1), 1.0, sig(-0.5) + 1 - sig(-1)])


def test_discopop():
    """m = σ(βΔ/τ), τ = 0.05: (1 - m) ℓ(βΔ) + m e^(-βΔ); at βΔ = 0, m = ½: ½ ln 2 + ½."""

    def disco(x, tau=0.05):
        m = sig(x / tau)
        return (1 - m) * ell(x) + m * math.exp(-x)

    _check(_losses("discopop"), [disco(1), 0.5 * math.log(2) + 0.5, disco(-1)])


def test_sft_is_the_token_mean_nll_of_the_chosen():
    """Chosen log-probs [1, 0, -1] over 1 + 2 + 4 = 7 tokens: NLL = -(1 + 0 - 1) / 7 = 0, spread over 3 pairs.
    With chosen [-2, -4, -6]: 12 / 7 each."""
    _check(_losses("sft"), [0.0, 0.0, 0.0])
    out = dpo_loss(
        torch.tensor([-2.0, -4.0, -6.0]),
        REJECTED,
        ZERO,
        ZERO,
        loss_type="sft",
        chosen_token_counts=CHOSEN_COUNTS,
    )
    _check(out.losses, [12 / 7] * 3)


def test_aot_pairs_sorted_margins():
    """Policy margins chosen - rejected = [2, 0, -2] -> sorted [-2, 0, 2]; reference margins [0, 3, -1] -> sorted
    [-1, 0, 3]. δ = [-1, 0, -1], β = 1: [ℓ(-1), ln 2, ℓ(-1)] (sorted order, not the pairs' order)."""
    out = dpo_loss(CHOSEN, REJECTED, torch.tensor([0.0, 3.0, -1.0]), ZERO, loss_type="aot", beta=1.0)
    _check(out.losses, [ell(-1), math.log(2), ell(-1)])


def test_aot_unpaired_sorts_each_side():
    """Chosen log-ratios [1, 0, -1] -> [-1, 0, 1]; rejected [-1, 0, 1] -> [-1, 0, 1]; difference 0: ln 2 each."""
    _check(_losses("aot_unpaired", beta=1.0), [math.log(2)] * 3)


def test_every_registered_loss_has_a_hand_test():
    tested = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    covered = {n for n in LOSSES if any(t == n or t.startswith(n + "_") for t in tested)}
    assert covered == set(LOSSES)


def test_rewards_are_beta_times_log_ratios_and_detached():
    """β (logps - ref): chosen 0.5 [1-0.5, 0-0.5, -1-0.5], rejected 0.5 [-1, 0, 1]."""
    chosen = CHOSEN.clone().requires_grad_()
    out = dpo_loss(chosen, REJECTED, torch.full((3,), 0.5), ZERO, beta=BETA)
    _check(out.chosen_rewards, [0.25, -0.25, -0.75])
    _check(out.rejected_rewards, [-0.5, 0.0, 0.5])
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_reference_free_ignores_the_reference():
    ref = torch.tensor([5.0, -3.0, 2.0])
    free = dpo_loss(CHOSEN, REJECTED, ref, ref * 2, reference_free=True, beta=BETA)
    zero_ref = dpo_loss(CHOSEN, REJECTED, ZERO, ZERO, beta=BETA)
    for got, want in zip(free, zero_ref, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.equal(dpo_loss(CHOSEN, REJECTED, ref, ref * 2, beta=BETA).losses, free.losses)


def test_weighted_sum_of_loss_types_and_rpo_alpha():
    """[sigmoid, hinge] with weights [1, 0.5] = sigmoid + 0.5 hinge; rpo_alpha=a = [sigmoid, sft] with [1, a]."""
    combined = _losses(["sigmoid", "hinge"], loss_weights=[1.0, 0.5])
    torch.testing.assert_close(combined, _losses("sigmoid") + 0.5 * _losses("hinge"))
    chosen = torch.tensor([-2.0, -4.0, -6.0])
    rpo = dpo_loss(chosen, REJECTED, ZERO, ZERO, rpo_alpha=0.3, chosen_token_counts=CHOSEN_COUNTS).losses
    explicit = dpo_loss(
        chosen,
        REJECTED,
        ZERO,
        ZERO,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1, 0.3],
        chosen_token_counts=CHOSEN_COUNTS,
    ).losses
    torch.testing.assert_close(rpo, explicit)


def test_length_desensitised_logps():
    """Chosen has 3 completion tokens (-1, -2, -4), rejected 2 (-1, -1): shared length 2.
    α = 0.5: chosen = -1 - 2 + 0.5 x -4 = -5; rejected = -2 (no tail). α = 1 gives the plain sums."""
    chosen_tokens = torch.tensor([[0.0, -1.0, -2.0, -4.0, 0.0]])
    chosen_mask = torch.tensor([[0, 1, 1, 1, 0]])
    rejected_tokens = torch.tensor([[0.0, 0.0, -1.0, -1.0, 0.0]])
    rejected_mask = torch.tensor([[0, 0, 1, 1, 0]])
    chosen, rejected = length_desensitised_logps(
        chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, 0.5
    )
    assert chosen.tolist() == [-5.0] and rejected.tolist() == [-2.0]
    chosen, rejected = length_desensitised_logps(
        chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, 1.0
    )
    assert chosen.tolist() == [-7.0] and rejected.tolist() == [-2.0]
    with pytest.raises(ConfigError, match="ld_alpha"):
        length_desensitised_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, 1.5)


def test_wpo_weights():
    """exp((Σ log p - Σ log Σp²) / n): (-3 - (-1)) / 2 = -1 -> e^-1; an empty sequence counts as length 1."""
    got = wpo_weights(torch.tensor([-3.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([2, 0]))
    torch.testing.assert_close(got, torch.tensor([math.exp(-1), 1.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "sigmod"}, "Did you mean 'sigmoid'"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "one weight per loss_type"),
        ({"loss_type": "exo_pair"}, "label_smoothing > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "below 0.5"),
        ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "not to bco_pair"),
        ({"loss_type": "sigmoid", "f_divergence_type": "forward"}, "Unknown f_divergence_type"),
        ({"loss_type": "sigmoid", "beta": 0.0}, "beta must be positive"),
        ({"loss_type": "aot", "use_weighting": True}, "use_weighting"),
        ({"loss_type": []}, "loss_type is empty"),
    ],
)
def test_config_mistakes_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_loss_config(**kwargs)


# ---- parity with TRL 1.16 ------------------------------------------------------------------------------------------


def _require_trl_116():
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("1.16."):
        pytest.skip(f"the oracle is TRL 1.16's DPOTrainer._compute_loss; installed {trl.__version__}")
    from trl import DPOTrainer

    return DPOTrainer


def _trl_dpo(
    batch,
    loss_type,
    *,
    beta,
    label_smoothing=0.0,
    loss_weights=None,
    ld_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    use_weighting=False,
):
    """TRL 1.16's DPOTrainer._compute_loss, unbound, on a stub trainer whose model returns the batch's per-token values
    (what TRL's fused LM head returns) and with precomputed reference log-probs. Returns (loss, metrics)."""
    trainer_class = _require_trl_116()
    shift_mask = batch["completion_mask"][:, 1:]
    outputs = types.SimpleNamespace(
        log_probs=batch["token_logps"] * shift_mask,
        entropy=batch["entropy"] * shift_mask,
        mean_logits=batch["mean_logits"] * shift_mask,
        is_top1=batch["is_top1"] & shift_mask.bool(),
        log_sum_sq_probs=batch["log_sum_sq_probs"] * shift_mask,
    )

    def model(**_):
        return outputs

    model.training = True
    same = lambda t: t  # noqa: E731  (one process: gathering is the identity)
    stub = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        args=types.SimpleNamespace(discopop_tau=0.05),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        beta=beta,
        loss_types=list(loss_type),
        loss_weights=loss_weights or [1.0] * len(loss_type),
        label_smoothing=label_smoothing,
        ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones_like(batch["completion_mask"]),
        "attention_mask": torch.ones_like(batch["completion_mask"]),
        "completion_mask": batch["completion_mask"],
        "ref_chosen_logps": batch["ref_chosen_logps"],
        "ref_rejected_logps": batch["ref_rejected_logps"],
    }
    loss = trainer_class._compute_loss(stub, model, inputs, False)
    return loss, {name: values[-1] for name, values in stub._metrics["train"].items()}


def _random_batch(pairs=5, seq=16, seed=0):
    """[chosen; rejected] rows with prompts of 2-5 tokens, completions of 1+ tokens and right padding."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, seq, dtype=torch.long)
    for row in range(2 * pairs):
        prompt = int(torch.randint(2, 6, (), generator=gen))
        length = int(torch.randint(1, seq - prompt + 1, (), generator=gen))
        completion_mask[row, prompt : prompt + length] = 1
    shape = (2 * pairs, seq - 1)
    return {
        "completion_mask": completion_mask,
        "token_logps": -torch.rand(shape, generator=gen) * 4,
        "entropy": torch.rand(shape, generator=gen) * 3,
        "mean_logits": torch.randn(shape, generator=gen),
        "is_top1": torch.rand(shape, generator=gen) > 0.5,
        "log_sum_sq_probs": -torch.rand(shape, generator=gen) * 2,
        "ref_chosen_logps": -torch.rand(pairs, generator=gen) * 30,
        "ref_rejected_logps": -torch.rand(pairs, generator=gen) * 30,
    }


def _ours(
    batch,
    loss_type,
    *,
    beta,
    label_smoothing=0.0,
    loss_weights=None,
    ld_alpha=None,
    use_weighting=False,
    **kw,
):
    """The same step with our pieces: sequence sums, optional LD-DPO / WPO, dpo_loss, preference_metrics."""
    shift_mask = batch["completion_mask"][:, 1:]
    token_logps = batch["token_logps"] * shift_mask
    counts = shift_mask.sum(1)
    sums = SequenceLogps(
        logps=token_logps.sum(1),
        token_logps=token_logps,
        token_counts=counts,
        logits_sum=(batch["mean_logits"] * shift_mask).sum(1),
        entropy_sum=(batch["entropy"] * shift_mask).sum(1),
        top1_counts=(batch["is_top1"] & shift_mask.bool()).sum(1).float(),
        log_sum_sq_probs_sum=(batch["log_sum_sq_probs"] * shift_mask).sum(1),
    )
    chosen, rejected = sums.chunk_pairs()
    chosen_logps, rejected_logps = chosen.logps, rejected.logps
    if ld_alpha is not None:
        chosen_mask, rejected_mask = shift_mask.chunk(2)
        chosen_logps, rejected_logps = length_desensitised_logps(
            chosen.token_logps, chosen_mask, rejected.token_logps, rejected_mask, ld_alpha
        )
    weights = None
    if use_weighting:
        chosen_w, rejected_w = wpo_weights(sums.logps, sums.log_sum_sq_probs_sum, counts).chunk(2)
        weights = chosen_w * rejected_w
    chosen_counts, rejected_counts = batch["completion_mask"].sum(1).chunk(2)
    out = dpo_loss(
        chosen_logps,
        rejected_logps,
        batch["ref_chosen_logps"],
        batch["ref_rejected_logps"],
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
        chosen_token_counts=chosen_counts,
        rejected_token_counts=rejected_counts,
        chosen_sft_logps=chosen.logps,
        weights=weights,
        **kw,
    )
    metrics = preference_metrics(out, chosen_logps, rejected_logps, chosen, rejected)
    return out.losses.mean(), metrics


def _assert_parity(trl_result, ours_result):
    trl_loss, trl_metrics = trl_result
    our_loss, our_metrics = ours_result
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-6, rtol=1e-6)
    for name, value in our_metrics.items():
        assert name in trl_metrics, name
        assert value.item() == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-6), name


def _smoothing_for(loss_type: str) -> float:
    # TRL 1.16's sigmoid ignores label_smoothing (ours is cDPO), so parity is checked where both use it or neither.
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_each_loss_matches_trl(loss_type):
    batch = _random_batch()
    kw = {"beta": 0.1, "label_smoothing": _smoothing_for(loss_type)}
    _assert_parity(_trl_dpo(batch, [loss_type], **kw), _ours(batch, [loss_type], **kw))


def test_large_beta_and_combined_losses_match_trl():
    """MPO-style combination with weights, at the Zephyr recipe's β = 0.01 and a large β."""
    batch = _random_batch(seed=1)
    types_ = ["sigmoid", "bco_pair", "sft"]
    for beta in (0.01, 2.0):
        kw = {"beta": beta, "loss_weights": [0.8, 0.2, 1.0]}
        _assert_parity(_trl_dpo(batch, types_, **kw), _ours(batch, types_, **kw))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sft", "apo_zero"])
def test_ld_alpha_matches_trl(loss_type):
    batch = _random_batch(seed=2)
    kw = {"beta": 0.1, "ld_alpha": 0.3}
    _assert_parity(_trl_dpo(batch, [loss_type], **kw), _ours(batch, [loss_type], **kw))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "nca_pair"])
def test_use_weighting_matches_trl(loss_type):
    batch = _random_batch(seed=3)
    kw = {"beta": 0.1, "label_smoothing": _smoothing_for(loss_type), "use_weighting": True}
    _assert_parity(_trl_dpo(batch, [loss_type], **kw), _ours(batch, [loss_type], **kw))


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop", "exo_pair"])
def test_f_divergences_match_trl(divergence, loss_type):
    batch = _random_batch(seed=4)
    # small log-ratios: forward KL's exp(-r) stays finite in float32
    batch["ref_chosen_logps"] = (batch["token_logps"] * batch["completion_mask"][:, 1:]).sum(1)[:5] + 0.5
    kw = {"beta": 0.1, "label_smoothing": _smoothing_for(loss_type)}
    ours = _ours(batch, [loss_type], f_divergence_type=divergence, f_alpha_divergence_coef=0.3, **kw)
    trl = _trl_dpo(batch, [loss_type], f_divergence_type=divergence, f_alpha_divergence_coef=0.3, **kw)
    _assert_parity(trl, ours)


def test_trl_sigmoid_ignores_label_smoothing_where_ours_is_cdpo():
    """The one deliberate difference: documented, so it must stay true (else update the module docstring)."""
    batch = _random_batch(seed=5)
    trl_plain, _ = _trl_dpo(batch, ["sigmoid"], beta=0.1)
    trl_smoothed, _ = _trl_dpo(batch, ["sigmoid"], beta=0.1, label_smoothing=0.2)
    ours_smoothed, _ = _ours(batch, ["sigmoid"], beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(trl_smoothed, trl_plain)
    assert not torch.allclose(ours_smoothed, trl_smoothed)


def test_metrics_reduce_across_processes_like_trl():
    """A second process whose every gathered value is 1 (one pair, one token each time).

    rewards/chosen: per-pair mean over both processes: ([0.5, 0, -0.5] + [1, 1, 1]) / 6 = 0.5.
    logits/chosen: token-weighted: (1 + 2 + 3 + 1) / (3 + 1) tokens = 1.75, not the mean of the per-process means 1.5.
    """
    out = dpo_loss(CHOSEN, REJECTED, ZERO, ZERO, beta=BETA)
    seq = SequenceLogps(
        logps=CHOSEN,
        token_logps=CHOSEN[:, None],
        token_counts=torch.tensor([1, 1, 1]),
        logits_sum=torch.tensor([1.0, 2.0, 3.0]),
        entropy_sum=torch.zeros(3),
        top1_counts=torch.tensor([1.0, 0.0, 1.0]),
    )
    metrics = preference_metrics(
        out, CHOSEN, REJECTED, seq, seq, gather=lambda t: torch.cat([t, torch.ones_like(t)])
    )
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert metrics["logits/chosen"].item() == pytest.approx(1.75)
    assert metrics["mean_token_accuracy"].item() == pytest.approx(3 / 4)
    # here pair 1 wins, pair 2 ties (a tie is not a win), pair 3 loses; the other process's three are all "1"
    assert metrics["rewards/accuracies"].item() == pytest.approx(4 / 6)


def test_pair_logps_applies_ld_alpha_to_the_tail_past_the_shorter_completion():
    """chosen tokens (log-probs) -1, -2, -3 (3 completion tokens), rejected -1, -1 (2): shared length 2.
    ld_alpha 0.5: chosen = -1 - 2 + 0.5 x -3 = -4.5, rejected = -2; without ld_alpha the plain sums -6 and -2."""
    from zephyr.train.dpo import pair_logps
    from zephyr.train.logprobs import SequenceLogps

    labels = torch.tensor([[0, 5, 5, 5], [0, 5, 5, -100]])  # position 0 is never scored (shifted)
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    out = SequenceLogps(logps=token_logps.sum(1), token_logps=token_logps, token_counts=torch.tensor([3, 2]))
    chosen, rejected = pair_logps(out, labels, 0.5)
    assert chosen.tolist() == [-4.5] and rejected.tolist() == [-2.0]
    chosen, rejected = pair_logps(out, labels, None)
    assert chosen.tolist() == [-6.0] and rejected.tolist() == [-2.0]


# ---------------------------------------------------------------------------------------------- reference-free (CPO)
# The same three pairs, read as the policy's own log-probs: margin m = [2, 0, -2]; with β = 0.5, β m = [1, 0, -1].
# Mean log-probs (ipo, simpo): chosen [1/1, 0/2, -1/4] = [1, 0, -0.25], rejected [-1/1, 0/1, 1/2] = [-1, 0, 0.5],
# so m̄ = [2, 0, -0.75].


def _cpo(loss_type, **kw):
    kw.setdefault("beta", BETA)
    return cpo_loss(CHOSEN, REJECTED, CHOSEN_COUNTS, REJECTED_COUNTS, loss_type=loss_type, **kw)


def test_cpo_sigmoid_is_dpo_without_a_reference():
    """-log σ(β m) = [ℓ(1), ln 2, ℓ(-1)]; rewards β x the summed log-probs."""
    out = _cpo("sigmoid")
    _check(out.losses, [ell(1), math.log(2), ell(-1)])
    _check(out.chosen_rewards, [0.5, 0.0, -0.5])
    _check(out.rejected_rewards, [-0.5, 0.0, 0.5])
    _check(out.chosen_logps, [1.0, 0.0, -1.0])


def test_cpo_sigmoid_with_label_smoothing_is_conservative():
    """ε = 0.25: 0.75 ℓ(β m) + 0.25 ℓ(-β m)."""
    want = [0.75 * ell(x) + 0.25 * ell(-x) for x in (1.0, 0.0, -1.0)]
    _check(_cpo("sigmoid", label_smoothing=0.25).losses, want)


def test_cpo_hinge():
    """max(0, 1 - β m) = max(0, 1 - [1, 0, -1]) = [0, 1, 2]."""
    _check(_cpo("hinge").losses, [0.0, 1.0, 2.0])


def test_cpo_ipo_uses_mean_log_probs():
    """(m̄ - 1/2β)² with 1/2β = 1: ([2, 0, -0.75] - 1)² = [1, 1, 3.0625]; logps/* are the means."""
    out = _cpo("ipo")
    _check(out.losses, [1.0, 1.0, 3.0625])
    _check(out.chosen_logps, [1.0, 0.0, -0.25])
    _check(out.rejected_logps, [-1.0, 0.0, 0.5])


def test_cpo_simpo_has_a_target_margin():
    """-log σ(β m̄ - γ), γ = 0.5: β m̄ - γ = [1, 0, -0.375] - 0.5 = [0.5, -0.5, -0.875]; rewards β x the means."""
    out = _cpo("simpo", simpo_gamma=0.5)
    _check(out.losses, [ell(0.5), ell(-0.5), ell(-0.875)])
    _check(out.chosen_rewards, [0.5, 0.0, -0.125])
    _check(out.rejected_rewards, [-0.5, 0.0, 0.25])
    assert not out.chosen_rewards.requires_grad


def test_cpo_simpo_without_margin_is_length_normalised_cpo():
    """γ = 0: -log σ(β m̄) = [ℓ(1), ln 2, ℓ(-0.375)]."""
    _check(_cpo("simpo", simpo_gamma=0.0).losses, [ell(1), math.log(2), ell(-0.375)])


def test_chosen_nll_is_the_per_token_cross_entropy_of_the_batch():
    """Σ log-probs [-1, 0, -6] over 1 + 2 + 4 tokens: 7 / 7 = 1, where the mean of per-pair means would be
    (1 + 0 + 1.5) / 3."""
    _check(chosen_nll(torch.tensor([-1.0, 0.0, -6.0]), CHOSEN_COUNTS), 1.0)


def test_every_registered_cpo_loss_has_a_hand_test():
    tested = {name[len("test_cpo_") :] for name in globals() if name.startswith("test_cpo_")}
    covered = {n for n in CPO_LOSSES if any(t == n or t.startswith(n + "_") for t in tested)}
    assert covered == set(CPO_LOSSES)


def test_cpo_losses_match_trl_cpo_trainer_on_random_tensors():
    """TRL 1.16's `CPOTrainer.cpo_loss` called on a stand-in `self`, for every loss type."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(8) * 20, -torch.rand(8) * 20
    chosen_counts, rejected_counts = torch.randint(1, 9, (8,)), torch.randint(1, 9, (8,))
    for loss_type in CPO_LOSSES:
        for label_smoothing in (0.0, 0.2) if loss_type in ("sigmoid", "simpo") else (0.0,):
            ours = cpo_loss(chosen, rejected, chosen_counts, rejected_counts, loss_type=loss_type, beta=0.3,
                            label_smoothing=label_smoothing, simpo_gamma=0.7)  # fmt: skip
            normalise = loss_type in ("ipo", "simpo")
            trl_self = types.SimpleNamespace(
                alpha=0.0, beta=0.3, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=0.7,
                accelerator=types.SimpleNamespace(device=torch.device("cpu")),
            )  # fmt: skip
            theirs = cpo_trainer.CPOTrainer.cpo_loss(
                trl_self,
                chosen / chosen_counts if normalise else chosen,
                rejected / rejected_counts if normalise else rejected,
            )
            for got, want in zip(ours[:3], theirs, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- odds ratio (ORPO)
# Mean log-probs of three pairs: chosen P = [1/2, 1/4, 1/2], rejected P = [1/4, 1/2, 1/2].
# odds = P / (1 - P): 1/2 -> 1, 1/4 -> 1/3; so the log odds ratios are [ln 3, -ln 3, 0].
ORPO_CHOSEN = torch.log(torch.tensor([0.5, 0.25, 0.5]))
ORPO_REJECTED = torch.log(torch.tensor([0.25, 0.5, 0.5]))


def test_odds_ratio_loss_by_hand():
    """-log σ(log odds ratio): σ(ln 3) = 3/4, σ(-ln 3) = 1/4, σ(0) = 1/2, so L_OR = [ln 4/3, ln 4, ln 2];
    rewards are β x the mean log-probs; log_odds_ratio is log σ(.) = -L_OR."""
    out = odds_ratio_loss(ORPO_CHOSEN, ORPO_REJECTED, beta=0.5)
    _check(out.losses, [math.log(4 / 3), math.log(4), math.log(2)])
    _check(out.log_odds, [math.log(3), -math.log(3), 0.0])
    _check(out.log_odds_ratio, [math.log(3 / 4), math.log(1 / 4), math.log(1 / 2)])
    _check(out.chosen_rewards, [0.5 * math.log(0.5), 0.5 * math.log(0.25), 0.5 * math.log(0.5)])
    _check(out.rejected_rewards, [0.5 * math.log(0.25), 0.5 * math.log(0.5), 0.5 * math.log(0.5)])
    assert not out.chosen_rewards.requires_grad


def test_orpo_loss_is_nll_plus_lambda_times_the_mean_odds_ratio_term():
    """NLL 2 + λ 0.5 x mean(ln 4/3, ln 4, ln 2) = 2 + ln(32/3) / 6."""
    out = odds_ratio_loss(ORPO_CHOSEN, ORPO_REJECTED, beta=0.5)
    _check(orpo_loss(torch.tensor(2.0), out.losses, beta=0.5), 2 + math.log(32 / 3) / 6)


def test_log1mexp_is_accurate_on_both_branches():
    """log(1 - e^x): near 0, 1 - e^x = -x(1 + x/2 + ...), so x = -1e-10 gives log(1e-10) - 5e-11 (log(1 - exp(x))
    in float64 is off from the 9th digit); far below, x = -50 gives -e^-50; at -ln 2 both branches give log(1/2)."""
    x = torch.tensor([-1e-10, -50.0, -math.log(2), math.log(0.25)], dtype=torch.float64)
    want = [math.log(1e-10) - 5e-11, -math.exp(-50), math.log(0.5), math.log(0.75)]
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-12, atol=0)


def test_odds_ratio_loss_matches_trl_orpo_trainer_on_random_tensors():
    """TRL 1.16's `ORPOTrainer.odds_ratio_loss` called on a stand-in `self`: its losses are β log σ(.), ours
    -log σ(.) with β applied in `orpo_loss`, so TRL's loss (nll - mean(losses)) is ours."""
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(8) * 3, -torch.rand(8) * 3
    trl_self = types.SimpleNamespace(beta=0.3, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = orpo_trainer.ORPOTrainer.odds_ratio_loss(
        trl_self, chosen, rejected
    )
    ours = odds_ratio_loss(chosen, rejected, beta=0.3)
    nll = torch.tensor(1.5)
    torch.testing.assert_close(orpo_loss(nll, ours.losses, beta=0.3), nll - losses.mean())
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)
    torch.testing.assert_close(ours.log_odds_ratio.mean(), ratio)
    torch.testing.assert_close(ours.log_odds.mean(), log_odds)


# ---------------------------------------------------------------------------------------------- unpaired (KTO)
# Two desirable rows with log-ratios r = [2, 0] and two undesirable with r = [-2, 4], reference point z0 = 1, β = 0.5.


def test_kto_kto_loss_weighs_each_class_against_the_reference_point():
    """desirable: λ_D (1 - σ(β (r - z0))) = 1 - σ(0.5), 1 - σ(-0.5) = σ(0.5); undesirable: λ_U (1 - σ(β (z0 - r)))
    = 2 (1 - σ(1.5)), 2 (1 - σ(-1.5)) = 2 σ(1.5) with λ_U = 2; rewards β r = [1, 0] and [-1, 2]."""
    out = kto_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 4.0]), torch.tensor(1.0), beta=0.5,
                   desirable_weight=1.0, undesirable_weight=2.0)  # fmt: skip
    _check(out.losses, [1 - sig(0.5), sig(0.5), 2 * (1 - sig(1.5)), 2 * sig(1.5)])
    _check(out.chosen_rewards, [1.0, 0.0])
    _check(out.rejected_rewards, [-1.0, 2.0])


def test_kto_apo_zero_unpaired_has_no_reference_point():
    """desirable 1 - σ(β r) = 1 - σ(1), 1/2; undesirable σ(β r) = σ(-1), σ(2); z0 is ignored."""
    out = kto_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 4.0]), torch.tensor(1.0), beta=0.5,
                   loss_type="apo_zero_unpaired")  # fmt: skip
    _check(out.losses, [1 - sig(1.0), 0.5, sig(-1.0), sig(2.0)])


def test_kto_loss_with_one_class_in_the_batch():
    """A micro-batch of desirable rows only: the undesirable half is empty, the losses are the desirable ones."""
    out = kto_loss(torch.tensor([2.0]), torch.zeros(0), torch.tensor(0.0), beta=0.5)
    _check(out.losses, [1 - sig(1.0)])


def test_kto_kl_is_the_clamped_mean_log_ratio_of_the_mismatched_pairs():
    """z0 = max(0, mean(log π - log π_ref)): [-3, -5] - [-4, -7] = [1, 2] -> 1.5; [-3, -5] - [-4, -3] = [1, -2]
    -> -0.5, clamped to 0. With a gather (two processes, the other's mean 2.5): (1.5 + 2.5) / 2 = 2."""
    _check(kto_kl(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -7.0])), 1.5)
    _check(kto_kl(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -3.0])), 0.0)
    two_processes = lambda t: torch.cat([t, torch.tensor([2.5])])  # noqa: E731
    _check(kto_kl(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -7.0]), gather=two_processes), 2.0)


@pytest.mark.parametrize(
    ("counts", "weights"),
    [((5, 5), (1.0, 1.0)),  # ratio 1: in [1, 4/3]
     ((4, 3), (1.0, 1.0)),  # ratio 4/3: in range
     ((3, 9), (3.0, 1.0)),  # ratio 1/3: desirable up-weighted to 3 x 3 / 9 = 1
     ((10, 3), (1.0, 2.5))],  # ratio 10/3: undesirable up-weighted to 10 / (3 x 2.5) = 4/3
)  # fmt: skip
def test_kto_class_weights_bring_the_weighted_ratio_into_range(counts, weights):
    assert kto_class_weights(*counts) == pytest.approx(weights)


def test_every_kto_loss_type_has_a_hand_test():
    tested = {name[len("test_kto_") :] for name in globals() if name.startswith("test_kto_")}
    untested = [n for n in KTO_LOSSES if not any(t == n or t.startswith(n + "_") for t in tested)]
    assert not untested, f"KTO loss types without a hand-worked test: {untested}"
