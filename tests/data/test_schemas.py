from __future__ import annotations

import json
import random

import pytest

from zephyr.data.rejects import Rejects
from zephyr.data.schemas import SCHEMAS, adapt_records, detect_schema, load_split
from zephyr.data.sources import Record
from zephyr.errors import ConfigError, DataError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def adapt(row, schema="auto", kind=None, **kwargs):
    """Adapt one row (file f.jsonl, row 7) and return the internal form without its origin."""
    (out,) = adapt_records(
        [Record("f.jsonl", 7, row, None)], schema=schema, kind=kind, rejects=Rejects(), **kwargs
    )
    assert out.pop("_origin") == "f.jsonl:7"
    return out


def refusal(row, schema="auto", kind=None) -> DataError:
    with pytest.raises(DataError) as info:
        adapt_records([Record("f.jsonl", 7, row, None)], schema=schema, kind=kind, rejects=Rejects())
    return info.value


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- SFT adapters


def test_ultrachat_raw_alternates_from_the_user():
    row = {"id": "0", "data": ["Hi?", " Hello! ", "Bye.", "Bye!\n"]}
    assert adapt(row) == {"messages": [U("Hi?"), A(" Hello! "), U("Bye."), A("Bye!\n")]}


def test_ultrachat_200k_keeps_messages():
    messages = [S("Be brief."), U("2+2?"), A("4")]
    row = {"prompt": "2+2?", "prompt_id": "x", "messages": messages}
    assert detect_schema(row) == "ultrachat_200k"
    assert adapt(row) == {"messages": messages}


def test_messages_drops_extra_message_keys():
    row = {"messages": [{"role": "user", "content": "q", "name": "bob"}, A("a")], "source": "x"}
    assert detect_schema(row) == "messages"
    assert adapt(row) == {"messages": [U("q"), A("a")]}


def test_sharegpt_conversations():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert adapt(row) == {"messages": [S("s"), U("q"), A("a")]}


# ---------------------------------------------------------------- preference adapters


def test_ultrafeedback_binarized_splits_the_prompt_off():
    row = {
        "prompt": "Name a colour.",
        "prompt_id": "abc",
        "chosen": [U("Name a colour."), A("Blue.")],
        "rejected": [U("Name a colour."), A("Seven.")],
        "messages": [U("Name a colour."), A("Blue.")],
        "score_chosen": 9,
        "score_rejected": 2.5,
    }
    assert detect_schema(row) == "ultrafeedback_binarized"
    assert adapt(row) == {
        "prompt": [U("Name a colour.")],
        "chosen": [A("Blue.")],
        "rejected": [A("Seven.")],
        "score_chosen": 9.0,
        "score_rejected": 2.5,
    }


def test_ultrafeedback_binarized_read_as_sft():
    row = {
        "prompt": "q",
        "prompt_id": "x",
        "chosen": [U("q"), A("a")],
        "rejected": [U("q"), A("b")],
        "messages": [U("q"), A("a")],
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    }
    assert adapt(row, kind="sft") == {"messages": [U("q"), A("a")]}


def test_preference_strings():
    row = {"prompt": "q ", "chosen": "good", "rejected": "bad"}
    assert adapt(row) == {
        "prompt": [U("q ")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
        "score_chosen": None,
        "score_rejected": None,
    }


def test_preference_message_lists_completion_only_with_scores():
    row = {
        "prompt": [S("sys"), U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
        "score_chosen": 3,
        "score_rejected": 1,
    }
    assert adapt(row) == {
        "prompt": [S("sys"), U("q")],
        "chosen": [A("good")],
        "rejected": [A("bad")],
        "score_chosen": 3.0,
        "score_rejected": 1.0,
    }


def test_preference_full_conversations_sharing_the_prompt():
    prompt = [U("q1"), A("a1"), U("q2")]
    row = {"prompt": prompt, "chosen": [*prompt, A("good")], "rejected": [*prompt, A("bad")]}
    out = adapt(row)
    assert (out["prompt"], out["chosen"], out["rejected"]) == (prompt, [A("good")], [A("bad")])


def test_preference_implicit_prompt_is_the_shared_prefix():
    # The shared prefix [q1, a1, q2, "same"] is cut back to end with the user turn q2.
    row = {
        "chosen": [U("q1"), A("a1"), U("q2"), A("same"), U("q3"), A("good")],
        "rejected": [U("q1"), A("a1"), U("q2"), A("same"), U("q3'"), A("bad")],
    }
    out = adapt(row, schema="preference")
    assert out["prompt"] == [U("q1"), A("a1"), U("q2")]
    assert out["chosen"] == [A("same"), U("q3"), A("good")]
    assert out["rejected"] == [A("same"), U("q3'"), A("bad")]


def test_preference_string_prompt_with_full_conversations():
    row = {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]}
    out = adapt(row)
    assert (out["prompt"], out["chosen"], out["rejected"]) == ([U("q")], [A("good")], [A("bad")])


def test_ultrafeedback_raw_goes_through_binarize_row(monkeypatch):
    import zephyr.data.ultrafeedback as uf

    seen = []

    def fake_binarize(row, rng, score="overall"):
        seen.append((row["instruction"], rng.random()))
        return {
            "prompt": row["instruction"],
            "chosen": [U(row["instruction"]), A("best")],
            "rejected": [U(row["instruction"]), A("worse")],
            "score_chosen": 5.0,
            "score_rejected": 1.0,
        }

    monkeypatch.setattr(uf, "binarize_row", fake_binarize)
    rows = [{"source": "s", "instruction": f"q{i}", "models": [], "completions": []} for i in range(2)]
    records = [Record("uf.jsonl", i + 1, r, None) for i, r in enumerate(rows)]
    out = adapt_records(records, rejects=Rejects(), seed=3)
    expected_draws = random.Random(3)
    assert seen == [
        ("q0", expected_draws.random()),
        ("q1", expected_draws.random()),
    ]  # one rng, rows in order
    assert out[1] == {
        "prompt": [U("q1")],
        "chosen": [A("best")],
        "rejected": [A("worse")],
        "score_chosen": 5.0,
        "score_rejected": 1.0,
        "_origin": "uf.jsonl:2",
    }


def _completion(text, overall):
    return {
        "model": "m",
        "response": text,
        "annotations": {},
        "overall_score": overall,
        "fine-grained_score": 0,
    }


def test_ultrafeedback_raw_matches_zephyr_data_binarize(tmp_path):
    """Adapting raw rows in memory gives the pairs `zephyr data binarize` writes, with the same seed."""
    from zephyr.data.ultrafeedback import binarize_file

    raw = [
        {
            "source": "s",
            "instruction": f"question {i}",
            "models": ["m"] * 4,
            "completions": [_completion(f"answer {i}.{j}", float((i + j) % 4)) for j in range(4)],
        }
        for i in range(6)
    ]
    raw_path = write_jsonl(tmp_path / "raw.jsonl", raw)
    binarize_file(str(raw_path), tmp_path / "pairs.jsonl", seed=5)
    via_file = load_split(str(tmp_path / "pairs.jsonl"), split="train", rejects=Rejects())
    in_memory = load_split(str(raw_path), split="train", schema="ultrafeedback", rejects=Rejects(), seed=5)
    assert via_file.remove_columns("_origin").to_list() == in_memory.remove_columns("_origin").to_list()


def test_ultrafeedback_raw_rows_without_a_pair_are_set_aside(tmp_path):
    rows = [
        {"source": "s", "instruction": "q1", "models": ["m"], "completions": [_completion("only", 5.0)]},
        {
            "source": "s",
            "instruction": "q2",
            "models": ["m"] * 2,
            "completions": [_completion("a", 5.0), _completion("b", 1.0)],
        },
    ]
    rejects = Rejects()  # no --skip-invalid: still not fatal, as the published recipe skips such rows
    out = load_split(str(write_jsonl(tmp_path / "raw.jsonl", rows)), split="train", rejects=rejects)
    assert len(out) == 1 and out[0]["chosen"] == [A("a")]
    assert [(r["row"], r["field"], r["reason"]) for r in rejects.rows] == [
        (1, "completions", "fewer than two completions")
    ]


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("columns", "kind", "expected"),
    [
        (["id", "data"], None, "ultrachat"),
        (["prompt", "prompt_id", "messages"], None, "ultrachat_200k"),
        (["messages"], "sft", "messages"),
        (["conversations"], None, "sharegpt"),
        (["source", "instruction", "models", "completions"], None, "ultrafeedback"),
        (["prompt", "chosen", "rejected"], None, "preference"),
        (["chosen", "rejected"], "preference", "preference"),
        (
            ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"],
            None,
            "ultrafeedback_binarized",
        ),
        (
            ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"],
            "sft",
            "ultrachat_200k",
        ),
    ],
)
def test_detect_schema(columns, kind, expected):
    assert detect_schema(columns, kind=kind) == expected
    assert SCHEMAS[expected].kind == (kind or SCHEMAS[expected].kind)


def test_detection_failure_lists_the_schemas():
    with pytest.raises(DataError) as info:
        detect_schema(["text"], kind="preference")
    assert str(info.value) == (
        "no preference schema matches the columns text; known schemas: "
        "ultrafeedback_binarized (preference): prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected; "
        "ultrafeedback (preference): instruction, completions; preference (preference): chosen, rejected. "
        "Rename the columns or pass --schema"
    )


def test_detection_failure_names_the_file():
    error = refusal({"text": "hi"})
    assert error.file == "f.jsonl" and error.row is None
    assert error.reason.startswith("no schema matches the columns text; known schemas: ")


def test_explicit_schema_errors():
    with pytest.raises(
        ConfigError, match=r"unknown schema 'ultrachat200k' \(did you mean 'ultrachat_200k'\?\)"
    ):
        adapt({"messages": [U("q"), A("a")]}, schema="ultrachat200k")
    with pytest.raises(
        ConfigError, match="schema 'messages' gives sft rows but this stage needs preference rows"
    ):
        adapt({"messages": [U("q"), A("a")]}, schema="messages", kind="preference")
    with pytest.raises(ConfigError, match="unknown data kind 'dpo'"):
        detect_schema(["messages"], kind="dpo")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"messages": None}, "messages", "missing (the row has no value for it)"),
        ({"messages": "hi"}, "messages", "expected a list of messages, got str"),
        ({"messages": [U("q"), "a"]}, "messages[1]", "expected a message with 'role' and 'content', got str"),
        (
            {"messages": [U("q"), {"role": "bot", "content": "a"}]},
            "messages[1].role",
            "unknown role 'bot'; expected one of system, user, assistant",
        ),
        (
            {"messages": [U("q"), {"role": "assistant", "content": 3}]},
            "messages[1].content",
            "expected a string, got int",
        ),
        (
            {"messages": [U("q"), A(" \n\t")]},
            "messages[1].content",
            "empty content (the string is empty or only whitespace)",
        ),
        (
            {"messages": [U("q"), A("")]},
            "messages[1].content",
            "empty content (the string is empty or only whitespace)",
        ),
        (
            {"messages": [A("a"), U("q")]},
            "messages[0].role",
            "starts with an assistant turn; expected a user turn",
        ),
        (
            {"messages": [U("q"), U("q2"), A("a")]},
            "messages[1].role",
            "two user turns in a row; user and assistant turns must alternate",
        ),
        (
            {"messages": [U("q"), A("a"), U("q2")]},
            "messages[2].role",
            "ends with a user turn; expected it to end with an assistant turn",
        ),
        (
            {"messages": [U("q"), S("s"), A("a")]},
            "messages[1].role",
            "a system message is only allowed as the first message of the prompt",
        ),
        ({"messages": [S("s")]}, "messages", "only a system message; a user turn must follow it"),
        ({"messages": []}, "messages", "no messages (expected at least an assistant turn)"),
        ({"id": "1", "data": ["q", 5]}, "data[1]", "expected a string, got int"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
            "conversations[1].from",
            "two user turns in a row; user and assistant turns must alternate",
        ),
        (
            {"id": "1", "data": ["q", "a", "q2"]},
            "data[2]",
            "ends with a user turn; expected it to end with an assistant turn",
        ),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "rejected",
            "chosen and rejected are identical; a preference pair needs two different responses",
        ),
        (
            {"prompt": "", "chosen": "a", "rejected": "b"},
            "prompt",
            "empty content (the string is empty or only whitespace)",
        ),
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing; string chosen/rejected need a string prompt"),
        (
            {"prompt": "q", "chosen": "a", "rejected": None},
            "rejected",
            "missing (the row has no value for it)",
        ),
        (
            {"prompt": [U("q"), A("a")], "chosen": [A("x")], "rejected": [A("y")]},
            "prompt[1].role",
            "ends with an assistant turn; expected it to end with a user turn",
        ),
        (
            {"prompt": [A("a")], "chosen": [A("x")], "rejected": [A("y")]},
            "prompt[0].role",
            "starts with an assistant turn; expected a user turn",
        ),
        (
            {"prompt": [U("q")], "chosen": [U("other"), A("x")], "rejected": [A("y")]},
            "chosen",
            "neither starts with an assistant turn nor with the prompt's messages",
        ),
        (
            {"chosen": [U("q"), A("x")], "rejected": [U("p"), A("y")]},
            "rejected",
            "chosen and rejected share no prompt (no common turns ending with a user turn)",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"},
            "score_chosen",
            "expected a finite number, got 'high'",
        ),
        (
            {
                "prompt": "q",
                "prompt_id": "x",
                "messages": [],
                "chosen": [U("q"), A("a")],
                "rejected": [U("q2"), A("b")],
                "score_chosen": 1,
                "score_rejected": 0,
            },
            "rejected",
            "does not start with the same prompt turns as 'chosen'",
        ),
        (
            {
                "prompt": "q",
                "prompt_id": "x",
                "messages": [],
                "chosen": [U("q"), A("a")],
                "rejected": [U("q"), A("b")],
                "score_chosen": None,
                "score_rejected": 0,
            },
            "score_chosen",
            "expected a finite number, got None",
        ),
    ],
)
def test_validation_errors_name_file_row_and_field(row, field, reason):
    error = refusal(row)
    assert (error.file, error.row, error.field, error.reason) == ("f.jsonl", 7, field, reason)
    assert str(error) == f"f.jsonl, row 7, field '{field}': {reason}"


def test_skip_invalid_keeps_going_and_writes_rejects(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [
        json.dumps({"messages": [U("q1"), A("a1")]}),
        json.dumps({"messages": [U("q2"), A("")]}),
        '{"messages": [',
        json.dumps({"messages": [U("q4"), U("q4b")]}),
        json.dumps({"messages": [U("q5"), A("")]}),
        json.dumps({"messages": [U("q6"), A("a6")]}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2, field 'messages\[1\].content'"):
        load_split(str(path), split="train", rejects=Rejects())
    rejects = Rejects(skip_invalid=True)
    dataset = load_split(str(path), split="train", kind="sft", rejects=rejects)
    assert dataset.to_list() == [
        {"messages": [U("q1"), A("a1")], "_origin": f"{path}:1"},
        {"messages": [U("q6"), A("a6")], "_origin": f"{path}:6"},
    ]
    assert rejects.reasons() == {
        "empty content (the string is empty or only whitespace)": 2,
        "two user turns in a row; user and assistant turns must alternate": 1,
        "malformed JSON (Expecting value at column 15)": 1,
    }
    written = [
        json.loads(line) for line in rejects.write(tmp_path / "rejects.jsonl").read_text().splitlines()
    ]
    assert [(r["file"], r["row"], r["field"]) for r in written] == [
        (str(path), 2, "messages[1].content"),
        (str(path), 3, None),
        (str(path), 4, "messages[1].role"),
        (str(path), 5, "messages[1].content"),
    ]
    assert written[0]["data"] == {"messages": [U("q2"), A("")]}


def test_all_rows_refused_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q")]}])
    with pytest.raises(
        DataError, match="split 'train' has no usable rows: all 1 rows were refused as invalid"
    ):
        load_split(str(path), split="train", rejects=Rejects(skip_invalid=True))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="split 'train' has no usable rows: it is empty"):
        load_split(str(tmp_path / "empty.jsonl"), split="train", rejects=Rejects())


# ---------------------------------------------------------------- load_split


def test_load_split_preference_features_and_columns(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "note": "x"},
        {"prompt": "q2", "chosen": "c", "rejected": "d", "note": "y", "score_chosen": 2, "score_rejected": 1},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    dataset = load_split(str(path), split="train", kind="preference", rejects=Rejects())
    assert dataset.column_names == [
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
        "_origin",
    ]
    assert dataset["score_chosen"] == [None, 2.0]
    assert dataset.features["score_chosen"].dtype == "float64"
    # `columns` keeps only what is listed, before the schema is chosen; listing an absent column refuses the row.
    with pytest.raises(DataError) as info:
        load_split(
            str(path), split="train", columns=["prompt", "chosen", "rejected", "nope"], rejects=Rejects()
        )
    assert str(info.value) == f"{path}, row 1, field 'nope': missing (it is listed in `columns`)"
    kept = load_split(str(path), split="train", columns=["prompt", "chosen", "rejected"], rejects=Rejects())
    assert kept["score_chosen"] == [None, None]
