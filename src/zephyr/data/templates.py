"""Chat templates: the built-in Zephyr template and the `chat_template` setting that picks one.

The Zephyr format renders each turn as `<|role|>\\n{content}{eos}\\n` and prompts a reply with `<|assistant|>\\n`:

    <|system|>\\n</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\nHello!</s>\\n

The assistant's text, its end-of-turn token and the newline after it sit inside `{% generation %}` so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens an SFT run trains on, the same
span TRL's `*_training.jinja` templates mark. The newline is included for the same reason TRL includes it: the next
turn then starts on a masked token, and a model that has learnt to stop never generates it anyway.

`chat_template` settings (recipe key `chat_template`):
    auto (default)  the tokenizer's own template
    zephyr          ZEPHYR_TEMPLATE
    a Jinja string  used as is (anything containing `{%` or `{{`)
    a path          a `.jinja` file read as UTF-8
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from zephyr.errors import ZephyrError

ZEPHYR_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + eos_token + '\\n' }}{%- endgeneration %}"
    "{%- elif message['role'] == 'system' or message['role'] == 'user' %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- else %}"
    "{{- raise_exception('The Zephyr chat template has no role ' + message['role'] + '; use system, user or assistant.') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    """Whether TEMPLATE marks assistant text with `{% generation %}` (so transformers can return assistant masks)."""
    return _GENERATION_TAG.search(template) is not None


def strip_generation_markers(template: str) -> str:
    """TEMPLATE without its `{% generation %}` tags, for renderers outside transformers that do not know them."""
    return _GENERATION_TAG.sub("", template)


def resolve_chat_template(setting: str | None, tokenizer) -> str:
    """The Jinja text that the `chat_template` SETTING names (see the module docstring for the forms)."""
    if setting is None or setting == "auto":
        return _tokenizer_template(tokenizer)
    if setting == "zephyr":
        return ZEPHYR_TEMPLATE
    if "{%" in setting or "{{" in setting:
        return setting
    path = Path(setting).expanduser()
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise ZephyrError(f"chat_template file {setting} does not exist; check the path in your recipe.")
        return path.read_text(encoding="utf-8")
    raise ZephyrError(
        f"chat_template '{setting}' is neither 'auto', 'zephyr', a Jinja string nor a path to a .jinja file; "
        "use one of those."
    )


def _tokenizer_template(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: transformers renders "default" unless told otherwise
        template = template.get("default")
    if not template:
        raise ZephyrError(
            "The tokenizer has no chat template of its own (chat_template: auto); "
            "set `chat_template: zephyr` or give a Jinja template."
        )
    return template


def apply_chat_template_setting(tokenizer, setting: str | None):
    """Set `tokenizer.chat_template` from SETTING, check that it parses, and return the tokenizer."""
    import jinja2

    tokenizer.chat_template = resolve_chat_template(setting, tokenizer)
    try:
        render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as e:
        raise ZephyrError(
            f"chat_template is not valid Jinja (line {e.lineno}: {e.message}); fix the template."
        ) from e
    except jinja2.TemplateError:
        pass  # a template may refuse a lone user turn (e.g. it requires a system message); that is not a syntax error
    return tokenizer


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """MESSAGES as the text the tokenizer's chat template renders (no tokenization, no BOS unless the template adds one)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def template_mentions_system(template: str) -> bool:
    """Whether TEMPLATE can render a system turn (the handbook's test before it inserts one)."""
    return "system" in template or "<|im_start|>" in template


def insert_empty_system_message(messages: list[dict], template: str | None = None) -> list[dict]:
    """MESSAGES with an empty system turn in front when the first turn is not a system turn.

    The alignment handbook's `auto_insert_empty_system_msg`: Zephyr models were trained with a `<|system|>` block on
    every example, so prompting them without one shifts the distribution. Like the handbook, nothing is inserted when
    TEMPLATE is given and has no notion of a system turn (inserting would make such templates raise).
    """
    if messages and messages[0]["role"] == "system":
        return messages
    if template is not None and not template_mentions_system(template):
        return messages
    return [{"role": "system", "content": ""}, *messages]


def with_empty_system_messages(ds: datasets.Dataset, template: str | None = None) -> datasets.Dataset:
    """DS with `insert_empty_system_message` applied to each SFT row's `messages` or preference row's `prompt`."""
    column = "messages" if "messages" in ds.column_names else "prompt"

    def insert(row):
        return {column: insert_empty_system_message(row[column], template)}

    return ds.map(insert, desc="Inserting empty system messages")
