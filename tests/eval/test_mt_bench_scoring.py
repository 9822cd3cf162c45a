"""MT-Bench's pure parts: which judge prompt, how it is filled, how a rating is read, and how ratings average."""

from __future__ import annotations

import pytest

from zephyr.eval.judge import judge_messages, judge_prompt_name, parse_rating
from zephyr.eval.mt_bench import mt_bench_scores


@pytest.mark.parametrize(
    ("judgment", "rating"),
    [
        ("The answer is fine. Rating: [[8]]", 8.0),
        ("[[8.5]]", 8.5),
        ("Rating: [[10]]", 10.0),
        ("no double brackets, so the fallback: [8]", 8.0),
        ("[[6]] first, then [[9]]: FastChat's re.search keeps the first", 6.0),
        ("a footnote [3] then Rating: [[7]]: [[x]] wins over an earlier [x]", 7.0),
        ("[4] then [5]: the first single-bracket one", 4.0),
        ("Rating: 9 (no brackets)", -1.0),
        ("[[8/10]]", -1.0),
        ("[[A]]", -1.0),
        ("", -1.0),
    ],
)
def test_parse_rating_mirrors_fastchat(judgment, rating):
    assert parse_rating(judgment) == rating


@pytest.mark.parametrize(
    ("category", "turn", "name"),
    [
        ("writing", 1, "single-v1"),
        ("writing", 2, "single-v1-multi-turn"),
        ("math", 1, "single-math-v1"),
        ("reasoning", 2, "single-math-v1-multi-turn"),
        ("coding", 1, "single-math-v1"),
        ("stem", 2, "single-v1-multi-turn"),
    ],
)
def test_judge_prompt_by_category_and_turn(category, turn, name):
    assert judge_prompt_name(category, turn) == name


def test_math_prompt_turn_1_has_the_reference_answer():
    prompt = {"system_prompt": "SYS", "prompt_template": "Q={question}|REF={ref_answer_1}|A={answer}"}
    messages = judge_messages(prompt, ["2+2?", "times 3?"], ["4", "{12}"], ["four", "twelve"], turn=1)
    assert messages == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q=2+2?|REF=four|A=4"},
    ]


def test_multi_turn_math_prompt_has_both_turns_and_both_references():
    prompt = {
        "system_prompt": "SYS",
        "prompt_template": "{question_1}/{ref_answer_1}/{answer_1} + {question_2}/{ref_answer_2}/{answer_2}",
    }
    messages = judge_messages(prompt, ["q1", "q2"], ["a1", "def f(): return {'k': 1}"], ["r1", "r2"], turn=2)
    # Braces inside an answer (code) are text, not format fields.
    assert messages[1]["content"] == "q1/r1/a1 + q2/r2/def f(): return {'k': 1}"


def test_general_multi_turn_prompt_without_reference_and_empty_system_prompt():
    prompt = {"system_prompt": "", "prompt_template": "{question_1}|{answer_1}|{question_2}|{answer_2}"}
    messages = judge_messages(prompt, ["q1", "q2"], ["a1", "a2"], None, turn=2)
    assert messages == [{"role": "user", "content": "q1|a1|q2|a2"}]


def _j(qid, turn, score):
    return {"question_id": qid, "turn": turn, "score": score}


def test_scores_average_like_show_result_and_count_failures():
    questions = [
        {"question_id": 1, "category": "writing", "turns": ["a", "b"]},
        {"question_id": 2, "category": "writing", "turns": ["a", "b"]},
        {"question_id": 3, "category": "math", "turns": ["a", "b"]},
    ]
    judgments = [
        _j(1, 1, 8.0), _j(1, 2, 6.0),
        _j(2, 1, 10.0), _j(2, 2, -1.0),  # failed: counted, not averaged
        _j(3, 1, 3.0), _j(3, 2, 2.0),
        _j(99, 1, 1.0),  # a question not asked this run: ignored
    ]  # fmt: skip
    scores = mt_bench_scores(questions, judgments)
    # turn 1: (8 + 10 + 3) / 3 = 7; turn 2: (6 + 2) / 2 = 4; overall pools the 5 ratings: 29 / 5 = 5.8
    assert scores["turn_1"] == pytest.approx(7.0)
    assert scores["turn_2"] == pytest.approx(4.0)
    assert scores["overall"] == pytest.approx(5.8)
    # writing: (8 + 6 + 10) / 3 = 8; math: (3 + 2) / 2 = 2.5; in MT-Bench's category order
    assert scores["categories"] == pytest.approx({"writing": 8.0, "math": 2.5})
    assert list(scores["categories"]) == ["writing", "math"]
    assert scores["failed_judgments"] == 1


def test_scores_with_no_rating_are_none_not_zero():
    questions = [{"question_id": 1, "category": "stem", "turns": ["a"]}]
    scores = mt_bench_scores(questions, [_j(1, 1, -1.0)])
    assert scores == {
        "overall": None,
        "turn_1": None,
        "turn_2": None,
        "categories": {},
        "failed_judgments": 1,
    }
