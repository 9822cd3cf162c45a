"""UltraChat cleaning: truecasing sentence starts and removing dialogues whose assistant disclaims feelings."""

from __future__ import annotations

import hashlib
import json

import pytest

from zephyr.data.ultrachat import clean_dialogue, clean_ultrachat_file, disclaims_feelings, truecase
from zephyr.errors import DataError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello. how are you?", "Hello. How are you?"),
        ("hello there.", "Hello there."),
        ("Done! that's great? yes. i think so.", "Done! That's great? Yes. I think so."),
        ("First line.\nsecond line.", "First line.\nSecond line."),
        ("It is done. **note**: check it.", "It is done. **Note**: check it."),
        ("Use `ls`. see the manual.", "Use `ls`. See the manual."),
    ],
)
def test_truecase_capitalises_lowercase_sentence_starts(text, expected):
    assert truecase(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Everything is fine. Nothing to fix here!",
        "Fruit, e.g. apples, and vegetables, i.e. roots. Smith et al. showed it.",
        "Visit https://example.com. www.example.com is down. example.com works.",
        "Wait... maybe not. Or… perhaps.",
        "I use an iPhone. iPhone sales grew. npm_install. x2 is a name.",
        '"Stop." she said.',
        "1. apples\n2. bananas",
        "Run this:\n```python\nx = 1. y = 2\nprint(x). done\n```",
        "Call `obj.run(). then` twice.",
        "It costs 3.5 dollars.",
    ],
)
def test_truecase_leaves_code_urls_abbreviations_and_fine_text_alone(text):
    assert truecase(text) == text


def test_truecase_edits_prose_around_code_but_not_inside_it():
    text = "Try this. ```\nfoo. bar\n``` then run it. it works."
    assert truecase(text) == "Try this. ```\nfoo. bar\n``` then run it. It works."


@pytest.mark.parametrize(
    "reply",
    [
        "I do not have emotions, but I can explain them.",
        "As an AI language model, I don't have personal opinions. Paris is the capital.",
        "I don’t have personal beliefs; here are the facts.",
        "as an AI, I do not have feelings.",
        "I cannot feel emotions the way people do.",
        "I have no personal preferences, but many people like tea.",
        "I'm not capable of having emotions.",
        "I am unable to form opinions about this.",
        "I don't have the ability to feel sadness.",
    ],
)
def test_each_disclaimer_pattern_removes_the_dialogue(reply):
    assert disclaims_feelings(reply)
    assert clean_dialogue({"id": "1", "data": ["What is the capital of France?", reply]}) == (
        None,
        {"disclaims_feelings"},
    )


@pytest.mark.parametrize(
    "reply",
    [
        "I don't have time to list them all, but here are three.",
        "I have strong opinions about tea.",
        "I don't have a strong opinion on this.",
        "People who do not have emotions are rare.",
        "Emotions are complex; feelings change.",
    ],
)
def test_near_misses_are_kept(reply):
    cleaned, fired = clean_dialogue({"data": ["Tell me something.", reply]})
    assert not disclaims_feelings(reply)
    assert cleaned is not None and "disclaims_feelings" not in fired


def test_a_disclaimer_in_a_user_turn_does_not_remove_the_dialogue():
    cleaned, fired = clean_dialogue(
        {"data": ["I do not have emotions. Do you?", "Here is how emotions work."]}
    )
    assert cleaned is not None and fired == set()


def test_clean_dialogue_writes_the_ultrachat_200k_schema():
    cleaned, fired = clean_dialogue({"id": "7", "data": ["hi. how are you?", "Fine.", "Good. bye.", "Bye!"]})
    assert fired == {"truecase"}
    assert cleaned == {
        "prompt": "Hi. How are you?",
        "prompt_id": hashlib.sha256(b"Hi. How are you?").hexdigest(),
        "messages": [
            {"role": "user", "content": "Hi. How are you?"},
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "Good. Bye."},
            {"role": "assistant", "content": "Bye!"},
        ],
    }


@pytest.mark.parametrize(
    "row, field",
    [
        ({"id": "1"}, "data"),
        ({"data": ["only a question"]}, "data"),
        ({"data": ["q", "a", "unanswered"]}, "data"),
        ({"data": ["q", ""]}, "data[1]"),
        ({"data": ["q", 3]}, "data[1]"),
    ],
)
def test_malformed_dialogues_raise_naming_the_field(row, field):
    with pytest.raises(DataError) as e:
        clean_dialogue(row)
    assert e.value.field == field


def test_file_report_counts_each_rule_and_writes_atomically(tmp_path):
    rows = [
        {"id": "1", "data": ["What is 2+2?", "It is 4."]},  # kept as is
        {"id": "2", "data": ["what is 3+3? tell me.", "It is 6. easy."]},  # truecased
        {"id": "3", "data": ["Do you like cats?", "As an AI, I don't have personal preferences."]},  # removed
        {"id": "4", "data": ["Unanswered?"]},  # malformed
        {"id": "5", "data": ["Hi.", "hello. nice to meet you."]},  # truecased
    ]
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    out.write_text("previous\n")

    with pytest.raises(DataError) as e:
        clean_ultrachat_file(str(source), out)
    assert (e.value.row, e.value.field) == (4, "data")
    assert out.read_text() == "previous\n"

    report = clean_ultrachat_file(str(source), out, skip_invalid=True)
    assert (report.read, report.written) == (5, 3)
    assert report.changed == {"truecase": [2, 5]}
    assert report.removed == {"disclaims_feelings": [3]}
    assert list(report.skipped.values()) == [[4]]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["prompt"] for w in written] == ["What is 2+2?", "What is 3+3? Tell me.", "Hi."]
    assert written[2]["messages"][1]["content"] == "Hello. Nice to meet you."
    assert [json.loads(line)["row"] for line in report.rejects_path.read_text().splitlines()] == [4]
    summary = report.summary()
    assert "truecase: changed 2 dialogues" in summary and "disclaims_feelings: removed 1 dialogues" in summary
