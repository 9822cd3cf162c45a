from __future__ import annotations

import json

import datasets
import pytest

from zephyr.data import sources
from zephyr.data.sources import Record, iter_records, list_splits
from zephyr.errors import DataError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def good(records):
    return [(r.row, r.data) for r in records if r.error is None]


def errors(records):
    return [r.error for r in records if r.error is not None]


# ---------------------------------------------------------------- JSON lines


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"a": 1}\n\n{"a": 2}\n   \n{"a": "é"}', encoding="utf-8"
    )  # last line has no newline: fine
    records = list(iter_records(str(path)))
    assert records == [
        Record(str(path), 1, {"a": 1}, None),
        Record(str(path), 3, {"a": 2}, None),
        Record(str(path), 5, {"a": "é"}, None),
    ]


def test_jsonl_strings_are_kept_verbatim(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "  padded\t\n"}])
    assert good(iter_records(str(path))) == [(1, {"text": "  padded\t\n"})]


def test_jsonl_byte_order_mark_is_not_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert good(iter_records(str(path))) == [(1, {"a": 1})]


def test_invalid_utf8_is_reported_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n{"a": 3}\n')
    records = list(iter_records(str(path)))
    assert good(records) == [(1, {"a": 1}), (3, {"a": 3})]
    (err,) = errors(records)
    assert (err.file, err.row, err.field) == (str(path), 2, None)
    # '{"a": "' is 7 bytes, so the bad byte is the 8th.
    assert str(err) == f"{path}, row 2: invalid UTF-8 at byte 8 of the line; re-save the file as UTF-8"


def test_truncated_last_line_is_reported_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": "cut of', encoding="utf-8")
    records = list(iter_records(str(path)))
    assert good(records) == [(1, {"a": 1}), (2, {"a": 2})]
    (err,) = errors(records)
    assert err.row == 3 and err.file == str(path)
    assert "last line is cut off" in err.reason and "truncated" in err.reason


def test_malformed_line_and_non_object_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1,}\n[1, 2]\n"text"\n{"a": 4}\n', encoding="utf-8")
    records = list(iter_records(str(path)))
    assert good(records) == [(4, {"a": 4})]
    bad = errors(records)
    assert [e.row for e in bad] == [1, 2, 3]
    assert bad[0].reason.startswith(
        "malformed JSON (Expecting property name enclosed in double quotes at column 9)"
    )
    assert bad[1].reason == "expected a JSON object (a row with named fields), got an array"
    assert bad[2].reason == "expected a JSON object (a row with named fields), got a string"


# ---------------------------------------------------------------- JSON arrays and Parquet


def test_json_array_rows_are_numbered_by_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, 3], indent=2), encoding="utf-8")
    records = list(iter_records(str(path)))
    assert good(records) == [(1, {"a": 1}), (2, {"a": 2})]
    (err,) = errors(records)
    assert err.row == 3 and err.reason == "expected a JSON object (a row with named fields), got a number"


def test_json_file_may_hold_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    assert good(iter_records(str(path))) == [(1, {"a": 1}), (2, {"a": 2})]


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_records(str(path)))
    assert info.value.file == str(path)
    assert info.value.reason.startswith("malformed JSON at line 4, column 1")


def test_truncated_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, {"a": 2}', encoding="utf-8")
    with pytest.raises(DataError, match="ends before the array is closed"):
        list(iter_records(str(path)))


def test_parquet_rows(tmp_path):
    rows = [{"a": i, "m": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    path = write_parquet(tmp_path / "d.parquet", rows)
    assert good(iter_records(str(path))) == [(i + 1, r) for i, r in enumerate(rows)]


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_records(str(path)))


# ---------------------------------------------------------------- folders and splits


def test_folder_files_map_to_splits(tmp_path):
    write_jsonl(tmp_path / "train_prefs.jsonl", [{"x": "p1"}, {"x": "p2"}])
    write_jsonl(tmp_path / "test_prefs.jsonl", [{"x": "t1"}])
    write_parquet(tmp_path / "train-00000-of-00002.parquet", [{"x": "s1"}])
    write_parquet(tmp_path / "train-00001-of-00002.parquet", [{"x": "s2"}, {"x": "s3"}])
    write_jsonl(tmp_path / ".cache" / "junk.jsonl", [{"x": "hidden"}])
    (tmp_path / "README.md").write_text("# not data")
    assert list_splits(str(tmp_path)) == ["test_prefs", "train", "train_prefs"]
    train = list(iter_records(str(tmp_path), split="train"))
    # Shards in order; row numbers restart in every file, which the origin names.
    assert [(r.origin.rsplit("/", 1)[1], r.row, r.data["x"]) for r in train] == [
        ("train-00000-of-00002.parquet", 1, "s1"),
        ("train-00001-of-00002.parquet", 1, "s2"),
        ("train-00001-of-00002.parquet", 2, "s3"),
    ]
    assert [r.data["x"] for r in iter_records(str(tmp_path), split="train_prefs")] == ["p1", "p2"]


def test_hub_snapshot_layout(tmp_path):
    write_parquet(tmp_path / "data" / "train_prefs-00000-of-00001.parquet", [{"x": 1}])
    write_parquet(tmp_path / "data" / "test_prefs-00000-of-00001-abc123.parquet", [{"x": 2}])
    assert list_splits(str(tmp_path)) == ["test_prefs", "train_prefs"]
    assert good(iter_records(str(tmp_path), split="test_prefs")) == [(1, {"x": 2})]


def test_config_subfolder(tmp_path):
    write_jsonl(tmp_path / "default" / "train.jsonl", [{"x": 1}])
    write_jsonl(tmp_path / "other" / "train.jsonl", [{"x": 2}])
    assert good(iter_records(str(tmp_path), config="other")) == [(1, {"x": 2})]
    with pytest.raises(DataError, match="local data has no config 'nope'"):
        list(iter_records(str(tmp_path), config="nope"))


def test_missing_split_lists_the_splits(tmp_path):
    write_jsonl(tmp_path / "train_sft.jsonl", [{"x": 1}])
    with pytest.raises(DataError) as info:
        list(iter_records(str(tmp_path), split="test_sft"))
    assert info.value.file == str(tmp_path)
    assert "there is no split 'test_sft'; the splits found are: train_sft" in info.value.reason


def test_single_file_is_train_unless_told(tmp_path):
    path = write_jsonl(tmp_path / "whatever.jsonl", [{"x": 1}])
    assert list_splits(str(path)) == ["train"]
    assert good(iter_records(str(path))) == [(1, {"x": 1})]
    assert good(iter_records(str(path), split="train_sft")) == [(1, {"x": 1})]


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"x": 1}, {"x": 2}]),
            "test": datasets.Dataset.from_list([{"x": 3}]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    assert list_splits(str(tmp_path / "saved")) == ["test", "train"]
    records = list(iter_records(str(tmp_path / "saved"), split="test"))
    assert records == [Record(f"{tmp_path / 'saved'}[test]", 1, {"x": 3}, None)]


def test_empty_folder_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no .jsonl, .json, .parquet files in this folder"):
        list_splits(str(tmp_path))
    for missing in [str(tmp_path / "nope"), "./data/train.jsonl", "~/nothing-here-zephyr", "prefs.parquet"]:
        with pytest.raises(DataError) as info:
            list(iter_records(missing))
        assert str(info.value) == f"{missing}: no such file or folder; check the path"
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(iter_records(str(tmp_path / "d.csv")))


# ---------------------------------------------------------------- hub


def test_hub_ids_go_through_load_dataset(tmp_path, monkeypatch):
    """A hub id reaches `datasets.load_dataset`; here a local folder stands in for the hub repository."""
    write_jsonl(tmp_path / "repo" / "train.jsonl", [{"x": 1}, {"x": 2}])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_hub(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real_load_dataset(str(tmp_path / "repo"), name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    records = list(iter_records("HuggingFaceH4/fake", split="train"))
    assert calls == [("HuggingFaceH4/fake", None, {"split": "train"})]
    assert records == [
        Record("HuggingFaceH4/fake[train]", 1, {"x": 1}, None),
        Record("HuggingFaceH4/fake[train]", 2, {"x": 2}, None),
    ]
    with pytest.raises(DataError, match=r"\(Unknown split \"test\". Should be one of \['train'\]\.\)"):
        list(iter_records("HuggingFaceH4/fake", split="test"))
    assert (tmp_path / "cache").exists()


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_no_network_is_one_sentence(offline):
    expected = (
        "could not load dataset zephyr-test/no-such-dataset from the Hugging Face hub (no network?); "
        "pass a local .jsonl/.json/.parquet file or folder"
    )
    with pytest.raises(DataError) as info:
        list(iter_records("zephyr-test/no-such-dataset", split="train"))
    assert str(info.value) == expected
    with pytest.raises(DataError) as info:
        list_splits("zephyr-test/no-such-dataset")
    assert str(info.value) == expected


def test_hub_id_shapes():
    assert sources._HUB_ID.match("HuggingFaceH4/ultrachat_200k")
    assert sources._HUB_ID.match("ultrachat")
    assert not sources._HUB_ID.match("a/b/c")
