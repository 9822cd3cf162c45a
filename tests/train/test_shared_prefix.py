"""Prefix sharing with padding-free packing: one packed row per micro-batch gives the same completion log-probs,
metrics and gradients as TRL's two padded rows per pair, under both truncation modes."""

from __future__ import annotations

import pytest
import torch

from zephyr.train.collate import PreferenceCollator
from zephyr.train.dpo import model_inputs
from zephyr.train.fused_head import attach_completion_head
from zephyr.train.shared_prefix import SharedPrefixCollator, block_mask


def _rows() -> list[dict]:
    """Prompts of 9, 4 and 14 tokens; completions of unequal lengths, one empty-ish (1 token)."""
    return [
        {"prompt_input_ids": list(range(10, 19)), "chosen_input_ids": [40, 41, 42], "rejected_input_ids": [50, 51, 52, 53, 54, 55]},
        {"prompt_input_ids": [20, 21, 22, 23], "chosen_input_ids": [60] * 11, "rejected_input_ids": [70]},
        {"prompt_input_ids": list(range(100, 114)), "chosen_input_ids": [80, 81], "rejected_input_ids": [90, 91, 92, 93]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    from tiny import tiny_model, tiny_tokenizer

    m = tiny_model(tiny_tokenizer(), seed=2)
    attach_completion_head(m)
    return m


@pytest.mark.parametrize(
    "truncation_mode, max_length", [("keep_start", None), ("keep_start", 12), ("keep_end", 15)]
)
def test_packed_shared_rows_give_the_same_logps_metrics_and_gradients(model, truncation_mode, max_length):
    rows = _rows()
    plain = PreferenceCollator(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode)(rows)
    packed = SharedPrefixCollator(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode)(
        rows
    )
    assert packed["input_ids"].shape[0] == 1
    assert int(packed["token_count"]) == int(plain["attention_mask"].sum())  # TRL's num_tokens
    # shared prompts and no padding: fewer tokens through the model than TRL's padded rows
    assert packed["input_ids"].numel() < plain["attention_mask"].sum() < plain["input_ids"].numel()

    results = []
    for batch in (plain, packed):
        model.zero_grad()
        inputs, _ = model_inputs(model, batch)
        out = model(**inputs, with_metrics=True, with_wpo=True)
        (out.logps.sum() + out.entropy_sum.sum()).backward()  # entropy has no gradient; logps does
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out, grads))
    (a, grad_a), (b, grad_b) = results
    for field in (
        "logps",
        "token_counts",
        "logits_sum",
        "entropy_sum",
        "top1_counts",
        "log_sum_sq_probs_sum",
    ):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


def test_keep_end_with_unequal_cuts_shares_nothing_for_that_pair():
    """Prompt 9 tokens, chosen 3, rejected 6, max_length 12: chosen keeps all 9 prompt tokens, rejected only the last
    6, at other positions: sharing them would change the numbers, so the pair gets two blocks (12 + 12 tokens)."""
    row = _rows()[0]
    packed = SharedPrefixCollator(pad_token_id=0, max_length=12, truncation_mode="keep_end")([row])
    assert packed["input_ids"].shape[1] == 12 + 12
    assert packed["position_ids"][0].tolist() == list(range(12)) + list(range(12))


def test_block_mask_by_hand():
    """One pair: prompt p0 p1, chosen c0, rejected r0 r1 -> r0 sees p0 p1 r0 but not c0; c0 sees p0 p1 c0;
    a second pair's token sees nothing of the first."""
    groups = torch.tensor([0, 0, 0, 0, 0, 1])
    branches = torch.tensor([0, 0, 1, 2, 2, 0])
    mask = block_mask(groups, branches).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_eager_attention_gets_an_additive_mask():
    from zephyr.train.shared_prefix import model_attention_mask

    class Eager(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "eager"})()

    mask = torch.tensor([[[[True, False], [True, True]]]])
    additive = model_attention_mask(Eager(), mask, torch.float32)
    assert additive.dtype == torch.float32 and additive[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert additive[0, 0, 1, 0] == 0 and additive[0, 0, 0, 0] == 0
