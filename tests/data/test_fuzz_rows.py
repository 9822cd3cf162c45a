"""Malformed rows, fuzzed: every row the data adapters or the tokenizer see is either used or refused with its row
number and reason, never a raw exception, and never lost (rows in == rows kept + rows refused).

Rows are near-misses of each schema: a key dropped or added, a value swapped for junk (None, booleans, numbers where
strings belong, integers too large for a float, dicts in lists in dicts), odd strings (empty, whitespace, NUL, RTL
and zero-width marks, emoji, 20k characters, template syntax). Files add lines that are not UTF-8, not JSON, not
objects, cut off, nested thousands deep, numbers past Python's 4300-digit limit, and JSON escapes of lone UTF-16
surrogates. Hypothesis runs derandomized, so CI sees the same examples every time.

The oracle for "refused with its row number" compares two runs: with skip_invalid every refused row is listed; without
it the run must stop with a `DataError` at the first row the lenient run refused (rows the published recipe sets aside
are set aside in both), with the same reason and field, having kept nothing else back.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from functools import lru_cache
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tiny import tiny_tokenizer
from zephyr.data.prepare import prepare
from zephyr.data.rejects import Rejects
from zephyr.data.schemas import SCHEMAS, adapt_records, load_split
from zephyr.data.sources import Record, iter_records
from zephyr.data.templates import apply_chat_template_setting
from zephyr.data.tokenize import IGNORE_INDEX, tokenize_preferences, tokenize_sft
from zephyr.data.ultrachat import clean_dialogue, clean_ultrachat_file
from zephyr.data.ultrafeedback import SCORE_RULES, binarize_file, binarize_row
from zephyr.errors import DataError
from zephyr.recipe import load_config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Examples that write files: fewer. Those that also tokenize: fewer still. A test's examples share its fixtures, each
# making its own folder under them.
FUZZ_FILES = settings(
    FUZZ,
    max_examples=75,
    suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.function_scoped_fixture],
)
FUZZ_TOKENIZE = settings(FUZZ_FILES, max_examples=15)

ORIGIN = "fuzz.jsonl"

# ---------------------------------------------------------------------------------------------- strategies

# What sources can yield: no lone surrogates (a JSON escape of one is refused when the file is read; tested below).
ODD_STRINGS = [
    "\x00", "a\x00b", "\u200b", "\u200f\u202eevil\u202c", "\ufeff", "😀👩‍👩‍👧", "e\u0301", "\U0010ffff",
    "<|im_start|>user", "</s>", "<|assistant|>", "{{ raise_exception('x') }}", "{% endfor %}", "\r\n.",
    "x" * 20_000, "مرحبا", "ok", "Hello?", "Hi!",
]  # fmt: skip
BLANK_STRINGS = ["", " ", "\t\n ", "\u3000"]


def _not_blank(text: str) -> str:
    return text if text.strip() else f"{text}."


CONTENT = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=20).map(_not_blank))
TEXT = st.one_of(CONTENT, st.sampled_from(BLANK_STRINGS))
ROLE_NAMES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "USER"])

FIELD_NAMES = [
    "id", "data", "messages", "conversations", "prompt", "prompt_id", "chosen", "rejected", "score_chosen",
    "score_rejected", "instruction", "completions", "role", "content", "from", "value", "response",
    "overall_score", "annotations", "Rating",
]  # fmt: skip
HUGE = 10**400  # JSON puts no limit on digits; float() of this overflows
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([HUGE, -HUGE]), st.floats(), TEXT),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELD_NAMES) | TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)
# Numbers a score may not be, and strings that are almost numbers.
ODD_NUMBERS = st.sampled_from([HUGE, -HUGE, math.nan, math.inf, -math.inf, "1e999", "N/A", "", True, None])
# A score is an odd number one time in four: it is the field most likely to hold one.
SCORES = st.one_of(
    st.integers(-10, 10),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["7", "4.5"]),
    ODD_NUMBERS,
)


def _paths(value, path=()):
    """Every position inside VALUE, as a tuple of keys and indices."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


@st.composite
def mutated(draw, row_strategy):
    """A well-formed row of ROW_STRATEGY, left alone a third of the time, else with one or two positions at any depth
    dropped, replaced by junk, by an odd number or by another string (a blank one, a role name), or given an extra
    key."""
    row = draw(row_strategy)
    for _ in range(draw(st.sampled_from([0, 1, 2]))):
        paths = [path for path in _paths(row) if path]
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        parent = row
        for key in parents:
            parent = parent[key]
        action = draw(st.sampled_from(["junk", "number", "string", "drop", "add"]))
        if action == "drop":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES) | TEXT)] = draw(JUNK)
        elif action == "string":
            parent[last] = draw(TEXT | ROLE_NAMES)
        elif action == "number":
            parent[last] = draw(ODD_NUMBERS)
        else:
            parent[last] = draw(JUNK)
    return row


@st.composite
def dialogue(draw, role_key="role", content_key="content", speakers=("user", "assistant"), system="system"):
    """Alternating turns from SPEAKERS[0] to SPEAKERS[1], sometimes after a system turn."""
    turns = draw(st.integers(1, 3))
    roles = [system] if system and draw(st.booleans()) else []
    roles += [speakers[i % 2] for i in range(2 * turns)]
    return [{role_key: role, content_key: draw(CONTENT)} for role in roles]


@st.composite
def distinct(draw, n: int):
    """N different contents."""
    return draw(st.lists(CONTENT, min_size=n, max_size=n, unique=True))


@st.composite
def preference_row(draw):
    """One of the generic preference layouts: strings; completion-only message lists (with scores or not); full
    conversations sharing the prompt, with no prompt column."""
    prompt, chosen, rejected = draw(distinct(3))
    layout = draw(st.sampled_from(["strings", "messages", "conversations"]))
    if layout == "strings":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    shared = [{"role": "user", "content": prompt}]
    if layout == "messages":
        row = {"prompt": shared, "chosen": [{"role": "assistant", "content": chosen}]}
        row["rejected"] = [{"role": "assistant", "content": rejected}]
        if draw(st.booleans()):
            row["score_chosen"], row["score_rejected"] = draw(SCORES), draw(SCORES)
        return row
    return {
        "chosen": [*shared, {"role": "assistant", "content": chosen}],
        "rejected": [dict(shared[0]), {"role": "assistant", "content": rejected}],
    }


@st.composite
def unpaired_row(draw):
    """KTO's prompt/completion/label row, as strings or message lists."""
    prompt, completion = draw(CONTENT), draw(CONTENT)
    row = {"prompt": prompt, "completion": completion, "label": draw(st.booleans())}
    if draw(st.booleans()):
        row["prompt"] = [{"role": "user", "content": prompt}]
        row["completion"] = [{"role": "assistant", "content": completion}]
    return row


@st.composite
def binarized_row(draw):
    """An ultrafeedback_binarized row: chosen/rejected are [user, assistant] with the same prompt."""
    prompt, chosen, rejected = draw(distinct(3))

    def pair(response):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    return {
        "prompt": prompt,
        "prompt_id": "0" * 64,
        "chosen": pair(chosen),
        "rejected": pair(rejected),
        "messages": pair(chosen),
        "score_chosen": draw(SCORES),
        "score_rejected": draw(SCORES),
    }


ASPECTS = ["instruction_following", "honesty", "truthfulness", "helpfulness"]
RATINGS = st.sampled_from(["1", "3", "5", "N/A", "n/a ", 4]) | ODD_NUMBERS


@st.composite
def raw_ultrafeedback_row(draw):
    """An openbmb/UltraFeedback row: an instruction and completions rated overall and by aspect."""
    # One completion, or all repeating the best one, makes no pair: the recipe sets such rows aside.
    responses = draw(st.lists(CONTENT, min_size=1, max_size=4))
    completions = [
        {
            "response": response,
            "overall_score": draw(SCORES),
            "annotations": {aspect: {"Rating": draw(RATINGS)} for aspect in ASPECTS},
        }
        for response in responses
    ]
    return {"instruction": draw(CONTENT), "completions": completions}


def _ultrachat(turns: list[dict]) -> dict:
    return {"id": "0", "data": [turn["content"] for turn in turns]}


def _ultrachat_200k(messages: list[dict]) -> dict:
    return {"prompt": messages[-2]["content"], "prompt_id": "0", "messages": messages}


ROWS = {
    "ultrachat": dialogue(system=None).map(_ultrachat),
    "ultrachat_200k": dialogue().map(_ultrachat_200k),
    "messages": st.fixed_dictionaries({"messages": dialogue()}),
    "sharegpt": st.fixed_dictionaries({"conversations": dialogue("from", "value", ("human", "gpt"))}),
    "preference": preference_row(),
    "unpaired": unpaired_row(),
    "ultrafeedback_binarized": binarized_row(),
    "ultrafeedback": raw_ultrafeedback_row(),
}
assert set(ROWS) == set(SCHEMAS), "a schema was added: give it a row strategy here"


def rows_for(schema: str):
    return mutated(ROWS[schema] if schema in ROWS else st.one_of(*ROWS.values()))


# Lines that cannot be read as a row, with the start of the reason each must be refused with.
BAD_LINES = {
    b"\xff\xfe not UTF-8 \x80": "invalid UTF-8",
    b'{"data": ["caf\xe9", "ok"]}': "invalid UTF-8",  # latin-1
    b"{not json": "malformed JSON",
    b'{"data": ["a", "b"]': "malformed JSON",
    b"[1, 2]": "expected a JSON object",
    b'"a string"': "expected a JSON object",
    b"null": "expected a JSON object",
    b"42": "expected a JSON object",
    b'{"n": ' + b"9" * 5000 + b"}": "malformed JSON",  # past Python's 4300-digit limit for int()
    b"[" * 100_000: "malformed JSON",  # deeper than the parser can recurse
    b'{"data": ["\\ud800", "ok"]}': "holds a lone surrogate",
    b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}': "holds a lone surrogate",
}
CUT_OFF = {b"{not json", b'{"data": ["a", "b"]'}
UNREADABLE = (*set(BAD_LINES.values()), "the last line is cut off")
BLANK_LINES = [b"", b"   ", b"\t"]


@st.composite
def jsonl_file(draw, schema: str):
    """(bytes of a JSONL file, the 1-based numbers of its non-blank lines, {line: reason start} for the bad ones)."""
    lines, rows, bad = [], [], {}
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["row", "row", "row", "surrogate pair", "bad", "blank"]))
        if kind == "blank":
            lines.append(draw(st.sampled_from(BLANK_LINES)))
            continue
        number = len(lines) + 1
        if kind == "bad":
            line = draw(st.sampled_from(sorted(BAD_LINES)))
            bad[number] = BAD_LINES[line]
        elif kind == "surrogate pair":  # an escaped pair is one character (U+1F600), not a lone surrogate
            line = b'{"data": ["\\ud83d\\ude00", "\\ud83d\\ude00!"], "messages": [], "conversations": []}'
        else:
            line = json.dumps(draw(rows_for(schema)), ensure_ascii=draw(st.booleans())).encode("utf-8")
        lines.append(line)
        rows.append(number)
    content = b"\n".join(lines)
    if draw(st.booleans()):
        content += b"\n"
    elif lines[-1] in CUT_OFF:  # a last line that ends early, with no newline, reads as a truncated file
        bad[len(lines)] = "the last line is cut off"
    return content, rows, bad


# ---------------------------------------------------------------------------------------------- oracles


def assert_internal_form(row: dict) -> None:
    """ROW is what training expects: contents non-empty strings, roles in order (schemas.py's docstring)."""
    assert isinstance(row.pop("_origin"), str)

    def roles(messages):
        for m in messages:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip()
        return [m["role"] for m in messages]

    if set(row) == {"messages"}:
        turns = roles(row["messages"])
        turns = turns[1:] if turns[:1] == ["system"] else turns
        assert turns and turns == ["user", "assistant"] * (len(turns) // 2)
        return
    unpaired = set(row) == {"prompt", "completion", "label"}
    assert unpaired or set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    prompt = roles(row["prompt"])
    prompt = prompt[1:] if prompt[:1] == ["system"] else prompt
    assert prompt and prompt == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
    if unpaired:
        completion = roles(row["completion"])
        assert completion and completion == ["assistant", "user"] * (len(completion) // 2) + ["assistant"]
        assert type(row["label"]) is bool
        return
    for side in ("chosen", "rejected"):
        completion = roles(row[side])
        assert completion and completion == ["assistant", "user"] * (len(completion) // 2) + ["assistant"]
    assert row["chosen"] != row["rejected"]
    for score in (row["score_chosen"], row["score_rejected"]):
        assert score is None or (type(score) is float and math.isfinite(score))


def outcome(kept, refused) -> str:
    """A label for `--hypothesis-show-statistics`: the fuzz must reach rows kept and rows refused alike."""
    return f"kept {'some' if len(kept) else 'none'}, refused {'some' if len(refused) else 'none'}"


def assert_refusals_located(rejects: Rejects, file: str, rows: list[int]) -> None:
    for r in rejects.rows:
        assert r["file"] == file and r["row"] in rows
        assert isinstance(r["reason"], str) and r["reason"].strip()
    numbers = [r["row"] for r in rejects.rows]
    assert len(numbers) == len(set(numbers)), "a row was refused twice"


def assert_strict_run_stops_at_the_first_refusal(strict_run, lenient: Rejects, kept) -> None:
    """STRICT_RUN(rejects) (skip_invalid off) either keeps what the lenient run kept, having set aside the same
    recipe skips, or raises a DataError at the first row the lenient run refused for a reason it may not skip."""
    strict = Rejects(skip_invalid=False)
    try:
        strict_kept = strict_run(strict)
    except DataError as err:
        assert err.row is not None, f"no row number in: {err}"
        set_aside = strict.rows
        first_fatal = lenient.rows[len(set_aside)]
        assert set_aside == lenient.rows[: len(set_aside)]
        assert (err.file, err.row, err.field) == (
            first_fatal["file"],
            first_fatal["row"],
            first_fatal["field"],
        )
        assert err.reason.startswith(first_fatal["reason"])
    else:
        assert strict.rows == lenient.rows
        assert strict_kept == kept


# ---------------------------------------------------------------------------------------------- adapters, in memory


@FUZZ
@given(schema=st.sampled_from([*SCHEMAS, "auto"]), data=st.data())
def test_every_row_is_adapted_or_refused_with_its_row_number(schema, data):
    rows = data.draw(st.lists(rows_for(schema), min_size=1, max_size=6))
    records = [Record(ORIGIN, number, row, None) for number, row in enumerate(rows, start=1)]
    numbers = list(range(1, len(rows) + 1))
    lenient = Rejects(skip_invalid=True)
    try:
        kept = adapt_records(records, schema=schema, rejects=lenient)
    except DataError as err:
        # The one stop that skip_invalid does not turn into a refusal: no schema fits the first row's columns.
        assert schema == "auto" and (err.file, err.row) == (ORIGIN, None)
        assert err.reason.startswith("no schema matches the columns")
        assert not any(set(s.columns) <= set(rows[0]) for s in SCHEMAS.values())
        return

    event(outcome(kept, lenient))
    assert len(kept) + len(lenient) == len(rows)
    assert_refusals_located(lenient, ORIGIN, numbers)
    kept_numbers = [int(row["_origin"].rpartition(":")[2]) for row in kept]
    assert sorted(kept_numbers + [r["row"] for r in lenient.rows]) == numbers
    assert_strict_run_stops_at_the_first_refusal(
        lambda rejects: adapt_records(records, schema=schema, rejects=rejects), lenient, kept
    )
    for row in kept:
        assert_internal_form(row)


@FUZZ
@given(row=mutated(ROWS["ultrafeedback"]), score=st.sampled_from(SCORE_RULES))
def test_binarize_row_makes_a_pair_or_names_the_field(row, score):
    try:
        pair = binarize_row(row, random.Random(0), score)
    except DataError as err:
        assert err.reason.strip() and err.row is None  # binarize_file locates it
        return
    chosen, rejected = pair["chosen"][1]["content"], pair["rejected"][1]["content"]
    assert chosen != rejected and chosen.strip() and rejected.strip()
    assert all(math.isfinite(pair[k]) for k in ("score_chosen", "score_rejected"))
    json.dumps(pair, ensure_ascii=False).encode("utf-8")  # writable as a JSONL line


@FUZZ
@given(row=mutated(ROWS["ultrachat"]))
def test_clean_dialogue_cleans_removes_or_names_the_field(row):
    try:
        cleaned, fired = clean_dialogue(row)
    except DataError as err:
        assert err.reason.strip() and err.row is None
        return
    assert fired <= {"truecase", "disclaims_feelings"}
    if cleaned is not None:
        assert len(cleaned["messages"]) == len(row["data"])
        json.dumps(cleaned, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- files


def read_rows(rejects_file: Path | None) -> list[int]:
    """The row numbers a rejects file lists, sorted; [] when there is no file."""
    if rejects_file is None or not rejects_file.exists():
        return []
    # bytes.splitlines: str.splitlines would also split at U+0085 and U+2028, which JSON strings may hold as they are
    return sorted(json.loads(line)["row"] for line in rejects_file.read_bytes().splitlines())


def write(folder: Path, name: str, content: bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=folder)) / name
    path.write_bytes(content)
    return path


@FUZZ_FILES
@given(schema=st.sampled_from([*SCHEMAS, "auto"]), data=st.data())
def test_every_line_of_a_jsonl_file_is_loaded_or_refused(schema, data, tmp_path_factory):
    content, rows, bad = data.draw(jsonl_file(schema))
    path = write(tmp_path_factory.getbasetemp(), "rows.jsonl", content)
    file = str(path)
    kind = SCHEMAS[schema].kind if schema in SCHEMAS else None

    def load(rejects):
        return load_split(file, split="train", schema=schema, kind=kind, rejects=rejects).to_list()

    lenient = Rejects(skip_invalid=True)
    try:
        kept = load(lenient)
    except DataError as err:
        assert err.file == file and err.row is None
        if err.reason.startswith("no schema matches the columns"):
            assert schema == "auto"
            return
        # Nothing usable: every row is listed with its reason.
        assert err.reason.startswith("split 'train' has no usable rows")
        assert sorted(r["row"] for r in lenient.rows) == rows
        kept = []
    event(outcome(kept, lenient))
    assert len(kept) + len(lenient) == len(rows)
    assert_refusals_located(lenient, file, rows)
    refused = {r["row"]: r["reason"] for r in lenient.rows}
    for number, reason in bad.items():
        assert refused[number].startswith(reason), (number, refused[number])
    for number in set(rows) - set(bad):  # a readable row (emoji escaped as surrogate pairs included) is read
        assert not refused.get(number, "").startswith(UNREADABLE), (number, refused[number])
    if kept:
        assert_strict_run_stops_at_the_first_refusal(load, lenient, kept)
    for row in kept:
        assert_internal_form(row)


@pytest.mark.parametrize(("line", "reason"), sorted(BAD_LINES.items()))
def test_each_unreadable_line_is_one_refused_row(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"data": ["Hi?", "Hello!"]}\n' + line + b'\n{"data": ["Bye?", "Bye!"]}\n')
    records = list(iter_records(str(path)))
    assert [(r.row, r.data is None) for r in records] == [(1, False), (2, True), (3, False)]
    error = records[1].error
    assert (error.file, error.row) == (str(path), 2) and error.reason.startswith(reason)
    str(error).encode("utf-8")  # the CLI can print it


def test_a_lone_surrogate_names_its_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "\\udc00"}]}\n'
    )
    (record,) = iter_records(str(path))
    assert record.error.field == "messages[1].content"


@pytest.mark.parametrize("content", [b'[{"n": ' + b"9" * 5000 + b"}]", b"[" * 100_000 + b"]" * 100_000])
def test_a_json_array_past_the_parsers_limits_is_refused_by_file(tmp_path, content):
    path = tmp_path / "rows.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"^.*rows\.json: malformed JSON \(") as info:
        list(iter_records(str(path)))
    assert info.value.file == str(path)


def test_a_lone_surrogate_in_a_json_array_is_one_refused_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[{"data": ["Hi?", "Hello!"]}, {"data": ["ok", "\\ud800"]}]')
    rejects = Rejects(skip_invalid=True)
    assert len(adapt_records(iter_records(str(path)), schema="ultrachat", rejects=rejects)) == 1
    assert [(r["row"], r["field"]) for r in rejects.rows] == [(2, "data[1]")]
    assert rejects.rows[0]["reason"].startswith("holds a lone surrogate")


@FUZZ_FILES
@given(data=st.data(), skip_invalid=st.booleans())
def test_binarize_file_writes_or_lists_every_row(data, skip_invalid, tmp_path_factory):
    content, rows, bad = data.draw(jsonl_file("ultrafeedback"))
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    source = folder / "raw.jsonl"
    source.write_bytes(content)
    output = folder / "out.jsonl"
    try:
        report = binarize_file(str(source), output, skip_invalid=skip_invalid)
    except DataError as err:
        assert not output.exists()
        assert err.file == str(source)
        assert err.row in rows or (err.row is None and not rows)
        assert not skip_invalid or not rows
        assert not bad or err.row <= min(bad)  # an unreadable line stops the run where it is
        return
    listed = read_rows(report.rejects_path)
    assert set(bad) <= set(listed)
    assert report.read == len(rows) == report.written + len(listed)
    assert sorted(listed) == sorted(n for numbers in report.skipped.values() for n in numbers)
    assert len(output.read_bytes().splitlines()) == report.written


@FUZZ_FILES
@given(data=st.data(), skip_invalid=st.booleans())
def test_clean_ultrachat_file_writes_removes_or_lists_every_row(data, skip_invalid, tmp_path_factory):
    content, rows, bad = data.draw(jsonl_file("ultrachat"))
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    source = folder / "raw.jsonl"
    source.write_bytes(content)
    output = folder / "out.jsonl"
    try:
        report = clean_ultrachat_file(str(source), output, skip_invalid=skip_invalid)
    except DataError as err:
        assert not output.exists()
        assert err.file == str(source)
        assert err.row in rows or (err.row is None and not rows)
        assert not skip_invalid or not rows
        assert not bad or err.row <= min(bad)  # an unreadable line stops the run where it is
        return
    removed = report.removed.get("disclaims_feelings", [])
    skipped = sorted(n for ns in report.skipped.values() for n in ns)
    assert report.read == len(rows) == report.written + len(removed) + len(skipped)
    assert sorted(removed + skipped) == sorted(set(removed + skipped))
    assert read_rows(report.rejects_path) == skipped
    assert set(bad) <= set(skipped)


# ---------------------------------------------------------------------------------------------- tokenization


@lru_cache(maxsize=2)
def tokenizer(template: str):
    """The tiny byte-level tokenizer with its ChatML template (no generation markers: assistant spans are found by
    rendering prefixes) or the Zephyr template (with markers)."""
    tok = tiny_tokenizer()
    return tok if template == "chatml" else apply_chat_template_setting(tok, "zephyr")


@st.composite
def sft_example(draw):
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [
            {"role": "user", "content": draw(CONTENT)},
            {"role": "assistant", "content": draw(CONTENT)},
        ]
    return {"messages": messages}


@st.composite
def preference_example(draw):
    prompt = [{"role": "user", "content": draw(CONTENT)}]
    chosen, rejected = draw(distinct(2))  # the adapters refuse identical pairs
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "score_chosen": None,
        "score_rejected": None,
    }


@FUZZ_TOKENIZE
@given(
    stage=st.sampled_from(["sft", "dpo"]),
    template=st.sampled_from(["chatml", "zephyr"]),
    max_length=st.none() | st.integers(1, 48),
    option=st.booleans(),
    data=st.data(),
)
def test_tokenization_keeps_or_refuses_every_row(stage, template, max_length, option, data, tmp_path_factory):
    rows = data.draw(
        st.lists(sft_example() if stage == "sft" else preference_example(), min_size=1, max_size=4)
    )
    for number, row in enumerate(rows, start=1):
        row["_origin"] = f"{ORIGIN}:{number}"
    numbers = list(range(1, len(rows) + 1))
    dataset = datasets.Dataset.from_list(rows)
    tok = tokenizer(template)
    cache_dir = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())

    def tokenize(rejects):
        if stage == "sft":
            out = tokenize_sft(
                dataset,
                tok,
                max_length=max_length,
                assistant_only_loss=option,
                rejects=rejects,
                cache_dir=cache_dir,
            )
        else:
            out = tokenize_preferences(
                dataset,
                tok,
                max_length=max_length,
                max_prompt_length=None,
                truncation_mode="keep_start" if option else "keep_end",
                rejects=rejects,
                cache_dir=cache_dir,
            )
        return out.to_list()

    lenient = Rejects(skip_invalid=True)
    kept = tokenize(lenient)
    event(outcome(kept, lenient))
    assert len(kept) + len(lenient) == len(rows)
    assert_refusals_located(lenient, ORIGIN, numbers)
    kept_numbers = [int(row["_origin"].rpartition(":")[2]) for row in kept]
    assert sorted(kept_numbers + [r["row"] for r in lenient.rows]) == numbers
    for row in kept:
        if stage == "sft":
            assert max_length is None or len(row["input_ids"]) <= max_length
            assert any(label != IGNORE_INDEX for label in row["labels"])
        else:
            assert row["chosen_input_ids"] and row["rejected_input_ids"]
    # The second, strict run reads the cache the first one wrote, so this also checks that refusals are replayed.
    assert_strict_run_stops_at_the_first_refusal(tokenize, lenient, kept)


# ---------------------------------------------------------------------------------------------- prepare, end to end


PREPARE_SCHEMAS = {"sft": ["ultrachat", "messages", "sharegpt"], "dpo": ["ultrafeedback", "preference"]}


@settings(FUZZ_TOKENIZE, max_examples=8)
@given(stage=st.sampled_from(["sft", "dpo"]), skip_invalid=st.booleans(), data=st.data())
def test_prepare_tokenizes_or_lists_every_row(stage, skip_invalid, data, tmp_path_factory, monkeypatch):
    schema = data.draw(st.sampled_from(PREPARE_SCHEMAS[stage]))
    content, rows, bad = data.draw(jsonl_file(schema))
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    monkeypatch.setenv("ZEPHYR_CACHE", str(folder / "cache"))
    source = folder / "rows.jsonl"
    source.write_bytes(content)
    overrides = [
        f"--dataset_name={source}", f"--output_dir={folder / 'out'}", f"--schema={schema}",
        f"--skip_invalid={str(skip_invalid).lower()}", "--max_length=64",
    ]  # fmt: skip
    cfg = load_config(stage, None, overrides)
    rejects_file = folder / "out" / "rejects.jsonl"
    try:
        prepared = prepare(cfg, stage=stage, tokenizer=tokenizer("chatml"))
    except DataError as err:
        assert "\n" not in str(err)
        if not rows:
            assert err.reason.startswith("split 'train' has no usable rows: it is empty")
        elif err.row is not None:
            assert not skip_invalid
            assert err.file == str(source) and err.row in rows and "skip_invalid" in err.reason
            assert not bad or err.row <= min(bad)
        else:  # every row refused or set aside, when read or when tokenized: the rejects file lists each one
            assert str(rejects_file) in err.reason
            assert read_rows(rejects_file) == rows
        return
    event(outcome(prepared.train, prepared.rejects))
    assert prepared.test is None
    listed = read_rows(prepared.rejects_path)
    assert len(prepared.train) + len(listed) == len(rows)
    assert len(set(listed)) == len(listed) and set(bad) <= set(listed) <= set(rows)
