"""Resumable JSONL outputs: what a rerun reads back from a file an interrupted run appended to."""

from __future__ import annotations

import pytest

from zephyr.errors import DataError
from zephyr.jsonl_log import appending, read_records


def _read(path):
    return read_records(path, key="id", written_by="the test", log=print)


def test_appended_batches_read_back_in_order_each_synced_to_disk(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    synced = []
    monkeypatch.setattr("zephyr.jsonl_log.os.fsync", synced.append)
    assert _read(path) == []
    with appending(path) as append:
        append([{"id": 1, "answer": "a\u2028b"}, {"id": 2, "answer": "é"}])  # U+2028: not a line break here
        append([{"id": 3}])
    assert len(synced) == 2  # once per batch
    assert _read(path) == [{"id": 1, "answer": "a\u2028b"}, {"id": 2, "answer": "é"}, {"id": 3}]


def test_a_cut_short_last_line_is_dropped_and_cut_a_whole_one_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "ans')
    warnings = []
    assert read_records(path, key="id", written_by="the test", log=warnings.append) == [{"id": 1}]
    assert "row 2" in warnings[0] and "half-written" in warnings[0]
    assert path.read_text() == '{"id": 1}\n'

    path.write_text('{"id": 1}\n{"id": 2}')  # all but the newline written
    assert _read(path) == [{"id": 1}, {"id": 2}]
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'


@pytest.mark.parametrize(
    "text, row, reason",
    [
        ('{"id": 1}\n{oops\n{"id": 3}\n', 2, "not valid JSON"),
        ('{"id": 1}\n{"other": 2}\n', 2, "written by the test"),
    ],
)
def test_a_broken_line_before_the_end_is_an_error_not_a_guess(tmp_path, text, row, reason):
    path = tmp_path / "out.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=reason) as err:
        _read(path)
    assert err.value.row == row
    assert path.read_text() == text  # left as it was, for a person to fix
