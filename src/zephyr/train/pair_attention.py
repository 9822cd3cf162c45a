"""Attention for the prefix-shared packed row that spends no FLOPs on what the block mask hides.

`SharedPrefixCollator` lays a micro-batch out as one row, [prompt_1 | chosen_1 | rejected_1 | prompt_2 | ...], and
its block mask says who sees whom. Handing that [L, L] mask to SDPA is exact but computes every query against every
key of the row: the cost grows with the square of the whole row, and on a CPU the masked kernel also gives up the
causal kernel's skipping of the upper triangle. Measured on SmolLM2-135M, a 2,226-token row: attention was 46% of a
forward + backward step. Yet each query sees only its own pair, in two causal pieces:

    [prompt | chosen]   attends [prompt | chosen]      plain causal attention (SDPA's `is_causal` kernel)
    [rejected]          attends [prompt | rejected]    causal, aligned to the bottom right (the prompt is all
                                                       visible, the rejected part causally)

so this runs SDPA per pair on those pieces: the same softmax over the same keys (exact up to float rounding), at a
cost of Σ (P + C)² / 2 + R (P + R) rather than L² for the row.

It is an attention implementation registered with transformers (`AttentionInterface`) under `NAME`, with sdpa's mask
function. Given `pair_segments` (a forward keyword the decoder passes down to every attention layer) it runs per
pair; without it, it is exactly transformers' sdpa, so evaluation and generation with the same model are unchanged.
The implementation name lives in the in-memory config only (transformers does not save it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "zephyr_pair_segments"


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, pair_segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model: torch.nn.Module) -> bool:
    """Switch MODEL (an sdpa model) to the per-pair attention; True when it was switched or already was."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    register()
    config._attn_implementation = NAME
    return True


def pair_segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_segments: tuple[tuple[int, int, int, int], ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: QUERY [1, H, L, D], KEY / VALUE [1, H_kv, L, D] -> ([1, L, H, D], None).

    PAIR_SEGMENTS: one (start, shared, chosen, rejected) per pair, in row order, covering the row; the block mask
    (ATTENTION_MASK) is then not read."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if pair_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    pieces = []
    for start, shared, chosen, rejected in pair_segments:
        split = start + shared + chosen
        end = split + rejected
        pieces.append(
            F.scaled_dot_product_attention(
                query[:, :, start:split], key[:, :, start:split], value[:, :, start:split],
                dropout_p=dropout, is_causal=True, scale=scaling,
            )
        )  # fmt: skip
        if rejected == 0:
            continue
        if shared == 0:  # a pair that shares nothing: the rejected sequence is its own causal block
            k, v, mask, causal = key[:, :, split:end], value[:, :, split:end], None, True
        else:
            k = torch.cat([key[:, :, start : start + shared], key[:, :, split:end]], dim=2)
            v = torch.cat([value[:, :, start : start + shared], value[:, :, split:end]], dim=2)
            mask = torch.ones(rejected, shared + rejected, dtype=torch.bool, device=query.device).tril_(
                shared
            )
            causal = False
        pieces.append(
            F.scaled_dot_product_attention(
                query[:, :, split:end],
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=scaling,
            )
        )
    out = torch.cat(pieces, dim=2)
    if out.shape[2] != query.shape[2]:
        raise ValueError(f"pair_segments cover {out.shape[2]} positions of a {query.shape[2]}-token row")
    return out.transpose(1, 2).contiguous(), None


def segments_argument(segments: torch.Tensor) -> tuple[tuple[int, int, int, int], ...]:
    """The collator's [pairs, 4] tensor as the plain ints the attention slices with (read once per forward)."""
    return tuple(tuple(int(x) for x in row) for row in segments.tolist())
