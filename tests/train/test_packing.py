"""SFT packing: `pack_examples` by hand, attention that never crosses an example boundary inside a pack (the packed
log-probs of each example equal its log-probs alone, on the tiny model), and a `--packing true` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zephyr.train.collate import PackedSFTCollator, pack_examples
from zephyr.train.fused_head import attach_completion_head


def _row(start: int, n: int, prompt: int = 0) -> dict:
    """Token ids start..start+n-1, the first PROMPT of them unlabelled."""
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


# ---------------------------------------------------------------------------------------------- pack_examples


def test_packs_greedily_in_order_and_restarts_positions():
    # lengths 3, 4, 2, 5, 1 into 7: [3 + 4 = 7], [2 + 5 = 7], [1]
    rows = [_row(10, 3), _row(20, 4, prompt=2), _row(30, 2), _row(40, 5, prompt=1), _row(50, 1)]
    packs = pack_examples(rows, max_length=7)
    assert [p["input_ids"] for p in packs] == [
        [10, 11, 12, 20, 21, 22, 23],
        [30, 31, 40, 41, 42, 43, 44],
        [50],
    ]
    assert [p["position_ids"] for p in packs] == [
        [0, 1, 2, 0, 1, 2, 3],
        [0, 1, 0, 1, 2, 3, 4],
        [0],
    ]
    # each example's first label is -100 (nothing learns across a boundary); the prompt labels stay -100
    assert [p["labels"] for p in packs] == [
        [-100, 11, 12, -100, -100, 22, 23],
        [-100, 31, -100, 41, 42, 43, 44],
        [-100],
    ]


def test_a_row_of_exactly_max_length_gets_a_pack_of_its_own():
    packs = pack_examples([_row(1, 2), _row(10, 4), _row(20, 1)], max_length=4)
    assert [p["input_ids"] for p in packs] == [[1, 2], [10, 11, 12, 13], [20]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=0, max_size=30),
    max_length=st.integers(12, 40),
)
def test_packing_never_splits_drops_or_reorders_a_row(lengths, max_length):
    rows, start = [], 0
    for n in lengths:
        rows.append(_row(start, n))
        start += n
    packs = pack_examples(rows, max_length)
    assert all(len(p["input_ids"]) <= max_length for p in packs)
    assert all(len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) for p in packs)
    # every example starts at a position 0; cutting each pack there gives back the rows, whole and in order
    examples = []
    for p in packs:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert starts[:1] == [0]
        for a, b in zip(starts, [*starts[1:], len(p["input_ids"])], strict=True):
            assert p["position_ids"][a:b] == list(range(b - a))
            examples.append(p["input_ids"][a:b])
    assert examples == [r["input_ids"] for r in rows]
    # greedy: the next pack's first example would not have fitted in the previous pack
    for before, after in zip(packs, packs[1:], strict=False):
        first = (
            after["position_ids"].index(0, 1) if 0 in after["position_ids"][1:] else len(after["input_ids"])
        )
        assert len(before["input_ids"]) + first > max_length


# ---------------------------------------------------------------------------------------------- attention isolation


@pytest.fixture(scope="module")
def tiny():
    from tiny import tiny_model

    model = tiny_model(seed=1).eval()
    attach_completion_head(model)
    return model


def _examples(vocab: int) -> list[dict]:
    """Three prompt + reply rows of different lengths, random token ids."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((9, 3), (5, 2), (12, 4)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _alone(model, row: dict) -> float:
    """Σ completion log-probs of one example in a batch of its own (no padding, positions 0..n-1)."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([row["input_ids"]]), completion_labels=torch.tensor([row["labels"]])
        )
    return out.logps.item()


def _per_example(token_logps: torch.Tensor, position_ids: list[int]) -> list[float]:
    """Split one packed row's token_logps [seq - 1] at the examples' starts and sum each part.

    token_logps[t] scores the token at t + 1, so example [a, b) owns token_logps[a - 1 : b - 1] (its first token,
    label -100, contributes 0)."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    ends = [*starts[1:], len(position_ids)]
    return [token_logps[max(a - 1, 0) : b - 1].sum().item() for a, b in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_log_probs_equal_each_example_alone(tiny, attn_implementation):
    tiny.set_attn_implementation(attn_implementation)
    rows = _examples(tiny.config.vocab_size)
    expected = [_alone(tiny, r) for r in rows]
    (pack,) = pack_examples(rows, max_length=64)
    with torch.no_grad():
        packed = tiny(
            input_ids=torch.tensor([pack["input_ids"]]),
            position_ids=torch.tensor([pack["position_ids"]]),
            completion_labels=torch.tensor([pack["labels"]]),
        )
        # the same pack with positions running on, as if it were one document: later examples now see earlier ones
        leaky = tiny(
            input_ids=torch.tensor([pack["input_ids"]]),
            completion_labels=torch.tensor([pack["labels"]]),
        )
    got = _per_example(packed.token_logps[0], pack["position_ids"])
    assert got == pytest.approx(expected, abs=1e-5)
    assert packed.logps.item() == pytest.approx(sum(expected), abs=1e-5)
    leaked = _per_example(leaky.token_logps[0], pack["position_ids"])
    assert leaked[0] == pytest.approx(expected[0], abs=1e-5)  # the first example has nothing before it
    assert abs(leaked[1] - expected[1]) > 1e-3 and abs(leaked[2] - expected[2]) > 1e-3


def test_collated_packs_of_different_lengths_keep_examples_apart(tiny):
    tiny.set_attn_implementation("sdpa")
    rows = _examples(tiny.config.vocab_size)
    expected = [_alone(tiny, r) for r in rows]
    packs = pack_examples(rows, max_length=16)  # [9 + 5 = 14], [12]
    assert [len(p["input_ids"]) for p in packs] == [14, 12]
    batch = PackedSFTCollator(pad_token_id=2)(packs)
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
        "token_count",
    }  # no attention mask: positions delimit examples
    assert batch["token_count"].tolist() == [14, 12]  # real tokens per row, padding excluded (num_tokens)
    assert batch["input_ids"].shape == (2, 14)
    assert batch["input_ids"][1, 12:].tolist() == [2, 2]
    assert batch["labels"][1, 12:].tolist() == [-100, -100]
    assert batch["position_ids"][1].tolist() == list(range(12)) + [0, 1]  # padding is a block of its own
    with torch.no_grad():
        out = tiny(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            completion_labels=batch["labels"],
        )
    first = _per_example(out.token_logps[0], batch["position_ids"][0].tolist())
    second = _per_example(out.token_logps[1], batch["position_ids"][1].tolist())
    assert first == pytest.approx(expected[:2], abs=1e-5)
    assert second[0] == pytest.approx(expected[2], abs=1e-5)
    assert second[1] == 0.0  # the padding block carries no loss


# ---------------------------------------------------------------------------------------------- a packed run


def _write_chat(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
            f.write(
                json.dumps({"prompt": messages[0]["content"], "prompt_id": str(i), "messages": messages})
                + "\n"
            )
    return folder


@pytest.mark.slow
def test_packed_sft_run_trains_on_fewer_sequences_than_examples(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from zephyr.data.prepare import prepare
    from zephyr.recipe import load_config
    from zephyr.train.sft import run_sft

    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    data = _write_chat(tmp_path / "chat", 12)
    cfg = load_config("sft", None, [
        f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data}", f"--output_dir={tmp_path / 'out'}",
        "--packing=true", "--max_length=128", "--num_train_epochs=1", "--per_device_train_batch_size=1",
        "--logging_steps=1", "--bf16=false", "--gradient_checkpointing=false", "--save_strategy=no",
        "--learning_rate=1e-3",
    ])  # fmt: skip
    rows = prepare(cfg, stage="sft").train
    packs = pack_examples(rows.shuffle(seed=cfg.seed).to_list(), cfg.max_length)
    assert 1 < len(packs) < len(rows) == 12

    result = run_sft(cfg, progress=False)
    assert f"packing: 12 examples into {len(packs)} sequences" in capsys.readouterr().out
    steps = [r for r in result.state.log_history if "loss" in r]
    assert result.state.global_step == len(steps) == len(packs)  # one epoch, one pack per optimizer step
    assert all(math.isfinite(r["loss"]) for r in steps)
    # every token of every pack is counted once, padding included (batch size 1: no padding here)
    assert steps[-1]["num_tokens"] == sum(len(p["input_ids"]) for p in packs)
