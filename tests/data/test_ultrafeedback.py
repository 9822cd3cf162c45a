"""Binarizing raw UltraFeedback rows by the published rule, on hand-made rows with hand-checked answers."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from zephyr.data.ultrafeedback import (
    ASPECTS,
    TooFewCompletions,
    binarize_file,
    binarize_row,
    rejects_path_for,
)
from zephyr.errors import DataError


def completion(response: str, overall, ratings=("3", "3", "3", "3")) -> dict:
    """A raw UltraFeedback completion; RATINGS are in ASPECTS order (instruction_following, honesty, ...)."""
    return {
        "model": "m",
        "principle": "helpfulness",
        "custom_system_prompt": "",
        "response": response,
        "annotations": {a: {"Rating": r, "Rationale": "."} for a, r in zip(ASPECTS, ratings, strict=True)},
        "critique": ".",
        "overall_score": overall,
        "fine-grained_score": None,
    }


def raw_row(prompt: str, *completions: dict) -> dict:
    return {
        "source": "test",
        "instruction": prompt,
        "models": ["m"] * len(completions),
        "completions": list(completions),
    }


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_highest_overall_score_is_chosen_and_schema_is_the_published_one():
    row = raw_row("Name a fruit.", completion("a", 3.0), completion("b", 8.5), completion("c", 6))
    out = binarize_row(row, random.Random(0))
    assert list(out) == [
        "prompt",
        "prompt_id",
        "chosen",
        "rejected",
        "messages",
        "score_chosen",
        "score_rejected",
    ]
    assert out["chosen"] == [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "b"},
    ]
    assert out["messages"] == out["chosen"]
    assert out["score_chosen"] == 8.5 and isinstance(out["score_chosen"], float)
    assert out["rejected"][1]["content"] in {"a", "c"}
    assert out["score_rejected"] == {"a": 3.0, "c": 6.0}[out["rejected"][1]["content"]]


def test_first_of_equal_top_scores_is_chosen():
    row = raw_row("p", completion("a", 7), completion("b", 9), completion("c", 9), completion("d", 2))
    for seed in range(20):
        assert binarize_row(row, random.Random(seed))["chosen"][1]["content"] == "b"


def test_rejected_is_a_seeded_draw_from_the_others_advanced_row_by_row():
    """Chosen is "b" (index 1); the others are [a, c, d]. One Random(42) shared by five identical rows gives
    Random(42).choice over [a, c, d] five times in a row: d, a, a, d, c (computed once and written down). A script
    that re-seeded every row would repeat the first draw instead."""
    row = raw_row("p", completion("a", 1), completion("b", 9), completion("c", 5), completion("d", 5))
    rng = random.Random(42)
    picks = [binarize_row(row, rng)["rejected"][1]["content"] for _ in range(5)]
    assert picks == ["d", "a", "a", "d", "c"]


def test_rejected_may_tie_with_the_chosen_score():
    row = raw_row("p", completion("a", 9), completion("b", 9))
    out = binarize_row(row, random.Random(1))
    assert (out["chosen"][1]["content"], out["rejected"][1]["content"]) == ("a", "b")
    assert out["score_chosen"] == out["score_rejected"] == 9.0


def test_all_equal_scores_keep_the_first_as_chosen_and_a_random_other_as_rejected():
    row = raw_row("p", completion("a", 5), completion("b", 5), completion("c", 5), completion("d", 5))
    rejected = {binarize_row(row, random.Random(seed))["rejected"][1]["content"] for seed in range(30)}
    assert rejected == {"b", "c", "d"}


def test_a_completion_repeating_the_chosen_text_is_never_rejected():
    row = raw_row("p", completion("same", 9), completion("same", 4), completion("other", 1))
    for seed in range(20):
        assert binarize_row(row, random.Random(seed))["rejected"][1]["content"] == "other"
    with pytest.raises(TooFewCompletions):
        binarize_row(raw_row("p", completion("same", 9), completion("same", 4)), random.Random(0))


def test_prompt_id_is_the_sha256_hex_of_the_prompt():
    out = binarize_row(raw_row("hello", completion("a", 2), completion("b", 1)), random.Random(0))
    # sha256("hello"), a well-known test vector
    assert out["prompt_id"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert out["prompt_id"] == hashlib.sha256(b"hello").hexdigest()


def test_mean_rule_ranks_by_aspect_ratings_leaving_na_out():
    """a: overall 2 but ratings 5, N/A, 5, N/A -> mean (5+5)/2 = 5.0; b: overall 9, ratings 4,4,4,4 -> 4.0;
    c: ratings 2, 3, N/A, 4 -> 9/3 = 3.0. By the mean a wins; by overall_score b wins."""
    row = raw_row(
        "p",
        completion("a", 2, ("5", "N/A", "5", "N/A")),
        completion("b", 9, ("4", "4", "4", "4")),
        completion("c", 1, ("2", "3", "N/A", "4")),
    )
    mean = binarize_row(row, random.Random(0), score="mean")
    assert mean["chosen"][1]["content"] == "a" and mean["score_chosen"] == 5.0
    assert mean["score_rejected"] == {"b": 4.0, "c": 3.0}[mean["rejected"][1]["content"]]
    assert binarize_row(row, random.Random(0), score="overall")["chosen"][1]["content"] == "b"


def test_mean_rule_refuses_a_completion_with_only_na_ratings():
    row = raw_row("p", completion("a", 2, ("N/A",) * 4), completion("b", 9))
    with pytest.raises(DataError) as e:
        binarize_row(row, random.Random(0), score="mean")
    assert e.value.field == "completions[0].annotations"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"completions": [completion("a", 1), completion("b", 2)]}, "instruction"),
        (raw_row("   ", completion("a", 1), completion("b", 2)), "instruction"),
        ({"instruction": "p", "completions": "a, b"}, "completions"),
        (raw_row("p", completion("a", 1), completion("b", "N/A")), "completions[1].overall_score"),
        (raw_row("p", completion("a", 1), {"response": "b"}), "completions[1].overall_score"),
        (raw_row("p", completion("", 1), completion("b", 2)), "completions[0].response"),
    ],
)
def test_unusable_rows_raise_a_data_error_naming_the_field(row, field):
    with pytest.raises(DataError) as e:
        binarize_row(row, random.Random(0))
    assert not isinstance(e.value, TooFewCompletions)
    assert e.value.field == field and e.value.row is None and e.value.file is None


def test_fewer_than_two_completions_raise_too_few():
    for completions in ([], [completion("a", 1)]):
        with pytest.raises(TooFewCompletions):
            binarize_row(raw_row("p", *completions), random.Random(0))


# ---------------------------------------------------------------------------------------------- files


def test_file_report_counts_rows_ties_and_skipped_rows_with_numbers(tmp_path):
    rows = [
        raw_row("p1", completion("a", 8), completion("b", 4)),  # line 1: a > b
        raw_row("p2", completion("a", 8)),  # line 2: one completion
        raw_row("p3", completion("a", 6), completion("b", 6)),  # line 3: a tie, kept
        raw_row("p4"),  # line 4: none
        raw_row("p5", completion("a", 1), completion("b", 2), completion("c", 3)),  # line 5
    ]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    report = binarize_file(source, tmp_path / "out.jsonl")

    assert (report.read, report.written, report.ties) == (5, 3, 1)
    assert report.skipped == {"fewer than two completions": [2, 4]}
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in out] == ["p1", "p3", "p5"]
    rejects = read_jsonl(rejects_path_for(tmp_path / "out.jsonl"))
    assert report.rejects_path == tmp_path / "out.rejects.jsonl"
    assert [(r["row"], r["field"], r["file"]) for r in rejects] == [
        (2, "completions", source),
        (4, "completions", source),
    ]
    assert "skipped 2: fewer than two completions (rows 2, 4)" in report.summary()


def test_same_seed_same_bytes_other_seed_other_draws(tmp_path):
    rows = [
        raw_row(f"p{i}", completion("a", 9), completion("b", 1), completion("c", 2), completion("d", 3))
        for i in range(20)
    ]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    binarize_file(source, tmp_path / "one.jsonl", seed=42)
    binarize_file(source, tmp_path / "two.jsonl", seed=42)
    binarize_file(source, tmp_path / "three.jsonl", seed=43)
    one = (tmp_path / "one.jsonl").read_bytes()
    assert one == (tmp_path / "two.jsonl").read_bytes()
    assert one != (tmp_path / "three.jsonl").read_bytes()  # 20 three-way draws agreeing by chance: (1/3)^20


def test_a_malformed_row_stops_the_run_and_leaves_the_output_alone(tmp_path):
    rows = [
        raw_row("p1", completion("a", 8), completion("b", 4)),
        raw_row("p2", completion("a", 8), {"response": "b"}),
    ]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(DataError) as e:
        binarize_file(source, out)
    assert (e.value.file, e.value.row, e.value.field) == (source, 2, "completions[1].overall_score")
    assert "--skip-invalid" in str(e.value)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_skip_invalid_lists_malformed_rows_beside_the_output(tmp_path):
    rows = [
        raw_row("p1", completion("a", 8), completion("b", 4)),
        raw_row("p2", completion("a", 8), {"response": "b"}),
    ]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    (tmp_path / "raw.jsonl").open("a").write("{not json\n")
    report = binarize_file(source, tmp_path / "out.jsonl", skip_invalid=True)
    assert (report.read, report.written) == (3, 1)
    assert sorted(row for rows in report.skipped.values() for row in rows) == [2, 3]
    assert [r["row"] for r in read_jsonl(report.rejects_path)] == [2, 3]


def test_mean_rule_on_a_file_writes_means(tmp_path):
    rows = [
        raw_row("p", completion("a", 2, ("5", "N/A", "4", "N/A")), completion("b", 9, ("1", "2", "3", "N/A")))
    ]
    report = binarize_file(write_jsonl(tmp_path / "raw.jsonl", rows), tmp_path / "out.jsonl", score="mean")
    (pair,) = read_jsonl(report.output)
    assert (pair["score_chosen"], pair["score_rejected"]) == (4.5, 2.0)
    assert report.rejects_path is None and not rejects_path_for(report.output).exists()
