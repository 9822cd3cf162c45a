"""`zephyr data inspect` end to end, on the demo data and the tiny model of tests/tiny.py (its ChatML template,
`<|im_start|>ROLE\\nTEXT<|im_end|>\\n`, makes the rendered examples easy to write out by hand): schema, rows per
split, the token-length table, the truncation count, and the example with `[[`/`]]` around trained text only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zephyr.cli import main
from zephyr.data.demo import generate
from zephyr.data.inspect import percentile
from zephyr.recipe import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-demo"
USER_CACHE = os.environ.get("ZEPHYR_CACHE")  # where an embedded model may already be, for the embedded test


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo layout with few rows: ultrachat/{train,test}_sft.jsonl (24, 6), ultrafeedback/{train,test}_prefs."""
    out = tmp_path_factory.mktemp("demo")
    generate(out, n_sft_train=24, n_sft_test=6, n_pref_train=24, n_pref_test=6)
    return out


def inspect(capsys, *argv) -> str:
    code = main(["data", "inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def user_error(capsys, *argv) -> str:
    code = main(["data", "inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    return err


def first_row(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def example(out: str) -> str:
    """The rendered example: from its heading to the next split's section or the end of the output."""
    text = out.split("the rest is context with no loss:\n", 1)[1]
    return text.split("\n\nsplit ", 1)[0].removesuffix("\n")


# ----------------------------------------------------------------------------------------------------- percentile


def test_percentile_is_nearest_rank():
    values = [5, 1, 4, 2]  # sorted: 1 2 4 5; rank = ceil(4 * q / 100)
    assert [percentile(values, q) for q in (0, 25, 26, 50, 51, 90, 100)] == [1, 1, 2, 2, 4, 5, 5]
    assert percentile([7], 50) == percentile([7], 99) == 7


# --------------------------------------------------------------------------------------------------------- SFT


def test_length_table_and_truncation_count_by_hand(tiny_model_dir, tmp_path, capsys):
    """Four one-turn dialogues of clearly different lengths, measured here by rendering and tokenizing each whole."""
    from transformers import AutoTokenizer

    replies = [
        "Yes.",
        "The answer is 42.",
        "Dogs are loyal and kind animals.",
        "Ten short words: " + "go " * 30,
    ]
    dialogues = [
        [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": r}] for r in replies
    ]
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogues), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = sorted(
        len(tok("".join(chatml(m["role"], m["content"]) for m in d))["input_ids"]) for d in dialogues
    )
    assert len(set(lengths)) == 4

    out = inspect(capsys, source, "--model", tiny_model_dir, "--max-length", lengths[1])
    assert "split train: 4 rows, schema messages (sft)" in out
    assert "  tokens             p50     p90     p99     max    mean" in out.splitlines()
    [row] = [line.split() for line in out.splitlines() if line.startswith("  conversation")]
    assert row[1:5] == [str(lengths[1]), str(lengths[3]), str(lengths[3]), str(lengths[3])]
    assert float(row[5]) == pytest.approx(sum(lengths) / 4, abs=0.05)
    assert f"  max_length {lengths[1]} would truncate 2 of 4 rows (50.0%)" in out.splitlines()
    assert example(out) == chatml("user", "Tell me.") + f"<|im_start|>assistant\n[[{replies[0]}<|im_end|>\n]]"


def test_ultrachat_folder(tiny_model_dir, demo, capsys):
    out = inspect(capsys, demo / "ultrachat", "--model", tiny_model_dir)
    assert out.splitlines()[0] == f"source: {demo / 'ultrachat'}"
    assert "split test_sft: 6 rows, schema ultrachat (sft)" in out
    assert "split train_sft: 24 rows, schema ultrachat (sft)" in out
    assert sum(line.startswith("  conversation ") for line in out.splitlines()) == 2
    assert sum(line.startswith("  trained ") for line in out.splitlines()) == 2
    assert "max_length" not in out  # neither a recipe nor --max-length

    # The example is the first test dialogue (splits are listed in name order), every assistant turn marked.
    turns = first_row(demo / "ultrachat" / "test_sft.jsonl")["data"]
    expected = ""
    for user, reply in zip(turns[::2], turns[1::2], strict=True):
        expected += chatml("user", user) + f"<|im_start|>assistant\n[[{reply}<|im_end|>\n]]"
    assert f"example (row {demo / 'ultrachat' / 'test_sft.jsonl'}:1)" in out
    assert example(out) == expected


def test_invalid_rows_are_counted_not_measured(tiny_model_dir, demo, tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    good = (demo / "ultrachat" / "train_sft.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    source.write_text(
        "\n".join([good[0], '{"id": "bad", "data": ["Hi", ""]}', *good[1:]]) + "\n", encoding="utf-8"
    )
    out = inspect(capsys, source, "--model", tiny_model_dir)
    assert "split train: 3 rows, schema ultrachat (sft)" in out
    assert "  1 rows fail validation (training stops on the first unless --skip-invalid):" in out
    assert "         1  empty content (the string is empty or only whitespace)" in out.splitlines()


# ---------------------------------------------------------------------------------------------------- preferences


def test_ultrafeedback_folder(tiny_model_dir, demo, capsys):
    out = inspect(capsys, demo / "ultrafeedback", "--model", tiny_model_dir)
    assert "split test_prefs: 6 rows, schema ultrafeedback (preference)" in out
    assert "split train_prefs: 24 rows, schema ultrafeedback (preference)" in out
    for column in ("prompt", "chosen", "rejected"):
        assert sum(line.startswith(f"  {column} ") for line in out.splitlines()) == 2

    raw = first_row(demo / "ultrafeedback" / "test_prefs.jsonl")
    scores = [c["overall_score"] for c in raw["completions"]]
    best = raw["completions"][scores.index(max(scores))]["response"]  # the published rule: first best
    others = [c["response"] for c in raw["completions"] if c["response"] != best]
    prompt = chatml("user", raw["instruction"]) + "<|im_start|>assistant\n"
    chosen, rejected = example(out).split("\n--- rejected:\n")
    assert chosen == f"--- chosen:\n{prompt}[[{best}<|im_end|>\n]]"
    assert rejected.startswith(prompt + "[[") and rejected.endswith("<|im_end|>\n]]")
    assert rejected[len(prompt) + 2 : -len("<|im_end|>\n]]")] in others


def test_recipe_supplies_the_length_limits(tiny_model_dir, demo, capsys):
    recipe = RECIPES / "dpo.yaml"
    cfg = load_config("dpo", recipe)
    out = inspect(
        capsys, demo / "ultrafeedback", "--recipe", recipe, "--model", tiny_model_dir, "--split", "test_prefs"
    )
    assert "split train_prefs" not in out
    # The demo prompts are under 100 tokens, far below the recipe's limits.
    assert f"  max_prompt_length {cfg.max_prompt_length} would cut 0 prompts (0.0%)" in out.splitlines()
    assert f"  max_length {cfg.max_length} would truncate 0 of 6 rows (0.0%)" in out.splitlines()
    assert "[[" in example(out)

    out = inspect(capsys, demo / "ultrafeedback", "--recipe", recipe, "--model", tiny_model_dir, "--split", "test_prefs",
                  "--max-length", 1)  # fmt: skip
    assert "  max_length 1 would truncate 6 of 6 rows (100.0%)" in out.splitlines()


def test_the_zephyr_template_marks_the_reply_and_its_end_of_turn(tiny_model_dir, demo, capsys):
    out = inspect(
        capsys,
        demo / "ultrachat",
        "--model",
        tiny_model_dir,
        "--split",
        "test_sft",
        "--chat-template",
        "zephyr",
    )
    turns = first_row(demo / "ultrachat" / "test_sft.jsonl")["data"]
    assert example(out).startswith(f"<|user|>\n{turns[0]}</s>\n<|assistant|>\n[[{turns[1]}</s>\n]]")


# --------------------------------------------------------------------------------------------------------- mistakes


def test_a_recipe_of_the_other_stage_is_named(tiny_model_dir, demo, capsys):
    err = user_error(capsys, demo / "ultrachat", "--recipe", RECIPES / "dpo.yaml", "--model", tiny_model_dir)
    assert f"{RECIPES / 'dpo.yaml'} is a dpo recipe but this data holds sft rows" in err


def test_no_valid_rows_quotes_the_first_reason(tiny_model_dir, demo, capsys):
    err = user_error(
        capsys, demo / "ultrachat", "--schema", "sharegpt", "--split", "test_sft", "--model", tiny_model_dir
    )
    assert err == (
        f"error: {demo / 'ultrachat'}: split 'test_sft' has no usable rows: all 6 rows were refused as invalid; "
        f"the first: {demo / 'ultrachat' / 'test_sft.jsonl'}, row 1, field 'conversations': missing (the row has "
        "no value for it)\n"
    )


def test_bad_arguments(tiny_model_dir, demo, tmp_path, capsys):
    assert "--max-length must be a positive" in user_error(capsys, demo / "ultrachat", "--max-length", 0)
    err = user_error(capsys, tmp_path / "nope.jsonl", "--model", tiny_model_dir)
    assert err == f"error: {tmp_path / 'nope.jsonl'}: no such file or folder; check the path\n"
    err = user_error(capsys, demo / "ultrachat", "--split", "validation", "--model", tiny_model_dir)
    assert "there is no split 'validation'" in err and "test_sft, train_sft" in err


# --------------------------------------------------------------------------------------------------------- embedded


@pytest.mark.embedded
def test_inspect_with_the_demo_recipe_on_the_embedded_model(demo, monkeypatch, capsys):
    """The recipe's model is the embedded SmolLM2 (fetched into $ZEPHYR_CACHE on first use, about 40 s)."""
    if USER_CACHE is None:
        monkeypatch.delenv("ZEPHYR_CACHE")
    else:
        monkeypatch.setenv("ZEPHYR_CACHE", USER_CACHE)
    out = inspect(capsys, demo / "ultrachat", "--recipe", RECIPES / "sft.yaml", "--split", "test_sft")
    cfg = load_config("sft", RECIPES / "sft.yaml")
    assert "split test_sft: 6 rows, schema ultrachat (sft)" in out
    assert f"  max_length {cfg.max_length} would truncate 0 of 6 rows (0.0%)" in out.splitlines()
    turns = first_row(demo / "ultrachat" / "test_sft.jsonl")["data"]
    # SmolLM2's end-of-turn token is <|im_end|>, under its own template and under the zephyr one alike.
    for user, reply in zip(turns[::2], turns[1::2], strict=True):
        assert f"[[{reply}<|im_end|>" in example(out)
        assert f"{user}<|im_end|>" in example(out).replace("[[", "").replace("]]", "")
