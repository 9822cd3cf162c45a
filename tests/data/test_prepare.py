"""`zephyr data prepare` end to end, on the demo data and the tiny model of tests/tiny.py: the counts it prints,
the tokenized rows it builds (checked against `zephyr data binarize` and the raw dialogues), the tokenization cache
(a second run tokenizes nothing), and invalid rows (an error naming file, row and field, or with skip_invalid a
rejects file and a count).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zephyr.data.tokenize as tokenize_module
from zephyr.cli import main
from zephyr.data.demo import generate
from zephyr.data.prepare import prepare
from zephyr.data.tokenize import masked_segments
from zephyr.recipe import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-demo"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo layout with few rows: ultrachat/{train,test}_sft.jsonl (24, 6), ultrafeedback/{train,test}_prefs."""
    out = tmp_path_factory.mktemp("demo")
    generate(out, n_sft_train=24, n_sft_test=6, n_pref_train=24, n_pref_test=6)
    return out


def args(stage: str, model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """`zephyr data prepare STAGE` on the smollm2-demo recipe with our model, data and output folder, and the
    Zephyr recipe's template settings (the expected token strings below depend on them, the demo recipe may not)."""
    return [
        "data", "prepare", stage, "--config", str(RECIPES / f"{stage}.yaml"), "--model_name_or_path", str(model),
        "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--chat_template", "zephyr", "--auto_insert_empty_system_msg", "true", *extra,
    ]  # fmt: skip


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")} if cache.is_dir() else set()


# ---------------------------------------------------------------------------------------------------- happy paths


def test_prepare_dpo_prints_counts_and_matches_binarize(tiny_model_dir, demo, tmp_path, capsys):
    argv = args("dpo", tiny_model_dir, demo / "ultrafeedback", tmp_path / "out", "--seed", "42")
    code, out, _ = run(capsys, argv)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "dpo data: 24 train rows, 6 test rows"
    assert lines[1] == "  loaded: train 24, test 6"
    assert not (tmp_path / "out" / "rejects.jsonl").exists()

    # The same rows as `zephyr data binarize` with the same seed (its default, 42), in file order, rendered by the zephyr
    # template with an empty system turn.
    raw_file = demo / "ultrafeedback" / "train_prefs.jsonl"
    code, _, _ = run(capsys, ["data", "binarize", str(raw_file), "--output", str(tmp_path / "pairs.jsonl")])
    assert code == 0
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    cfg = load_config("dpo", RECIPES / "dpo.yaml", argv[5:])
    prepared = prepare(cfg, stage="dpo")
    decode = prepared.tokenizer.decode
    assert len(prepared.train) == len(pairs) == 24
    for row, pair in zip(prepared.train, pairs, strict=True):
        assert (
            decode(row["prompt_input_ids"])
            == f"<|system|>\n</s>\n<|user|>\n{pair['prompt']}</s>\n<|assistant|>\n"
        )
        assert decode(row["chosen_input_ids"]) == pair["chosen"][-1]["content"] + "</s>\n"
        assert decode(row["rejected_input_ids"]) == pair["rejected"][-1]["content"] + "</s>\n"


def test_prepare_sft_trains_on_assistant_turns_only(tiny_model_dir, demo, tmp_path, capsys):
    argv = args("sft", tiny_model_dir, demo / "ultrachat", tmp_path / "out")
    code, out, _ = run(capsys, argv)
    assert code == 0
    assert out.splitlines()[:2] == ["sft data: 24 train rows, 6 test rows", "  loaded: train 24, test 6"]

    raw = read_jsonl(demo / "ultrachat" / "train_sft.jsonl")
    prepared = prepare(load_config("sft", RECIPES / "sft.yaml", argv[5:]), stage="sft")
    for row, dialogue in zip(prepared.train, raw, strict=True):
        segments = masked_segments(prepared.tokenizer, row["input_ids"], row["labels"])
        expected = [("<|system|>\n</s>\n", False)]
        for user, assistant in zip(dialogue["data"][::2], dialogue["data"][1::2], strict=True):
            expected += [(f"<|user|>\n{user}</s>\n<|assistant|>\n", False), (f"{assistant}</s>\n", True)]
        # Context turns merge into one untrained run.
        merged = []
        for text, trained in expected:
            if merged and merged[-1][1] == trained:
                merged[-1] = (merged[-1][0] + text, trained)
            else:
                merged.append((text, trained))
        assert segments == merged


def test_second_run_reuses_the_tokenization_cache(tiny_model_dir, demo, tmp_path, capsys, cache, monkeypatch):
    argv = args("sft", tiny_model_dir, demo / "ultrachat", tmp_path / "out")
    code, first, _ = run(capsys, argv)
    assert code == 0
    assert len(entries(cache)) == 2  # train and test

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    with monkeypatch.context() as patch:
        patch.setattr(tokenize_module, "_tokenize", no_tokenizing)
        code, second, _ = run(capsys, argv)
    assert code == 0
    assert second.splitlines()[:2] == first.splitlines()[:2]
    assert len(entries(cache)) == 2

    # A setting that changes the rows changes the key: new entries, not a stale hit.
    code, _, _ = run(capsys, [*argv, "--max_length", "256"])
    assert code == 0
    assert len(entries(cache)) == 4


# ----------------------------------------------------------------------------------------------------- bad rows


def _dialogues_with_bad_rows(demo: Path, folder: Path) -> Path:
    """An ultrachat folder whose train split has 10 good dialogues then an empty turn (row 11), invalid UTF-8
    (row 12) and a row without `data` (row 13); the test split is good."""
    folder.mkdir()
    train = (demo / "ultrachat" / "train_sft.jsonl").read_bytes().splitlines(keepends=True)[:10]
    train += [
        json.dumps({"id": "empty", "data": ["Hello?", " "]}).encode() + b"\n",
        b'{"id": "latin-1", "data": ["caf\xe9?", "A place."]}\n',
        b'{"id": "no-data"}\n',
    ]
    (folder / "train_sft.jsonl").write_bytes(b"".join(train))
    (folder / "test_sft.jsonl").write_bytes((demo / "ultrachat" / "test_sft.jsonl").read_bytes())
    return folder


def test_bad_row_stops_with_file_row_field_and_the_way_out(tiny_model_dir, demo, tmp_path, capsys):
    data = _dialogues_with_bad_rows(demo, tmp_path / "chat")
    code, out, err = run(capsys, args("sft", tiny_model_dir, data, tmp_path / "out"))
    assert code == 2 and out == ""
    assert err == (
        f"error: {data / 'train_sft.jsonl'}, row 11, field 'data[1]': empty content (the string is empty or only "
        f"whitespace); fix the row, or set skip_invalid: true (--skip_invalid true) to skip such rows and list them "
        f"in {tmp_path / 'out' / 'rejects.jsonl'}\n"
    )


def test_skip_invalid_writes_rejects_and_counts_them(tiny_model_dir, demo, tmp_path, capsys):
    data = _dialogues_with_bad_rows(demo, tmp_path / "chat")
    argv = args("sft", tiny_model_dir, data, tmp_path / "out", "--skip_invalid", "true")
    code, out, _ = run(capsys, argv)
    assert code == 0
    rejects_file = tmp_path / "out" / "rejects.jsonl"
    assert out.splitlines()[:3] == [
        "sft data: 10 train rows, 6 test rows",
        "  loaded: train 10, test 6",
        f"  skipped 3 invalid rows, listed with reasons in {rejects_file}:",
    ]
    rejects = read_jsonl(rejects_file)
    assert [(r["file"], r["row"], r["field"]) for r in rejects] == [
        (str(data / "train_sft.jsonl"), 11, "data[1]"),
        (str(data / "train_sft.jsonl"), 12, None),
        (str(data / "train_sft.jsonl"), 13, "data"),
    ]
    assert rejects[0]["data"] == {"id": "empty", "data": ["Hello?", " "]}
    assert rejects[1]["reason"].startswith("invalid UTF-8")


def test_rows_refused_by_tokenization_are_reported_again_from_the_cache(
    tiny_model_dir, demo, tmp_path, capsys, monkeypatch
):
    """max_length 80 leaves some dialogues with no assistant token inside it; they are refused when tokenized,
    and a second run, which reads the cache, must report the same rows."""
    argv = args(
        "sft",
        tiny_model_dir,
        demo / "ultrachat",
        tmp_path / "out",
        "--max_length",
        "80",
        "--skip_invalid",
        "true",
    )
    code, first, _ = run(capsys, argv)
    assert code == 0
    first_rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert first_rejects and all("beyond max_length=80" in r["reason"] for r in first_rejects)
    kept = int(first.split(" train rows")[0].split()[-1])
    refused_train = sum(r["file"].endswith("train_sft.jsonl") for r in first_rejects)
    assert kept + refused_train == 24
    # Every reason is counted in the summary, however many distinct ones there are.
    counts = [int(line.split()[0]) for line in first.splitlines()[3:] if line.startswith("    ")]
    assert sum(counts) == len(first_rejects)

    (tmp_path / "out" / "rejects.jsonl").unlink()
    monkeypatch.setattr(tokenize_module, "_tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    code, second, _ = run(capsys, argv)
    assert code == 0
    assert second.splitlines()[:-1] == first.splitlines()[:-1]  # all but the timing line
    assert read_jsonl(tmp_path / "out" / "rejects.jsonl") == first_rejects


def test_a_split_with_no_valid_rows_says_why(tiny_model_dir, demo, tmp_path, capsys):
    """All rows refused under skip_invalid: the error must point at the rejects file and quote the first reason."""
    argv = args(
        "sft",
        tiny_model_dir,
        demo / "ultrachat",
        tmp_path / "out",
        "--schema",
        "sharegpt",
        "--skip_invalid",
        "true",
    )
    code, _, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1
    rejects_file = tmp_path / "out" / "rejects.jsonl"
    assert err.startswith(
        f"error: {demo / 'ultrachat'}: split 'train_sft' has no usable rows: all 24 rows were refused"
    )
    assert (
        f"listed in {rejects_file}; the first: {demo / 'ultrachat' / 'train_sft.jsonl'}, row 1, field 'conversations'"
        in err
    )
    assert len(read_jsonl(rejects_file)) == 24


def test_a_split_whose_rows_are_all_refused_when_tokenized(tiny_model_dir, demo, tmp_path, capsys):
    """max_length 20 is shorter than any demo prompt under the zephyr template, so every row is refused."""
    argv = args(
        "sft",
        tiny_model_dir,
        demo / "ultrachat",
        tmp_path / "out",
        "--max_length",
        "20",
        "--skip_invalid",
        "true",
    )
    code, _, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1
    assert "split has no rows left" in err
    # every refused row of both splits is listed: 24 train + 5 test dialogues
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == 29
