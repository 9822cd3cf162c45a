"""Batching tokenized rows into tensors for SFT and DPO.

The preference collator reproduces TRL's `DataCollatorForPreference` layout, so the same rows give the same tensors
and therefore the same numbers: chosen rows first, then rejected rows, right padding, and a `completion_mask` that
marks the tokens whose log-probs count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zephyr.data.tokenize import IGNORE_INDEX, preference_sequence


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[] tokens of a collated batch that are not padding (TRL's `num_tokens` counts the attention mask). Packed rows
    (SFT packing, DPO prefix sharing) carry their count, as their padding is told apart only by its label and
    restarting positions."""
    if "token_count" in batch:
        return batch["token_count"].sum()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def pad_right(rows: Sequence[Sequence[int]], value: int, multiple_of: int | None = None) -> torch.Tensor:
    """[len(rows), max_len] int64 tensor, each row left-aligned and padded with `value`."""
    width = max((len(r) for r in rows), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@dataclass
class PreferenceCollator:
    """Rows `{prompt_input_ids, chosen_input_ids, rejected_input_ids[, ref_chosen_logps, ref_rejected_logps]}` (as
    `zephyr.data.tokenize.tokenize_preferences` writes them) -> one batch.

    Returns `input_ids`, `attention_mask`, `completion_mask`: [2 * batch, seq] with the chosen sequences in the first
    half and the rejected ones in the second (so chosen and rejected go through one forward pass), plus
    `ref_chosen_logps` / `ref_rejected_logps`: [batch] when the rows carry precomputed reference log-probs.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, masks = [], []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for r in rows:
                ids, mask = preference_sequence(
                    r["prompt_input_ids"],
                    r[side],
                    max_length=self.max_length,
                    truncation_mode=self.truncation_mode,
                )
                sequences.append(ids)
                masks.append(mask)
        batch = {
            "input_ids": pad_right(sequences, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad_right([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of),
            "completion_mask": pad_right(masks, 0, self.pad_to_multiple_of),
        }
        return {**batch, **reference_columns(rows)}


def reference_columns(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`ref_chosen_logps` / `ref_rejected_logps` [B] when the rows carry precomputed reference log-probs, else {}."""
    if "ref_chosen_logps" not in rows[0]:
        return {}
    return {
        key: torch.tensor([r[key] for r in rows], dtype=torch.float32)
        for key in ("ref_chosen_logps", "ref_rejected_logps")
    }


@dataclass
class SFTCollator:
    """Rows `{input_ids, labels}` -> `input_ids`, `attention_mask`, `labels`: [batch, seq], labels padded with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad_right(ids, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad_right([[1] * len(i) for i in ids], 0, self.pad_to_multiple_of),
            "labels": pad_right([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of),
        }


def pack_examples(rows: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized SFT rows, in order, into sequences of at most `max_length` tokens (greedy: a row goes into the
    current pack if it fits, else starts a new one). Each pack has `input_ids`, `labels`, `position_ids`; positions
    restart at 0 for every example, which is what keeps attention inside each example (transformers builds a
    block-diagonal causal mask from them, flash attention's varlen path reads them directly). The first label of each
    example is -100, so no example learns to predict from its predecessor's last token. No row is split or dropped.
    """
    packs: list[dict[str, list[int]]] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        n = len(r["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += list(r["input_ids"])
        current["labels"] += [IGNORE_INDEX] + list(r["labels"])[1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packs.append(current)
    return packs


@dataclass
class PackedSFTCollator:
    """Packed rows (see `pack_examples`) -> `input_ids`, `labels`, `position_ids`: [batch, seq], no attention mask.

    Padding gets label -100 and positions of its own that restart at 0, so it forms a separate block that no real
    token attends to."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        positions = [list(r["position_ids"]) + list(range(width - len(r["position_ids"]))) for r in rows]
        return {
            "input_ids": pad_right([r["input_ids"] for r in rows], self.pad_token_id),
            "labels": pad_right([r["labels"] for r in rows], IGNORE_INDEX),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "token_count": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long),
        }
