from __future__ import annotations

import datasets
import jinja2
import pytest

from tiny import CHATML_TEMPLATE, tiny_tokenizer
from zephyr.data.templates import (
    ZEPHYR_TEMPLATE,
    apply_chat_template_setting,
    has_generation_markers,
    insert_empty_system_message,
    render,
    resolve_chat_template,
    strip_generation_markers,
    with_empty_system_messages,
)
from zephyr.errors import ZephyrError


@pytest.fixture
def zephyr_tokenizer():
    return apply_chat_template_setting(tiny_tokenizer(), "zephyr")


def test_zephyr_template_matches_the_model_card_pipeline_example(zephyr_tokenizer):
    # zephyr-7b-alpha's card: an empty system turn, a question, and the generation prompt.
    question = "How many helicopters can a human eat in one sitting?"
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": question}]
    text = render(zephyr_tokenizer, messages, add_generation_prompt=True)
    assert text == f"<|system|>\n</s>\n<|user|>\n{question}</s>\n<|assistant|>\n"


def test_zephyr_template_renders_every_turn_and_no_generation_prompt_unless_asked(zephyr_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert render(zephyr_tokenizer, messages) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n"
    )


def test_zephyr_template_uses_the_tokenizers_eos_token():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})
    apply_chat_template_setting(tokenizer, "zephyr")
    text = render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_zephyr_template_refuses_unknown_roles(zephyr_tokenizer):
    with pytest.raises(jinja2.TemplateError, match="no role tool"):
        render(zephyr_tokenizer, [{"role": "tool", "content": "{}"}])


def test_zephyr_template_marks_assistant_text_for_transformers_masks(zephyr_tokenizer):
    assert has_generation_markers(ZEPHYR_TEMPLATE)
    assert not has_generation_markers(strip_generation_markers(ZEPHYR_TEMPLATE))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    out = zephyr_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert zephyr_tokenizer.decode(marked) == "Hello!</s>\n"


def test_stripping_markers_keeps_the_rendered_text(zephyr_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    stripped = tiny_tokenizer(chat_template=strip_generation_markers(ZEPHYR_TEMPLATE))
    assert render(stripped, messages) == render(zephyr_tokenizer, messages)


# ------------------------------------------------------------------------------------------ the chat_template setting


def test_auto_and_none_take_the_tokenizers_own_template():
    tokenizer = tiny_tokenizer()
    assert resolve_chat_template("auto", tokenizer) == CHATML_TEMPLATE
    assert resolve_chat_template(None, tokenizer) == CHATML_TEMPLATE


def test_auto_without_a_tokenizer_template_suggests_zephyr():
    with pytest.raises(ZephyrError, match="chat_template: zephyr"):
        resolve_chat_template("auto", tiny_tokenizer(chat_template=None))


def test_zephyr_names_the_built_in_template():
    assert resolve_chat_template("zephyr", tiny_tokenizer()) == ZEPHYR_TEMPLATE


def test_a_jinja_string_is_used_as_is():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(template, tiny_tokenizer()) == template


def test_a_path_to_a_jinja_file_is_read(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    tokenizer = apply_chat_template_setting(tiny_tokenizer(), str(path))
    assert render(tokenizer, [{"role": "user", "content": "Hi"}]) == "Hi!"


def test_a_missing_jinja_file_is_a_clear_error(tmp_path):
    with pytest.raises(ZephyrError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "nope.jinja"), tiny_tokenizer())


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(ZephyrError, match="neither 'auto', 'zephyr'"):
        resolve_chat_template("zephir", tiny_tokenizer())


def test_a_template_with_a_syntax_error_is_refused_when_set():
    with pytest.raises(ZephyrError, match="not valid Jinja"):
        apply_chat_template_setting(tiny_tokenizer(), "{% for m in messages %}{{ m['content'] }}")


def test_apply_sets_the_template_on_the_tokenizer_and_returns_it():
    tokenizer = tiny_tokenizer()
    assert apply_chat_template_setting(tokenizer, "zephyr") is tokenizer
    assert tokenizer.chat_template == ZEPHYR_TEMPLATE


# ---------------------------------------------------------------------------------------- empty system messages


def test_an_empty_system_message_is_inserted_before_a_user_turn():
    messages = [{"role": "user", "content": "Hi"}]
    assert insert_empty_system_message(messages, ZEPHYR_TEMPLATE) == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi"},
    ]
    assert messages == [{"role": "user", "content": "Hi"}]  # the input is left alone


def test_an_existing_system_message_is_kept():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert insert_empty_system_message(messages, ZEPHYR_TEMPLATE) == messages


def test_nothing_is_inserted_for_a_template_without_system_turns():
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "Hi"}]
    assert insert_empty_system_message(messages, template) == messages


def test_empty_system_messages_go_into_sft_messages_and_preference_prompts():
    user = {"role": "user", "content": "Hi"}
    reply = {"role": "assistant", "content": "Hello"}
    sft = with_empty_system_messages(
        datasets.Dataset.from_list([{"messages": [user, reply]}]), ZEPHYR_TEMPLATE
    )
    assert [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]
    pref = datasets.Dataset.from_list([{"prompt": [user], "chosen": [reply], "rejected": [reply]}])
    pref = with_empty_system_messages(pref, ZEPHYR_TEMPLATE)
    assert [m["role"] for m in pref[0]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in pref[0]["chosen"]] == ["assistant"]
