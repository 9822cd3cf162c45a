"""Prefix sharing with padding-free packing for DPO: every pair's prompt runs once, and no FLOPs go to padding.

TRL's layout puts each pair in two padded rows, [prompt + chosen] and [prompt + rejected], so the prompt goes
through the model twice and every row is padded to the longest one. Here a micro-batch becomes ONE row:

    row:      [prompt_1 | chosen_1 | rejected_1 | prompt_2 | chosen_2 | rejected_2 | ...]
    position:  0 .. P-1   P .. P+C-1  P .. P+R-1   0 ...

with a block attention mask: a token sees earlier tokens of its own pair only, and a completion token sees the
prompt and its own completion, never the other completion. Positions restart after the prompt for the rejected
completion, so each completion sees exactly what it would see in its own row, and its log-probs are the same
(up to float rounding). The log-probs are then read through a gather that lays the hidden states out as TRL's rows
would have them ([chosen; rejected], from the token before the first completion token on), so the chunked LM
head, LD-DPO and every metric run unchanged on the same numbers.

Truncation is TRL's, per side (`preference_sequence`); when it cuts the two sides' prompts differently
(`keep_end` with a long completion) that pair shares nothing and each side gets its own block. Needs an attention
implementation that takes an explicit 4D mask: `sdpa` (boolean) or `eager` (additive); flash-attention cannot
express the branch, so `prefix_sharing` falls back to TRL's layout there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zephyr.data.tokenize import IGNORE_INDEX, preference_sequence
from zephyr.train.collate import reference_columns

SUPPORTED_ATTENTION = ("sdpa", "eager", "zephyr_pair_segments")  # the last: `pair_attention`
_SHARED, _CHOSEN, _REJECTED = 0, 1, 2


@dataclass
class SharedPrefixCollator:
    """Rows like `PreferenceCollator`'s -> one packed row per micro-batch.

    Returns
        input_ids:          [1, L] the packed row (L = Σ shared prompt + both completions; no padding)
        position_ids:       [1, L]
        attention_mask:     [1, 1, L, L] bool, True where a query (row) may attend a key (column)
        pair_segments:      [B, 4] each pair's (row start, shared prompt, chosen, rejected) lengths, the same
                            layout for `pair_attention`, which computes only what the mask lets through
        completion_gather:  [2B, T + 1] row positions of each sequence's hidden states, TRL's order [chosen; rejected]
        completion_labels:  [2B, T + 1] the matching labels (-100 outside completions), shifted like a causal LM's
        token_count:        [] the tokens TRL's two-row layout would hold without padding (its `num_tokens`)
    and `ref_chosen_logps` / `ref_rejected_logps` [B] when the rows carry precomputed reference log-probs.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        groups: list[int] = []
        branches: list[int] = []
        chosen_views, rejected_views = [], []
        segments: list[tuple[int, int, int, int]] = []
        token_count = 0
        for pair, r in enumerate(rows):
            chosen, chosen_mask = preference_sequence(
                r["prompt_input_ids"], r["chosen_input_ids"], max_length=self.max_length,
                truncation_mode=self.truncation_mode,
            )  # fmt: skip
            rejected, rejected_mask = preference_sequence(
                r["prompt_input_ids"], r["rejected_input_ids"], max_length=self.max_length,
                truncation_mode=self.truncation_mode,
            )  # fmt: skip
            token_count += len(chosen) + len(rejected)
            shared = _shared_length(chosen, chosen_mask, rejected, rejected_mask)
            base = len(ids)
            segments.append((base, shared, len(chosen) - shared, len(rejected) - shared))
            ids += chosen + rejected[shared:]
            positions += list(range(len(chosen))) + list(range(shared, len(rejected)))
            groups += [pair] * (len(chosen) + len(rejected) - shared)
            branches += [_SHARED] * shared + [_CHOSEN] * (len(chosen) - shared)
            branches += [_REJECTED] * (len(rejected) - shared)
            chosen_at = list(range(base, base + len(chosen)))
            rejected_start = base + len(chosen)
            rejected_at = chosen_at[:shared] + list(
                range(rejected_start, rejected_start + len(rejected) - shared)
            )
            chosen_views.append(_view(chosen, chosen_mask, chosen_at))
            rejected_views.append(_view(rejected, rejected_mask, rejected_at))
        gather, labels = _pad_views(chosen_views + rejected_views)
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "attention_mask": block_mask(torch.tensor(groups), torch.tensor(branches))[None, None],
            "pair_segments": torch.tensor(segments, dtype=torch.long),
            "completion_gather": gather,
            "completion_labels": labels,
            "token_count": torch.tensor(token_count),
        }
        return {**batch, **reference_columns(rows)}


def _shared_length(
    chosen: list[int], chosen_mask: list[int], rejected: list[int], rejected_mask: list[int]
) -> int:
    """Leading prompt tokens both truncated sequences hold at the same positions (0 when truncation cut their
    prompts at different places, or there is nothing to share)."""
    prompt_c = chosen_mask.index(1) if 1 in chosen_mask else len(chosen)
    prompt_r = rejected_mask.index(1) if 1 in rejected_mask else len(rejected)
    shared = min(prompt_c, prompt_r)
    if chosen[:shared] != rejected[:shared]:
        return 0
    # A side whose completion was cut away entirely still needs a token of its own to end on; keep it simple.
    return shared if shared < len(chosen) and shared < len(rejected) else 0


def _view(sequence: list[int], mask: list[int], row_positions: list[int]) -> tuple[list[int], list[int]]:
    """(row positions, labels) of one sequence from the token before its first completion token on."""
    first = mask.index(1) if 1 in mask else len(sequence) - 1
    start = max(first - 1, 0)
    labels = [t if m else IGNORE_INDEX for t, m in zip(sequence, mask, strict=True)]
    return row_positions[start:], labels[start:]


def _pad_views(views: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p, _ in views)
    gather = torch.zeros((len(views), width), dtype=torch.long)
    labels = torch.full((len(views), width), IGNORE_INDEX, dtype=torch.long)
    for i, (positions, lab) in enumerate(views):
        gather[i, : len(positions)] = torch.tensor(positions)
        labels[i, : len(lab)] = torch.tensor(lab)
    return gather, labels


def block_mask(groups: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """[L, L] bool: query i may attend key j iff j <= i, same pair, and j is shared prompt or i's own branch.

    groups, branches: [L] pair index and branch (0 shared prompt, 1 chosen, 2 rejected) of each row position.
    """
    length = groups.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    same_pair = groups[:, None] == groups[None, :]
    visible_branch = (branches[None, :] == _SHARED) | (branches[None, :] == branches[:, None])
    return causal & same_pair & visible_branch


def model_attention_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MASK [1, 1, L, L] bool in the form MODEL's attention takes a ready-made 4D mask: boolean for sdpa, additive
    (0 / dtype's min) for eager."""
    if attention_implementation(model) == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def attention_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None
