"""The chunked completion log-prob kernel against the plain full-log-softmax path, by hand, and against TRL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zephyr.errors import ZephyrError
from zephyr.train.logprobs import (
    SequenceLogps,
    completion_logps,
    final_hidden_states,
    reference_completion_logps,
)


def _batch(batch=3, seq=12, d_model=8, vocab=40, dtype=torch.float32, seed=0):
    """Random hidden states / head, and labels with a prompt of 2-4 tokens, right padding and one empty row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d_model, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d_model, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    for row in range(batch):
        prompt = 2 + row % 3
        labels[row, :prompt] = -100
        labels[row, seq - row * 2 :] = -100  # padding: row 0 none, row 1 two tokens, ...
    if batch > 3:
        labels[3] = -100  # a sequence with no completion token at all
    return hidden, weight, bias, labels


def _grads(out: SequenceLogps, inputs, seed=1):
    """Gradients of a loss that uses both the sequence sums and the per-token values, with random weights."""
    gen = torch.Generator().manual_seed(seed)
    loss = (out.logps * torch.randn(out.logps.shape, generator=gen)).sum()
    loss = loss + (out.token_logps * torch.randn(out.token_logps.shape, generator=gen)).sum()
    return torch.autograd.grad(loss, inputs)


def _assert_same(a: SequenceLogps, b: SequenceLogps, atol=1e-5):
    for name in SequenceLogps._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 10_000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_path_values_and_gradients(chunk_size, with_bias):
    hidden, weight, bias, labels = _batch(batch=4)
    bias = bias if with_bias else None
    inputs = (hidden, weight) + ((bias,) if with_bias else ())

    chunked = completion_logps(
        hidden, weight, labels, lm_head_bias=bias, chunk_size=chunk_size, with_wpo=True
    )
    plain = reference_completion_logps(F.linear(hidden, weight, bias), labels, with_wpo=True)

    _assert_same(chunked, plain)
    for got, want in zip(_grads(chunked, inputs), _grads(plain, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_temperature_divides_the_logits():
    hidden, weight, _, labels = _batch()
    chunked = completion_logps(hidden, weight, labels, chunk_size=4, temperature=0.7)
    plain = reference_completion_logps(F.linear(hidden, weight), labels, temperature=0.7)
    _assert_same(chunked, plain)
    for got, want in zip(_grads(chunked, (hidden, weight)), _grads(plain, (hidden, weight)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hand_computed_two_tokens():
    """vocab 3, d_model 2, head = [[1, 0], [0, 1], [0, 0]], so logits = (h0, h1, 0).

    labels [-100, -100, 1, 0, -100]: after the shift, position 1 predicts token 1 and position 2 predicts token 0.
    Position 1 has h = (ln 2, 0): logits (ln 2, 0, 0), p = (2, 1, 1) / 4, log p(1) = -ln 4; argmax 0 != 1.
    Position 2 has h = (0, 0): logits (0, 0, 0), p = 1/3 each, log p(0) = -ln 3; argmax (first max) 0 == 0.
    logps = -ln 12; 2 tokens; logits_sum = (ln 2)/3 + 0; top1 = 1;
    entropy = [ln 4 - (2 ln 2)/4] + ln 3 (H = logsumexp - Σ p z).
    """
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    hidden = torch.zeros(1, 5, 2)
    hidden[0, 1, 0] = math.log(2)
    labels = torch.tensor([[-100, -100, 1, 0, -100]])

    out = completion_logps(hidden, weight, labels, chunk_size=1)

    torch.testing.assert_close(out.logps, torch.tensor([-math.log(12)]))
    torch.testing.assert_close(out.token_logps, torch.tensor([[0.0, -math.log(4), -math.log(3), 0.0]]))
    assert out.token_counts.tolist() == [2]
    torch.testing.assert_close(out.logits_sum, torch.tensor([math.log(2) / 3]))
    torch.testing.assert_close(out.top1_counts, torch.tensor([1.0]))
    torch.testing.assert_close(
        out.entropy_sum, torch.tensor([math.log(4) - 2 * math.log(2) / 4 + math.log(3)])
    )
    assert out.log_sum_sq_probs_sum is None


def test_statistics_are_optional():
    hidden, weight, _, labels = _batch()
    out = completion_logps(hidden, weight, labels, with_metrics=False)
    assert out.logits_sum is None and out.entropy_sum is None and out.top1_counts is None
    assert out.log_sum_sq_probs_sum is None
    plain = reference_completion_logps(F.linear(hidden, weight), labels, with_metrics=False)
    _assert_same(out, plain)


def test_bf16_inputs_accumulate_in_float32():
    """The head runs in bf16 like the model's own, everything after it in fp32: the result matches a float32
    log-softmax of the same bf16 logits, and is float32 (a bf16 log-softmax would be off by ~1e-2 per token)."""
    hidden, weight, _, labels = _batch(batch=4, seq=40, vocab=300)
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    weight_bf16 = weight.detach().bfloat16().requires_grad_()

    chunked = completion_logps(hidden_bf16, weight_bf16, labels, chunk_size=16)
    plain = reference_completion_logps(F.linear(hidden_bf16, weight_bf16), labels)

    assert chunked.logps.dtype == torch.float32
    torch.testing.assert_close(chunked.logps, plain.logps, atol=1e-4, rtol=1e-5)
    grad_hidden, grad_weight = _grads(chunked, (hidden_bf16, weight_bf16))
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    # The weight gradient sums over all tokens; accumulated in fp32 it stays within bf16 rounding of the fp32 oracle.
    hidden32, weight32 = (
        hidden_bf16.detach().float().requires_grad_(),
        weight_bf16.detach().float().requires_grad_(),
    )
    oracle = reference_completion_logps(F.linear(hidden32, weight32), labels)
    want_hidden, want_weight = _grads(oracle, (hidden32, weight32))
    torch.testing.assert_close(grad_weight.float(), want_weight, atol=0.05, rtol=0.02)
    torch.testing.assert_close(grad_hidden.float(), want_hidden, atol=0.05, rtol=0.02)


def test_autocast_recomputes_the_logits_it_saw():
    """Under CPU autocast with fp32 parameters the head runs in bf16 in forward and in the recomputing backward."""
    hidden, weight, _, labels = _batch(seq=30, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = completion_logps(hidden, weight, labels, chunk_size=8)
        plain = reference_completion_logps(F.linear(hidden, weight), labels)
    torch.testing.assert_close(chunked.logps, plain.logps, atol=1e-4, rtol=1e-5)
    got = _grads(chunked, (hidden, weight))
    want = _grads(plain, (hidden, weight))
    assert got[0].dtype == got[1].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.02)


def test_no_completion_tokens_gives_zero_and_still_backpropagates():
    hidden, weight, _, labels = _batch()
    labels[:] = -100
    out = completion_logps(hidden, weight, labels)
    assert out.logps.tolist() == [0.0, 0.0, 0.0]
    assert out.token_counts.tolist() == [0, 0, 0]
    grad_hidden, grad_weight = torch.autograd.grad(out.logps.sum(), (hidden, weight))
    assert not grad_hidden.any() and not grad_weight.any()


def test_label_outside_vocabulary_is_a_user_error():
    hidden, weight, _, labels = _batch(vocab=40)
    labels[0, -1] = 40
    with pytest.raises(ZephyrError, match="outside the model's vocabulary of 40"):
        completion_logps(hidden, weight, labels)


def test_chunk_pairs_splits_chosen_then_rejected():
    hidden, weight, _, labels = _batch(batch=4)
    out = completion_logps(hidden, weight, labels)
    chosen, rejected = out.chunk_pairs()
    assert chosen.logps.tolist() == out.logps[:2].tolist()
    assert rejected.token_counts.tolist() == out.token_counts[2:].tolist()
    assert rejected.token_logps.shape == (2, 11)
    assert chosen.log_sum_sq_probs_sum is None


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _memory_case():
    # vocab large next to d_model, so tokens x vocab (720k) dwarfs the head and its gradient (vocab x d_model = 32k)
    hidden, weight, _, labels = _batch(batch=2, seq=200, d_model=16, vocab=2000)
    labels[:, :20] = -100
    tokens = int((labels[:, 1:] != -100).sum())
    return hidden, weight, labels, tokens


def test_no_tensor_larger_than_a_chunk_of_logits_in_forward_or_backward():
    hidden, weight, labels, tokens = _memory_case()
    vocab, chunk_size = weight.shape[0], 32

    probe = _LargestTensor()
    with probe:
        completion_logps(hidden, weight, labels, chunk_size=chunk_size).logps.sum().backward()
    assert probe.largest <= chunk_size * vocab

    plain_probe = _LargestTensor()  # the probe does see the plain path's [tokens, vocab] tensors
    with plain_probe:
        reference_completion_logps(F.linear(hidden, weight), labels).logps.sum().backward()
    assert plain_probe.largest >= tokens * vocab


def test_nothing_of_size_tokens_x_vocab_is_saved_for_backward():
    hidden, weight, labels, tokens = _memory_case()
    vocab = weight.shape[0]

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sizes

    chunked = saved_sizes(lambda: completion_logps(hidden, weight, labels, chunk_size=32))
    plain = saved_sizes(lambda: reference_completion_logps(F.linear(hidden, weight), labels))
    assert max(chunked) <= vocab * hidden.shape[-1]  # the head itself (a parameter, not a copy)
    assert max(plain) >= tokens * vocab


def test_final_hidden_states_feed_the_kernel_like_the_model_logits():
    """On a tiny tied-embedding Llama: the model's own logits through the plain path == the kernel on its hidden."""
    from tiny import tiny_model

    model = tiny_model()
    input_ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100

    hidden = final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    chunked = completion_logps(hidden, model.lm_head.weight, labels, chunk_size=3)
    plain = reference_completion_logps(
        model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
    )
    _assert_same(chunked, plain)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the gradient reaches the embedding
    (grad_chunked,) = torch.autograd.grad(chunked.logps.sum(), model.lm_head.weight)
    (grad_plain,) = torch.autograd.grad(plain.logps.sum(), model.lm_head.weight)
    torch.testing.assert_close(grad_chunked, grad_plain, atol=1e-5, rtol=1e-5)


def test_per_token_values_match_trls_fused_lm_head():
    """TRL 1.16's own fused head (the source of its DPO log-probs and logits/entropy/accuracy metrics)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this TRL has no fused LM head (added in the 1.x series)")
    from tiny import tiny_model

    model = tiny_model()
    fields = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    trl_utils.add_fused_lm_head(model, outputs=fields)
    input_ids = torch.randint(3, 300, (4, 10), generator=torch.Generator().manual_seed(1))
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 4:] = 1
    completion_mask[1, 8:] = 0
    labels = input_ids.masked_fill(completion_mask == 0, -100)

    trl = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    hidden = final_hidden_states(model, input_ids=input_ids)
    ours = completion_logps(hidden, model.lm_head.weight, labels, with_wpo=True)

    torch.testing.assert_close(ours.token_logps, trl.log_probs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.logits_sum, trl.mean_logits.sum(1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.entropy_sum, trl.entropy.detach().sum(1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.top1_counts, trl.is_top1.sum(1).float())
    torch.testing.assert_close(ours.log_sum_sq_probs_sum, trl.log_sum_sq_probs.sum(1), atol=1e-5, rtol=1e-6)
    assert ours.token_counts.tolist() == trl.label_mask.sum(1).tolist()
