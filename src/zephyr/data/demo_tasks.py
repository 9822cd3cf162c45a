"""The demo's verifiable-instruction tasks: their prompt templates and `check`, which grades an answer to one.

Each demo prompt carries an instruction a program can verify, so a model's pass rate (`zephyr eval demo`) or a
preference row's order (`zephyr data demo`, which writes prompts from these templates) needs no judge.

What `check(prompt, answer)` accepts, per task; whitespace around the answer is always ignored:
- arithmetic: only the integer: "42", "42.", " 42\\n", "-8", "1,188". "The answer is 42." breaks "reply with just the
  number".
- yes_no: only "yes" or "no" (any case, one optional trailing "." or "!") and the true one; "Yes, it is." is not only yes.
- word_count: the number of whitespace-separated tokens holding a letter or digit ("well-known" is one word, a lone "-"
  none) equals the count asked for.
- list_items: exactly N lines with the requested marker, in one block ("1." or "1)" numbered 1..N in order; "-", "*"
  or "•" bulleted); other lines, such as "Here are 4 fruits:", may come before or after the block.
- json_key: the whole answer is one JSON object whose only key is the requested one (case-sensitive) and whose value is
  a non-empty string or a number; no code fence and no prose around it.
- quotes: the whole answer is wrapped in one pair of double quotes ("..." or “...”), with none inside and nothing after.
- end_word: the last word (token holding a letter or digit), punctuation stripped, is the requested word (any case).
- letter_case: at least one letter, and no letter in the other case.
For the four wrapper tasks (json_key, quotes, end_word, letter_case) only the form is checked, not the content.

Prompts are matched against the templates below ignoring case, runs of whitespace and a missing final period.
`is_checkable(prompt)` says whether a prompt is one of ours; `task_of(prompt)` names its task.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from functools import lru_cache

TASKS = ["arithmetic", "yes_no", "word_count", "list_items", "json_key", "quotes", "end_word", "letter_case"]

# A count in a prompt may be spelled out ("List three fruits"), so `check` reads these words back as numbers.
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

# ---------------------------------------------------------------------------------------------- prompt templates

NUMBER_REPLIES = [
    "Reply with just the number.",
    "Answer with only the number.",
    "Give only the number, nothing else.",
    "Respond with just the number.",
]
YES_NO_REPLIES = [
    "Reply with just yes or no.",
    "Answer only yes or no.",
    "Answer with one word: yes or no.",
    "Just say yes or no.",
]
PARITIES = ["even", "odd", "an even number", "an odd number"]
LARGER, SMALLER = ["larger than", "greater than", "bigger than"], ["smaller than", "less than"]
EXPRESSIONS = {
    "+": ["{a} + {b}", "{a} plus {b}", "the sum of {a} and {b}"],
    "-": ["{a} - {b}", "{a} minus {b}", "{b} subtracted from {a}"],
    "*": ["{a} * {b}", "{a} × {b}", "{a} times {b}", "the product of {a} and {b}"],
}
TEMPLATES = {
    "arithmetic": [
        "What is {expr}? {number_reply}",
        "Compute {expr}. {number_reply}",
        "Calculate {expr}. {number_reply}",
        "Work out {expr}. {number_reply}",
        "{number_reply} What is {expr}?",
    ],
    "yes_no": [
        "Is {n} {parity}? {yes_no_reply}",
        "{yes_no_reply} Is {n} {parity}?",
        "Is {a} {comparison} {b}? {yes_no_reply}",
        "{yes_no_reply} Is {a} {comparison} {b}?",
    ],
    "word_count": [
        "Describe {topic} in exactly {count} words.",
        "In exactly {count} words, describe {topic}.",
        "Write exactly {count} words about {topic}.",
        "Use exactly {count} words to describe {topic}.",
    ],
    "list_items": [
        "List {count} {category} as a {style} list.",
        "Give me a {style} list of {count} {category}.",
        "Name {count} {category} in a {style} list.",
        "Write a {style} list of {count} {category}.",
    ],
    "json_key": [
        'Answer in JSON with a single key "{key}": {question}',
        '{question} Reply with a JSON object whose only key is "{key}".',
        'Respond with JSON only, using the one key "{key}". {question}',
    ],
    "quotes": [
        "Wrap your entire answer in double quotes. {question}",
        "{question} Put your whole reply inside double quotation marks.",
        "Answer inside double quotes: {question}",
    ],
    "end_word": [
        'End your answer with the word "{word}". {question}',
        '{question} Finish your reply with the word "{word}".',
        '{question} The last word of your answer must be "{word}".',
    ],
    "letter_case": [
        "Answer in all {case} letters: {question}",
        "{question} Write your answer in {case} letters only.",
        "Reply using only {case} letters. {question}",
    ],
}


def _one_of(phrases: list[str]) -> str:
    # A closing period is optional, as people often leave it out.
    return "|".join(re.escape(p.rstrip(".")) + (r"\.?" if p.endswith(".") else "") for p in phrases)


_FIELD_PATTERNS = {
    "expr": r".+?",
    "number_reply": _one_of(NUMBER_REPLIES),
    "yes_no_reply": _one_of(YES_NO_REPLIES),
    "a": r"-?\d+",
    "b": r"-?\d+",
    "n": r"-?\d+",
    "parity": _one_of(PARITIES),
    "comparison": _one_of(LARGER + SMALLER),
    "count": r"\d+|" + "|".join(NUMBER_WORDS),
    "topic": r".+?",
    "category": r".+?",
    "style": r"numbered|bulleted",
    "key": r"[A-Za-z_][A-Za-z0-9_]*",
    "question": r".+",
    "word": r"[A-Za-z]+",
    "case": r"capital|uppercase|lowercase",
}


def _compile(template: str) -> re.Pattern[str]:
    """A template such as "Is {n} {parity}? {yes_no_reply}" -> a regex with one named group per field."""
    pieces = re.split(r"\{(\w+)\}", template)
    regex = []
    for i, piece in enumerate(pieces):
        if i % 2:
            regex.append(f"(?P<{piece}>{_FIELD_PATTERNS[piece]})")
        elif i == len(pieces) - 1 and piece[-1:] in (".", "?"):
            regex.append(re.escape(piece[:-1]) + r"[.?!]?")
        else:
            regex.append(re.escape(piece))
    return re.compile("".join(regex), re.IGNORECASE)


_PATTERNS = {task: [_compile(t) for t in TEMPLATES[task]] for task in TASKS}
_EXPRESSION_PATTERNS = [(op, _compile(t)) for op, forms in EXPRESSIONS.items() for t in forms]

# ---------------------------------------------------------------------------------------------- checking


@lru_cache(maxsize=4096)
def _parse(prompt: str) -> tuple[str, dict[str, str]] | None:
    """(task, fields) for a prompt written from one of the templates, else None. Callers must not edit fields."""
    text = " ".join(prompt.split())
    for task in TASKS:
        for pattern in _PATTERNS[task]:
            m = pattern.fullmatch(text)
            if m is None:
                continue
            fields = m.groupdict()
            if task == "arithmetic":
                expression = _parse_expression(fields["expr"])
                if expression is None:
                    continue
                fields.update(expression)
            return task, fields
    return None


def _parse_expression(expr: str) -> dict[str, str] | None:
    """The operator and operands of an expression such as "the sum of 2 and 3", else None."""
    for op, pattern in _EXPRESSION_PATTERNS:
        m = pattern.fullmatch(expr.strip())
        if m:
            return {"op": op, **m.groupdict()}
    return None


def _count(text: str) -> int:
    """A count as written in a prompt, "7" or "seven", as a number."""
    return int(text) if text.isdigit() else NUMBER_WORDS.index(text.lower())


def evaluate(op: str, a: int, b: int) -> int:
    """The value of `a op b` for op "+", "-" or "*"."""
    return a + b if op == "+" else a - b if op == "-" else a * b


_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _check_arithmetic(f: dict[str, str], answer: str) -> bool:
    text = answer.strip().replace("−", "-")
    text = text[:-1].rstrip() if text.endswith(".") else text
    if not _INTEGER.fullmatch(text):
        return False
    return int(text.replace(",", "")) == evaluate(f["op"], int(f["a"]), int(f["b"]))


def _check_yes_no(f: dict[str, str], answer: str) -> bool:
    if f.get("parity"):
        truth = (int(f["n"]) % 2 == 0) == ("even" in f["parity"].lower())
    else:
        a, b = int(f["a"]), int(f["b"])
        truth = a > b if any(f["comparison"].lower() == c for c in LARGER) else a < b
    text = answer.strip()
    text = text[:-1] if text[-1:] in (".", "!") else text
    return text.lower() == ("yes" if truth else "no")


def _words(text: str) -> list[str]:
    return [token for token in text.split() if any(c.isalnum() for c in token)]


def _check_word_count(f: dict[str, str], answer: str) -> bool:
    return len(_words(answer)) == _count(f["count"])


_NUMBERED_ITEM = re.compile(r"(\d+)[.)]\s+\S")
_BULLETED_ITEM = re.compile(r"[-*•]\s+\S")


def _check_list_items(f: dict[str, str], answer: str) -> bool:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    styles = [
        "numbered" if _NUMBERED_ITEM.match(x) else "bulleted" if _BULLETED_ITEM.match(x) else None
        for x in lines
    ]
    items = [i for i, style in enumerate(styles) if style]
    count, style = _count(f["count"]), f["style"].lower()
    if len(items) != count or (items and items[-1] - items[0] + 1 != count):
        return False
    if any(styles[i] != style for i in items):
        return False
    if style == "numbered":
        return [int(_NUMBERED_ITEM.match(lines[i])[1]) for i in items] == list(range(1, count + 1))
    return True


def _check_json_key(f: dict[str, str], answer: str) -> bool:
    try:
        obj = json.loads(answer)
    except ValueError:
        return False
    if not isinstance(obj, dict) or list(obj) != [f["key"]]:
        return False
    value = obj[f["key"]]
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_quotes(f: dict[str, str], answer: str) -> bool:
    text = answer.strip()
    wrapped = (text[:1], text[-1:]) in (('"', '"'), ("“", "”"))
    return len(text) >= 3 and wrapped and not any(q in text[1:-1] for q in '"“”')


def _check_end_word(f: dict[str, str], answer: str) -> bool:
    tokens = _words(answer)
    return bool(tokens) and tokens[-1].strip(string.punctuation + "“”‘’").lower() == f["word"].lower()


def _check_letter_case(f: dict[str, str], answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    if f["case"].lower() == "lowercase":
        return bool(letters) and not any(c.isupper() for c in letters)
    return bool(letters) and not any(c.islower() for c in letters)


# One check per task, given the prompt's parsed fields and the answer; the rules are in the module docstring.
_CHECKS: dict[str, Callable[[dict[str, str], str], bool]] = {
    "arithmetic": _check_arithmetic,
    "yes_no": _check_yes_no,
    "word_count": _check_word_count,
    "list_items": _check_list_items,
    "json_key": _check_json_key,
    "quotes": _check_quotes,
    "end_word": _check_end_word,
    "letter_case": _check_letter_case,
}


def is_checkable(prompt: str) -> bool:
    """True when `prompt` is written from one of the demo templates, so `check` can judge answers to it."""
    return _parse(prompt) is not None


def task_of(prompt: str) -> str:
    """The task (one of TASKS) a demo prompt belongs to; ValueError for a prompt no template matches."""
    parsed = _parse(prompt)
    if parsed is None:
        raise ValueError(f"not a demo prompt with a verifiable instruction: {prompt[:80]!r}")
    return parsed[0]


def check(prompt: str, answer: str) -> bool:
    """Whether `answer` follows the verifiable instruction in `prompt` (rules in the module docstring).

    Raises ValueError for a prompt that none of the demo templates matches (see `is_checkable`).
    """
    task = task_of(prompt)
    return _CHECKS[task](_parse(prompt)[1], answer)
