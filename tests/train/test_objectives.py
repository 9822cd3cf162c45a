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
    LOSSES,
    check_loss_config,
    dpo_loss,
    length_desensitised_logps,
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
