"""Prefix sharing with padding-free packing: one packed row per micro-batch gives the same completion log-probs,
metrics and gradients as TRL's two padded rows per pair, under both truncation modes."""

from __future__ import annotations

import pytest
import torch

from zephyr.train import pair_attention
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


def _model(attention: str):
    from tiny import tiny_model, tiny_tokenizer

    m = tiny_model(tiny_tokenizer(), seed=2)  # 4 query heads over 2 key/value heads (GQA)
    attach_completion_head(m)
    if attention == "pair":
        assert pair_attention.enable(m)
    return m


@pytest.fixture(scope="module")
def model():
    return _model("sdpa")


@pytest.fixture(scope="module")
def pair_model():
    return _model("pair")


@pytest.mark.parametrize("attention", ["sdpa", "pair"])  # the block mask through sdpa; per-pair attention
@pytest.mark.parametrize(
    "truncation_mode, max_length", [("keep_start", None), ("keep_start", 12), ("keep_end", 15)]
)
def test_packed_shared_rows_give_the_same_logps_metrics_and_gradients(
    model, pair_model, attention, truncation_mode, max_length
):
    """keep_end 15 also holds a pair that shares nothing (its own two causal blocks)."""
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
    for m, batch in ((model, plain), (pair_model if attention == "pair" else model, packed)):
        m.zero_grad()
        inputs, _ = model_inputs(m, batch)
        assert ("pair_segments" in inputs) == (m is pair_model)
        out = m(**inputs, with_metrics=True, with_wpo=True)
        (out.logps.sum() + out.entropy_sum.sum()).backward()  # entropy has no gradient; logps does
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
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


def test_pair_segments_describe_the_packed_row():
    """keep_end 15: pairs 0 and 1 fit whole and share their prompts; pair 2 (prompt 14, completions 2 and 4) is
    cut by 1 and 3 prompt tokens, so it shares nothing: two causal blocks of 15."""
    packed = SharedPrefixCollator(pad_token_id=0, max_length=15, truncation_mode="keep_end")(_rows())
    segments = packed["pair_segments"].tolist()
    starts = [s[0] for s in segments]
    ends = [s[0] + s[1] + s[2] + s[3] for s in segments]
    assert (
        starts == [0] + ends[:-1] and ends[-1] == packed["input_ids"].shape[1]
    )  # they tile the row in order
    assert segments == [[0, 9, 3, 6], [18, 4, 11, 1], [34, 0, 15, 15]]
    positions = packed["position_ids"][0].tolist()
    for start, shared, chosen, rejected in segments:  # the rejected part restarts after the shared prompt
        assert positions[start + shared + chosen : start + shared + chosen + rejected] == list(
            range(shared, shared + rejected)
        )


def test_pair_attention_without_segments_is_sdpa_and_is_not_saved(model, pair_model, tmp_path):
    """Evaluation and generation with a switched model: a padded batch without pair_segments gives sdpa's
    numbers, and a saved model's config does not name the in-process attention."""
    batch = PreferenceCollator(pad_token_id=0)(_rows())
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = pair_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)
    pair_model.save_pretrained(tmp_path)
    assert pair_attention.NAME not in (tmp_path / "config.json").read_text()


def test_pair_attention_is_only_enabled_on_sdpa():
    from tiny import tiny_model

    eager = tiny_model()
    eager.config._attn_implementation = "eager"
    assert not pair_attention.enable(eager)
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("window", "max_length", "packed"), [(8, 64, False), (64, 64, True), (None, 64, True)]
)
def test_a_sliding_window_shorter_than_max_length_keeps_trls_rows(window, max_length, packed, capsys):
    """Per-pair attention and the block mask attend to the whole pair; a Mistral whose window is shorter than a
    pair would be computed as another model, so its pairs keep TRL's two padded rows (saying so when asked)."""
    import types

    from tiny import tiny_mistral, tiny_tokenizer
    from zephyr.train.dpo import preference_collator

    tok = tiny_tokenizer()
    model = tiny_mistral(tok)
    model.config.sliding_window = window
    accelerator = types.SimpleNamespace(print=print)
    for prefix_sharing in (None, True):
        cfg = types.SimpleNamespace(padding_value=None, prefix_sharing=prefix_sharing, padding_free=False,
                                    max_length=max_length, truncation_mode="keep_start")  # fmt: skip
        collate = preference_collator(cfg, tok, model, accelerator)
        assert isinstance(collate, SharedPrefixCollator) is packed
    assert ("sliding window of 8 tokens" in capsys.readouterr().out) is (not packed)
