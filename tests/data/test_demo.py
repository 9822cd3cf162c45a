"""The demo data generator: layout, determinism, schemas, preference order against `check`, and `check` itself."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zephyr.data import demo
from zephyr.errors import ConfigError, ZephyrError

SMALL = {"n_sft_train": 240, "n_sft_test": 40, "n_pref_train": 240, "n_pref_test": 60}
FILES = [
    "ultrachat/train_sft.jsonl",
    "ultrachat/test_sft.jsonl",
    "ultrafeedback/train_prefs.jsonl",
    "ultrafeedback/test_prefs.jsonl",
]
ASPECTS = {"instruction_following", "honesty", "truthfulness", "helpfulness"}


@functools.cache
def _rows(path: Path) -> list[dict]:
    """Parsed JSONL rows, read once per path (callers must not edit them); every test here writes a fresh folder."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _first_best(completions: list[dict]) -> int:
    """The binarization rule: highest overall_score, the first one on ties."""
    scores = [c["overall_score"] for c in completions]
    return scores.index(max(scores))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The default-size set, generated once: every row of it is checked below."""
    out = tmp_path_factory.mktemp("demo-full")
    demo.generate(out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-small")
    demo.generate(out, **SMALL)
    return out


# ---------------------------------------------------------------------------------------------- files


def test_layout_counts_and_manifest(full):
    expected = {"ultrachat/train_sft.jsonl": 2000, "ultrachat/test_sft.jsonl": 200}
    expected |= {"ultrafeedback/train_prefs.jsonl": 2000, "ultrafeedback/test_prefs.jsonl": 200}
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["version"] == demo.GENERATOR_VERSION
    assert manifest["tasks"] == demo.TASKS
    for relative, n in expected.items():
        data = (full / relative).read_bytes()
        assert data.count(b"\n") == n and data.endswith(b"\n")
        assert manifest["files"][relative] == {"rows": n, "sha256": hashlib.sha256(data).hexdigest()}
    readme = (full / "README.md").read_text()
    assert "seed 0" in readme and "2000 dialogues" in readme and "200 (raw UltraFeedback" in readme


def test_returned_paths(tmp_path):
    paths = demo.generate(tmp_path, n_sft_train=3, n_sft_test=2, n_pref_train=3, n_pref_test=2)
    assert (
        paths["ultrachat"] == tmp_path / "ultrachat" and paths["ultrafeedback"] == tmp_path / "ultrafeedback"
    )
    assert paths["manifest"].is_file() and paths["readme"].is_file()
    assert len(_rows(tmp_path / "ultrafeedback/test_prefs.jsonl")) == 2


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    demo.generate(tmp_path / "again", **SMALL)
    demo.generate(tmp_path / "seed1", seed=1, **SMALL)
    for relative in [*FILES, "manifest.json", "README.md"]:
        assert (tmp_path / "again" / relative).read_bytes() == (small / relative).read_bytes(), relative
    for relative in FILES:
        assert (tmp_path / "seed1" / relative).read_bytes() != (small / relative).read_bytes(), relative


def test_test_files_do_not_depend_on_train_counts(small, tmp_path):
    demo.generate(tmp_path, **{**SMALL, "n_sft_train": 17, "n_pref_train": 5})
    for relative in ("ultrachat/test_sft.jsonl", "ultrafeedback/test_prefs.jsonl"):
        assert (tmp_path / relative).read_bytes() == (small / relative).read_bytes()


@pytest.mark.parametrize(
    "bad", [{"n_pref_train": -1}, {"n_sft_test": 2.5}, {"n_sft_train": True}, {"seed": "x"}]
)
def test_bad_counts_are_config_errors(tmp_path, bad):
    with pytest.raises(ConfigError):
        demo.generate(tmp_path, **bad)


# ---------------------------------------------------------------------------------------------- schemas


def test_ultrachat_rows_have_the_raw_schema(full):
    ids = set()
    turns = 0
    for relative in FILES[:2]:
        for row in _rows(full / relative):
            assert set(row) == {"id", "data"} and isinstance(row["id"], str)
            data = row["data"]
            assert isinstance(data, list) and len(data) >= 2 and len(data) % 2 == 0
            assert all(isinstance(t, str) and t.strip() for t in data)
            ids.add(row["id"])
            turns = max(turns, len(data))
    assert len(ids) == 2200  # ids are unique across both files
    assert turns == 4  # some dialogues are multi-turn


def test_ultrafeedback_rows_have_the_raw_schema(full):
    for relative in FILES[2:]:
        for row in _rows(full / relative):
            assert list(row) == [
                "source",
                "instruction",
                "models",
                "correct_answers",
                "incorrect_answers",
                "completions",
            ]
            assert row["source"].startswith("zephyr-demo/") and row["source"].split("/")[1] in demo.TASKS
            assert len(row["completions"]) == 4 and row["models"] == [c["model"] for c in row["completions"]]
            for c in row["completions"]:
                assert set(c) == {
                    "model", "principle", "custom_system_prompt", "response", "annotations", "critique",
                    "fine-grained_score", "overall_score",
                }  # fmt: skip
                assert isinstance(c["overall_score"], float) and isinstance(c["fine-grained_score"], float)
                assert (
                    isinstance(c["response"], str)
                    and c["response"].strip()
                    and isinstance(c["critique"], str)
                )
                assert set(c["annotations"]) == ASPECTS
                ratings = []
                for aspect, annotation in c["annotations"].items():
                    assert annotation["Rating"] in {"1", "2", "3", "4", "5"} and isinstance(
                        annotation["Rationale"], str
                    )
                    if aspect in ("truthfulness", "helpfulness"):
                        assert isinstance(annotation["Type"], list) and isinstance(
                            annotation["Rationale For Rating"], str
                        )
                    ratings.append(int(annotation["Rating"]))
                assert c["fine-grained_score"] == sum(ratings) / 4


def test_rows_are_short(full):
    """The demo trains with max_length 512; ~4 characters per token keeps every example far below it."""
    longest = 0
    for relative in FILES[:2]:
        longest = max([longest] + [len("".join(r["data"])) for r in _rows(full / relative)])
    for relative in FILES[2:]:
        for r in _rows(full / relative):
            longest = max([longest] + [len(r["instruction"] + c["response"]) for c in r["completions"]])
    assert longest < 600


# ---------------------------------------------------------------------------------------------- preferences vs check


def test_chosen_passes_and_every_other_completion_fails(full):
    tasks, ties = set(), 0
    for relative in FILES[2:]:
        for row in _rows(full / relative):
            prompt, completions = row["instruction"], row["completions"]
            assert demo.task_of(prompt) == row["source"].split("/")[1]
            tasks.add(demo.task_of(prompt))
            best = _first_best(completions)
            assert demo.check(prompt, completions[best]["response"]), prompt
            for i, c in enumerate(completions):
                if i != best:
                    assert not demo.check(prompt, c["response"]), (prompt, c["response"])
            assert len({c["response"] for c in completions}) == 4
            top = completions[best]["overall_score"]
            ties += sum(c["overall_score"] == top for c in completions) > 1
    assert tasks == set(demo.TASKS)
    assert ties == 110  # one row in 20 of 2000 + 200


def test_ties_put_the_passing_completion_first(full):
    for row in _rows(full / FILES[2]):
        scores = [c["overall_score"] for c in row["completions"]]
        tied = [i for i, s in enumerate(scores) if s == max(scores)]
        if len(tied) > 1:
            assert demo.check(row["instruction"], row["completions"][tied[0]]["response"])
            assert not demo.check(row["instruction"], row["completions"][tied[-1]]["response"])


def test_mean_rating_agrees_with_the_check(full):
    """Ranking by the mean aspect rating (`zephyr data binarize --score mean`) also picks the passing completion."""
    for row in _rows(full / FILES[3]):
        completions = row["completions"]
        best = max(range(4), key=lambda i: completions[i]["fine-grained_score"])
        assert demo.check(row["instruction"], completions[best]["response"])


def test_sft_answers_follow_their_checkable_prompts(full):
    seen = set()
    for relative in FILES[:2]:
        for row in _rows(full / relative):
            data = row["data"]
            for user, assistant in zip(data[::2], data[1::2], strict=True):
                if demo.is_checkable(user):
                    seen.add(demo.task_of(user))
                    assert demo.check(user, assistant), (user, assistant)
    assert seen == set(demo.TASKS)


def test_train_and_test_are_disjoint(full):
    def prompts(split: str) -> tuple[set[str], set[tuple[str, ...]]]:
        checkable, dialogues = set(), set()
        for row in _rows(full / f"ultrafeedback/{split}_prefs.jsonl"):
            checkable.add(row["instruction"])
        for row in _rows(full / f"ultrachat/{split}_sft.jsonl"):
            checkable |= {u for u in row["data"][::2] if demo.is_checkable(u)}
            dialogues.add(tuple(row["data"][::2]))
        return checkable, dialogues

    train, test = prompts("train"), prompts("test")
    assert train[0] and test[0]
    assert not train[0] & test[0]
    assert not train[1] & test[1]


def test_preference_prompts_are_distinct(full):
    instructions = [r["instruction"] for f in FILES[2:] for r in _rows(full / f)]
    assert len(set(instructions)) == len(instructions) == 2200


# ---------------------------------------------------------------------------------------------- check by hand

CASES = [
    # arithmetic: 17 + 25 = 42; 30 - 45 = -15; 12 * 99 = 1188
    ("What is 17 + 25? Reply with just the number.", "42", True),
    ("What is 17 + 25? Reply with just the number.", " 42\n", True),
    ("What is 17 + 25? Reply with just the number.", "42.", True),
    ("What is 17 + 25? Reply with just the number.", "41", False),
    ("What is 17 + 25? Reply with just the number.", "The answer is 42.", False),
    ("What is 17 + 25? Reply with just the number.", "17 + 25 = 42", False),
    ("What is 17 + 25? Reply with just the number.", "42..", False),
    ("Compute 30 minus 45. Answer with only the number.", "-15", True),
    ("Compute 30 minus 45. Answer with only the number.", "15", False),
    ("Calculate 45 subtracted from 30. Give only the number, nothing else.", "-15", True),
    ("Reply with just the number. What is the product of 12 and 99?", "1,188", True),
    ("Reply with just the number. What is the product of 12 and 99?", "1188", True),
    ("Reply with just the number. What is the product of 12 and 99?", "11,88", False),
    ("work out 12 × 99 .  respond with just the number", "1188", True),
    # yes_no: 14 is even; 7 < 300
    ("Is 14 even? Reply with just yes or no.", "Yes.", True),
    ("Is 14 even? Reply with just yes or no.", "  yes\n", True),
    ("Is 14 even? Reply with just yes or no.", "YES!", True),
    ("Is 14 even? Reply with just yes or no.", "No.", False),
    ("Is 14 even? Reply with just yes or no.", "Yes, 14 is even.", False),
    ("Is 14 an odd number? Answer only yes or no.", "no", True),
    ("Just say yes or no. Is 7 greater than 300?", "No", True),
    ("Is 7 less than 300? Answer with one word: yes or no.", "Yes.", True),
    ("Is 7 less than 300? Answer with one word: yes or no.", "No.", False),
    # word_count
    ("Describe the ocean in exactly 7 words.", "The ocean is vast, deep, and blue.", True),
    ("Describe the ocean in exactly seven words.", "The ocean is vast, deep, and blue.", True),
    ("Describe the ocean in exactly 7 words.", "The ocean is vast and blue.", False),
    ("Write exactly three words about tea.", "Warm - soothing - green.", True),
    ("Write exactly three words about tea.", "Well-known, soothing, green.", True),
    ("Use exactly 4 words to describe a cat.", "A cat is soft and curious.", False),
    # list_items
    ("List 3 fruits as a numbered list.", "1. Apple\n2. Pear\n3. Plum", True),
    ("List 3 fruits as a numbered list.", "Here are 3 fruits:\n\n1) Apple\n2) Pear\n3) Plum\n", True),
    ("List 3 fruits as a numbered list.", "1. Apple\n2. Pear", False),
    ("List 3 fruits as a numbered list.", "1. Apple\n3. Pear\n2. Plum", False),
    ("List 3 fruits as a numbered list.", "- Apple\n- Pear\n- Plum", False),
    ("List 3 fruits as a numbered list.", "1. Apple 2. Pear 3. Plum", False),
    ("List 3 fruits as a numbered list.", "1. Apple\nand also\n2. Pear\n3. Plum", False),
    ("Give me a bulleted list of two colors.", "* Red\n• Blue", True),
    ("Give me a bulleted list of two colors.", "Sure:\n- Red\n- Blue\nEnjoy!", True),
    ("Give me a bulleted list of two colors.", "-Red\n-Blue", False),
    # json_key
    ('Answer in JSON with a single key "capital": What is the capital of Peru?', '{"capital": "Lima"}', True),
    (
        'Answer in JSON with a single key "capital": What is the capital of Peru?',
        ' {"capital":"Lima"}\n',
        True,
    ),
    ('What is 2 plus 3? Reply with a JSON object whose only key is "sum".', '{"sum": 5}', True),
    ('What is 2 plus 3? Reply with a JSON object whose only key is "sum".', '{"sum": true}', False),
    (
        'Answer in JSON with a single key "capital": What is the capital of Peru?',
        '{"Capital": "Lima"}',
        False,
    ),
    ('Answer in JSON with a single key "capital": What is the capital of Peru?', '{"capital": " "}', False),
    (
        'Answer in JSON with a single key "capital": What is the capital of Peru?',
        "{'capital': 'Lima'}",
        False,
    ),
    (
        'Answer in JSON with a single key "capital": What is the capital of Peru?',
        '{"capital": "Lima", "x": 1}',
        False,
    ),
    (
        'Answer in JSON with a single key "capital": What is the capital of Peru?',
        '```json\n{"capital": "Lima"}\n```',
        False,
    ),
    ('Answer in JSON with a single key "capital": What is the capital of Peru?', '["Lima"]', False),
    # quotes
    ("Answer inside double quotes: What color is snow?", '"Snow is usually white."', True),
    ("Answer inside double quotes: What color is snow?", "  “Snow is usually white.”\n", True),
    ("Answer inside double quotes: What color is snow?", "Snow is usually white.", False),
    ("Answer inside double quotes: What color is snow?", "'Snow is usually white.'", False),
    ("Answer inside double quotes: What color is snow?", '"Snow" is usually "white"', False),
    ("Answer inside double quotes: What color is snow?", '"Snow is usually white.".', False),
    ("Answer inside double quotes: What color is snow?", '""', False),
    # end_word
    ('End your answer with the word "luck". Give me one tip for running.', "Start slowly. Good luck.", True),
    (
        'End your answer with the word "luck". Give me one tip for running.',
        "Start slowly. Good LUCK!\n",
        True,
    ),
    ('End your answer with the word "luck". Give me one tip for running.', 'Start slowly. Good "luck"', True),
    ('End your answer with the word "luck". Give me one tip for running.', "Good luck. Start slowly.", False),
    (
        'End your answer with the word "luck". Give me one tip for running.',
        "Start slowly. Good luck :)",
        True,
    ),
    ('End your answer with the word "luck". Give me one tip for running.', "Start slowly. Plucky.", False),
    # letter_case
    ("Answer in all capital letters: What is the capital of Peru?", "THE CAPITAL OF PERU IS LIMA.", True),
    ("Answer in all capital letters: What is the capital of Peru?", "The capital of Peru is Lima.", False),
    ("Answer in all capital letters: What is the capital of Peru?", "THE CAPITAL OF PERU IS LIMa.", False),
    ("Answer in all capital letters: What is the capital of Peru?", "42!", False),
    ("What is 2 plus 3? Write your answer in lowercase letters only.", "adding 2 and 3 gives 5.", True),
    ("What is 2 plus 3? Write your answer in lowercase letters only.", "Adding 2 and 3 gives 5.", False),
    ("Reply using only uppercase letters. What is 2 plus 3?", "ADDING 2 AND 3 GIVES 5.", True),
]


@pytest.mark.parametrize(("prompt", "answer", "expected"), CASES)
def test_check_by_hand(prompt, answer, expected):
    assert demo.check(prompt, answer) is expected


@pytest.mark.parametrize(
    "prompt",
    [
        "What is the capital of Peru?",
        "What is 17 + 25?",  # no "just the number": the reply's form is free
        "Tell me a joke.",
        "",
        "What is seventeen plus x? Reply with just the number.",
    ],
)
def test_unknown_prompts_raise(prompt):
    assert not demo.is_checkable(prompt)
    with pytest.raises(ValueError, match="not a demo prompt"):
        demo.check(prompt, "42")


def test_every_task_has_a_hand_case():
    assert {demo.task_of(p) for p, _, _ in CASES} == set(demo.TASKS)


def test_running_out_of_distinct_prompts_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        demo, "_FACTS", demo._FACTS[:1]
    )  # 3 quotes prompts, at most, can be made from one fact
    with pytest.raises(ZephyrError, match="ran out of distinct quotes prompts; ask for fewer rows"):
        demo.generate(tmp_path, n_sft_train=0, n_sft_test=0, n_pref_train=0, n_pref_test=40)


def test_sft_dialogues_survive_the_ultrachat_cleaning(full):
    """`zephyr data clean-ultrachat` truecases turns and drops feelings disclaimers: the demo SFT set is left as is."""
    ultrachat = pytest.importorskip("zephyr.data.ultrachat")
    for row in _rows(full / FILES[0]):
        cleaned, fired = ultrachat.clean_dialogue(row)
        assert not fired and [m["content"] for m in cleaned["messages"]] == row["data"], row


def test_same_bytes_in_a_fresh_process_with_another_hash_seed(small, tmp_path):
    """Nothing depends on set or dict order that varies between interpreter runs."""
    code = f"from zephyr.data import demo; demo.generate({str(tmp_path)!r}, **{SMALL!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    for relative in [*FILES, "manifest.json"]:
        assert (tmp_path / relative).read_bytes() == (small / relative).read_bytes(), relative
