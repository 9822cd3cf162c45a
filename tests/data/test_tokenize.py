from __future__ import annotations

import datasets
import pytest

import zephyr.data.tokenize as tokenize_module
from tiny import tiny_tokenizer
from zephyr.data.rejects import Rejects
from zephyr.data.templates import ZEPHYR_TEMPLATE, apply_chat_template_setting, strip_generation_markers
from zephyr.data.tokenize import (
    IGNORE_INDEX,
    masked_segments,
    preference_sequence,
    tokenize_preferences,
    tokenize_sft,
)
from zephyr.errors import ConfigError, DataError, ZephyrError


@pytest.fixture(scope="module")
def tok():
    return apply_chat_template_setting(tiny_tokenizer(), "zephyr")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------------ SFT


def sft(tok, rows, tmp_path, **kwargs):
    kwargs.setdefault("max_length", None)
    kwargs.setdefault("rejects", Rejects())
    return tokenize_sft(datasets.Dataset.from_list(rows), tok, cache_dir=tmp_path, **kwargs)


def test_sft_trains_only_on_assistant_text_and_its_end_of_turn(tok, tmp_path):
    messages = [system(""), user("Hi there"), assistant("Hello!"), user("Bye"), assistant("Bye.")]
    row = sft(tok, [{"messages": messages}], tmp_path)[0]

    prefix = "<|system|>\n</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert row["input_ids"] == ids(tok, prefix + "Hello!</s>\n<|user|>\nBye</s>\n<|assistant|>\nBye.</s>\n")
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    # The first len(ids(prefix)) tokens carry no loss, then "Hello!</s>\n" does, and so on.
    n_prefix = len(ids(tok, prefix))
    assert row["labels"][:n_prefix] == [IGNORE_INDEX] * n_prefix
    assert row["labels"][n_prefix : n_prefix + len(ids(tok, "Hello!</s>\n"))] == ids(tok, "Hello!</s>\n")
    assert masked_segments(tok, row["input_ids"], row["labels"]) == [
        (prefix, False),
        ("Hello!</s>\n", True),
        ("<|user|>\nBye</s>\n<|assistant|>\n", False),
        ("Bye.</s>\n", True),
    ]


def test_sft_without_assistant_only_loss_trains_on_every_token(tok, tmp_path):
    row = sft(tok, [{"messages": [user("Hi"), assistant("Hello!")]}], tmp_path, assistant_only_loss=False)[0]
    assert row["labels"] == row["input_ids"] == ids(tok, "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n")


def test_templates_without_generation_markers_get_the_same_masks(tok, tmp_path):
    messages = [
        system("Be brief."),
        user("Hi"),
        assistant("Hello!"),
        user("Again"),
        assistant("Hello again!"),
    ]
    marked = sft(tok, [{"messages": messages}], tmp_path / "marked")[0]
    unmarked_tok = apply_chat_template_setting(tiny_tokenizer(), strip_generation_markers(ZEPHYR_TEMPLATE))
    unmarked = sft(unmarked_tok, [{"messages": messages}], tmp_path / "unmarked")[0]
    assert unmarked["input_ids"] == marked["input_ids"]
    assert unmarked["labels"] == marked["labels"]


def test_a_chatml_template_without_markers_trains_on_the_reply_and_im_end(tmp_path):
    chatml = tiny_tokenizer()  # the tiny tokenizer's own ChatML template has no {% generation %}
    row = sft(chatml, [{"messages": [user("Hi"), assistant("Hello!")]}], tmp_path)[0]
    assert masked_segments(chatml, row["input_ids"], row["labels"]) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
    ]


def test_sft_truncation_keeps_the_first_max_length_tokens(tok, tmp_path):
    messages = [user("Hi"), assistant("The quick brown fox jumps over the lazy dog.")]
    full = sft(tok, [{"messages": messages}], tmp_path / "full")[0]
    cut = sft(tok, [{"messages": messages}], tmp_path / "cut", max_length=16)[0]
    assert cut["input_ids"] == full["input_ids"][:16]
    assert cut["labels"] == full["labels"][:16]
    assert cut["attention_mask"] == [1] * 16
    assert cut["labels"].count(IGNORE_INDEX) == 12  # "<|user|>\nHi</s>\n<|assistant|>\n", then 4 reply tokens


def test_sft_rows_whose_assistant_tokens_are_all_truncated_are_reported(tok, tmp_path):
    long_question = "What is 12 + 30? " * 10
    rows = [
        {"messages": [user("Hi"), assistant("Hello!")], "_origin": "chats.jsonl:1"},
        {"messages": [user(long_question), assistant("42")], "_origin": "chats.jsonl:2"},
    ]
    rejects = Rejects(skip_invalid=True)
    out = sft(tok, rows, tmp_path, max_length=16, rejects=rejects)
    assert len(out) == 1 and out[0]["_origin"] == "chats.jsonl:1"
    assert [(r["file"], r["row"], r["field"]) for r in rejects.rows] == [("chats.jsonl", 2, "messages")]
    assert "beyond max_length=16" in rejects.rows[0]["reason"]

    with pytest.raises(DataError, match=r"chats.jsonl, row 2, field 'messages': every assistant token"):
        sft(tok, rows, tmp_path / "strict", max_length=16)


def test_sft_rows_without_an_assistant_turn_are_reported(tok, tmp_path):
    with pytest.raises(DataError, match="row 1, field 'messages': the conversation has no assistant turn"):
        sft(tok, [{"messages": [user("Hi")]}], tmp_path)


def test_masked_segments_groups_runs_of_equal_treatment(tok):
    input_ids = ids(tok, "Hello!") + ids(tok, "42")
    n = len(ids(tok, "Hello!"))
    labels = [IGNORE_INDEX] * n + ids(tok, "42")
    assert masked_segments(tok, input_ids, labels) == [("Hello!", False), ("42", True)]
    assert masked_segments(tok, [], []) == []


# ---------------------------------------------------------------------------------------------------- preferences


def preference(prompt, chosen, rejected, origin=None):
    row = {
        "prompt": prompt,
        "chosen": [assistant(chosen)],
        "rejected": [assistant(rejected)],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    if origin:
        row["_origin"] = origin
    return row


ROWS = [
    preference([system(""), user("What is 12 + 30?")], "42.", "The answer is 41, I think.", "prefs.jsonl:1"),
    preference(
        [
            system("Be brief."),
            user("Hi"),
            assistant("Hello! How can I help you today?"),
            user("Write five words."),
        ],
        "The sea is deep, blue.",
        "No.",
        "prefs.jsonl:2",
    ),
    preference(
        [user("Write exactly five words about the sea. " * 4)],
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Hello!",
        "prefs.jsonl:3",
    ),
    preference([user("Hello!")], "Hello! How can I help you today?", "?", "prefs.jsonl:4"),
]


def prefs(tok, rows, tmp_path, **kwargs):
    kwargs.setdefault("max_length", None)
    kwargs.setdefault("max_prompt_length", None)
    kwargs.setdefault("rejects", Rejects())
    return tokenize_preferences(datasets.Dataset.from_list(rows), tok, cache_dir=tmp_path, **kwargs)


def test_preference_rows_split_prompt_and_completions_after_the_generation_prompt(tok, tmp_path):
    row = prefs(tok, ROWS[:1], tmp_path)[0]
    assert row["prompt_input_ids"] == ids(
        tok, "<|system|>\n</s>\n<|user|>\nWhat is 12 + 30?</s>\n<|assistant|>\n"
    )
    assert row["chosen_input_ids"] == ids(tok, "42.</s>\n")
    assert row["rejected_input_ids"] == ids(tok, "The answer is 41, I think.</s>\n")
    assert row["_origin"] == "prefs.jsonl:1"
    assert "score_chosen" not in row and "prompt" not in row


def test_max_prompt_length_keeps_the_prompts_end_and_max_completion_length_its_start(tok, tmp_path):
    full = prefs(tok, ROWS[2:3], tmp_path / "full")[0]
    cut = prefs(tok, ROWS[2:3], tmp_path / "cut", max_prompt_length=10, max_completion_length=5)[0]
    assert cut["prompt_input_ids"] == full["prompt_input_ids"][-10:]
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:5]
    assert cut["rejected_input_ids"] == full["rejected_input_ids"][:5]


def test_preference_sequence_cuts_like_the_handbook_describes():
    prompt, completion = [1, 2, 3], [4, 5, 6]
    assert preference_sequence(prompt, completion, max_length=None) == (
        [1, 2, 3, 4, 5, 6],
        [0, 0, 0, 1, 1, 1],
    )
    assert preference_sequence(prompt, completion, max_length=4, truncation_mode="keep_start") == (
        [1, 2, 3, 4],
        [0, 0, 0, 1],
    )
    assert preference_sequence(prompt, completion, max_length=4, truncation_mode="keep_end") == (
        [3, 4, 5, 6],
        [0, 1, 1, 1],
    )


def test_a_prompt_that_fills_max_length_is_reported_with_its_file_row_and_field(tok, tmp_path):
    rows = [preference([user("What is 12 + 30? " * 5)], "42", "41", "data/train.jsonl:7")]
    with pytest.raises(DataError) as raised:
        prefs(tok, rows, tmp_path, max_length=20, truncation_mode="keep_start")
    message = str(raised.value)
    assert message.startswith("data/train.jsonl, row 7, field 'prompt': the prompt is ")
    assert "max_length=20" in message


def test_a_long_prompt_is_fine_when_max_prompt_length_shortens_it(tok, tmp_path):
    rows = [preference([user("What is 12 + 30? " * 5)], "42", "41", "data/train.jsonl:7")]
    out = prefs(tok, rows, tmp_path, max_length=20, max_prompt_length=10, truncation_mode="keep_start")
    assert len(out[0]["prompt_input_ids"]) == 10


def test_rows_without_origin_are_located_by_position(tok, tmp_path):
    rows = [preference([user("Hi")], "Hello", "Hey"), preference([user("What is 12 + 30? " * 5)], "42", "41")]
    with pytest.raises(DataError, match=r"^row 2, field 'prompt'"):
        prefs(tok, rows, tmp_path, max_length=20, truncation_mode="keep_start")


def test_bad_settings_are_config_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="truncation_mode"):
        prefs(tok, ROWS[:1], tmp_path, truncation_mode="keep_middle")
    with pytest.raises(ConfigError, match="max_prompt_length"):
        prefs(tok, ROWS[:1], tmp_path, max_prompt_length=0)


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tmp_path):
    with pytest.raises(ZephyrError, match="chat_template: zephyr"):
        prefs(tiny_tokenizer(chat_template=None), ROWS[:1], tmp_path)


# ---------------------------------------------------------------------------------------------- parity with TRL 1.16


@pytest.fixture(scope="module")
def trl_dpo():
    return pytest.importorskip("trl.trainer.dpo_trainer")


def trl_preference_rows(trl_dpo, tok, rows, *, max_length, truncation_mode):
    """TRL's own DPO dataset preparation, run as a plain function (it only reads these attributes)."""
    from types import SimpleNamespace

    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    trainer = SimpleNamespace(_tokenizer=tok)
    return trl_dpo.DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tok, args, "train")


def trl_sequences(trl_dpo, tok, trl_row, *, max_length, truncation_mode):
    """TRL's collator on one row -> [(input_ids, completion_mask) for chosen, rejected], padding removed."""
    collator = trl_dpo.DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    batch = collator([{k: trl_row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    out = []
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        out.append((batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].tolist()))
    return out


# A template whose generation prompt differs from what precedes a rendered reply: the split must fall where the
# token sequences diverge, as in TRL, not after the prompt.
DIVERGING_TEMPLATE = ZEPHYR_TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}",
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n\\n' }}",
)


@pytest.mark.parametrize(
    ("template", "max_length", "truncation_mode"),
    [
        ("zephyr", None, "keep_start"),
        ("zephyr", 30, "keep_start"),
        ("zephyr", 51, "keep_start"),
        ("zephyr", 30, "keep_end"),
        ("zephyr", 12, "keep_end"),
        (DIVERGING_TEMPLATE, 40, "keep_start"),
    ],
)
def test_preference_tokenization_matches_trl(trl_dpo, tmp_path, template, max_length, truncation_mode):
    tok = apply_chat_template_setting(tiny_tokenizer(), template)
    rejects = Rejects(skip_invalid=True)
    ours = prefs(tok, ROWS, tmp_path, max_length=max_length, truncation_mode=truncation_mode, rejects=rejects)
    theirs = trl_preference_rows(trl_dpo, tok, ROWS, max_length=max_length, truncation_mode=truncation_mode)

    # TRL silently drops rows whose prompt fills max_length under keep_start; we keep the same rows and report the rest.
    assert [r["_origin"] for r in ours] == [r["_origin"] for r in theirs]
    assert len(ours) + len(rejects) == len(ROWS)
    if template == "zephyr" and truncation_mode == "keep_start":
        # The prompts of rows 1-4 are 22, 51, 50 and 12 tokens: a prompt of max_length tokens or more is refused.
        assert [r["row"] for r in rejects.rows] == {None: [], 30: [2, 3], 51: [2]}[max_length]
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert mine["prompt_input_ids"] == trl_row["prompt_ids"]
        assert mine["chosen_input_ids"] == trl_row["chosen_ids"]
        assert mine["rejected_input_ids"] == trl_row["rejected_ids"]
        expected = trl_sequences(
            trl_dpo, tok, trl_row, max_length=max_length, truncation_mode=truncation_mode
        )
        for completion, (input_ids, completion_mask) in zip(
            ("chosen_input_ids", "rejected_input_ids"), expected, strict=True
        ):
            sequence = preference_sequence(
                mine["prompt_input_ids"],
                mine[completion],
                max_length=max_length,
                truncation_mode=truncation_mode,
            )
            assert sequence == (input_ids, completion_mask)


def test_the_diverging_template_really_moves_the_split(trl_dpo, tmp_path):
    tok = apply_chat_template_setting(tiny_tokenizer(), DIVERGING_TEMPLATE)
    row = prefs(tok, ROWS[:1], tmp_path)[0]
    assert tok.decode(row["prompt_input_ids"]).endswith("<|assistant|>\n")
    assert tok.decode(row["chosen_input_ids"]) == "42.</s>\n"


def test_sft_labels_match_trl_assistant_only_loss(tok, tmp_path):
    from types import SimpleNamespace

    sft_trainer = pytest.importorskip("trl.trainer.sft_trainer")
    rows = [
        {"messages": [system(""), user("Hi there"), assistant("Hello!"), user("Bye"), assistant("Bye.")]},
        {"messages": [user("What is 12 + 30?"), assistant("The answer is 42.")]},
    ]
    args = SimpleNamespace(
        dataset_num_proc=None,
        dataset_text_field="text",
        assistant_only_loss=True,
        max_length=24,
        truncation_mode="keep_start",
        shuffle_dataset=False,
    )
    trainer = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=False)
    theirs = sft_trainer.SFTTrainer._prepare_dataset(
        trainer,
        datasets.Dataset.from_list(rows),
        tok,
        args,
        packing=False,
        formatting_func=None,
        dataset_name="train",
    )
    ours = sft(tok, rows, tmp_path, max_length=24)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]


# ---------------------------------------------------------------------------------------------------------- cache


def forbid_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr(tokenize_module, "_tokenize_preference_row", refuse)
    monkeypatch.setattr(tokenize_module, "_tokenize_sft_row", refuse)


def count_tokenizing(monkeypatch) -> list:
    calls = []
    original = tokenize_module._tokenize_preference_row

    def counting(row, tokenizer, settings):
        calls.append(1)
        return original(row, tokenizer, settings)

    monkeypatch.setattr(tokenize_module, "_tokenize_preference_row", counting)
    return calls


def test_a_second_run_reads_the_cache_without_tokenizing(tok, tmp_path, monkeypatch):
    first = prefs(tok, ROWS, tmp_path, max_length=64)
    forbid_tokenizing(monkeypatch)
    second = prefs(tok, ROWS, tmp_path, max_length=64)
    assert second.to_list() == first.to_list()


def test_the_cache_defaults_to_zephyr_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path))
    tokenize_sft(
        datasets.Dataset.from_list([{"messages": [user("Hi"), assistant("Hello")]}]),
        tok,
        max_length=None,
        rejects=Rejects(),
    )
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary folder left behind


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 63},
        {"max_prompt_length": 32},
        {"max_completion_length": 32},
        {"truncation_mode": "keep_start"},
    ],
)
def test_changing_any_setting_misses_the_cache(tok, tmp_path, monkeypatch, change):
    settings = {
        "max_length": 64,
        "max_prompt_length": None,
        "max_completion_length": None,
        "truncation_mode": "keep_end",
    }
    prefs(tok, ROWS, tmp_path, **settings)
    calls = count_tokenizing(monkeypatch)
    prefs(tok, ROWS, tmp_path, **{**settings, **change})
    assert len(calls) == len(ROWS)


def test_changing_the_data_or_the_template_misses_the_cache(tok, tmp_path, monkeypatch):
    prefs(tok, ROWS, tmp_path)
    calls = count_tokenizing(monkeypatch)
    prefs(tok, ROWS[:3] + [preference([user("Hello?")], "Hi", "?")], tmp_path)
    assert len(calls) == len(ROWS)
    chatml = tiny_tokenizer()
    prefs(chatml, ROWS, tmp_path)
    assert len(calls) == 2 * len(ROWS)


def test_a_cache_hit_reports_the_rows_refused_the_first_time(tok, tmp_path, monkeypatch):
    first = Rejects(skip_invalid=True)
    prefs(tok, ROWS, tmp_path, max_length=30, truncation_mode="keep_start", rejects=first)
    forbid_tokenizing(monkeypatch)
    again = Rejects(skip_invalid=True)
    prefs(tok, ROWS, tmp_path, max_length=30, truncation_mode="keep_start", rejects=again)
    assert again.rows == first.rows and len(again) == 2
    with pytest.raises(DataError, match="prefs.jsonl, row 2, field 'prompt'"):
        prefs(tok, ROWS, tmp_path, max_length=30, truncation_mode="keep_start")
