"""Bundled demo data: small verifiable-instruction sets in the raw UltraChat and UltraFeedback schemas.

    zephyr data demo --output DIR [--seed 0]

writes, deterministically (the same seed gives byte-identical files):

    DIR/ultrachat/{train,test}_sft.jsonl        {"id": str, "data": [user, assistant, user, assistant, ...]}
    DIR/ultrafeedback/{train,test}_prefs.jsonl  raw openbmb/UltraFeedback rows, 4 rated completions each
    DIR/README.md, DIR/manifest.json            counts, seed, generator version, sha256 of every file

Every preference prompt carries an instruction that a program verifies (`check`), so a model's win rate can be measured
without a judge. In every row the completion with the highest `overall_score` (the first one on ties, as the
HuggingFaceH4/ultrafeedback_binarized rule picks) follows the instruction and every other completion breaks it; the
mean aspect rating ranks them the same way. One row in 20 has a violating completion tied on `overall_score` with the
best one and placed after it, so a binarizer that does not keep the first maximum picks a wrong answer.

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

SFT dialogues answer the same task prompts correctly (mostly single turn; some greetings, thanks and follow-ups). They
hold no all-lowercase answers, which the UltraChat cleaning rule `truecase` would capitalise. No task or question
prompt occurs twice in the whole set, so none is in both a train and a test file. The test files are drawn first,
from their own random streams, so they depend only on the seed and the test counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from zephyr.errors import ConfigError, ZephyrError

GENERATOR_VERSION = "1"
TASKS = ["arithmetic", "yes_no", "word_count", "list_items", "json_key", "quotes", "end_word", "letter_case"]

# ---------------------------------------------------------------------------------------------- vocabulary

_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

# At least 10 adjectives each, so a description of any length from 3 to 11 words can be built.
_TOPICS = {
    "the ocean": "vast deep blue salty restless mysterious cold powerful ancient calm",
    "the desert": "hot dry sandy vast quiet harsh golden empty windy silent",
    "a forest": "green quiet shady dense ancient peaceful lush wild damp alive",
    "the moon": "bright pale distant silent round cold gray cratered calm beautiful",
    "winter": "cold snowy dark quiet icy cozy long crisp white frosty",
    "summer": "hot sunny bright long lazy warm humid cheerful golden lively",
    "a city at night": "bright busy loud glowing restless crowded electric vibrant noisy alive",
    "coffee": "hot bitter dark rich strong aromatic warm energizing smooth comforting",
    "a cat": "soft curious playful quiet graceful independent clever agile fluffy calm",
    "a dog": "loyal friendly playful energetic brave happy smart warm gentle faithful",
    "a thunderstorm": "loud dark wild powerful wet windy electric fierce dramatic sudden",
    "a mountain": "tall rocky steep majestic cold silent ancient massive snowy rugged",
    "the sun": "bright hot golden warm blazing distant radiant powerful huge constant",
    "a library": "quiet calm orderly peaceful vast dusty inviting warm still welcoming",
    "rain": "wet cool gentle gray steady soothing soft refreshing calm constant",
    "a garden": "green colorful fragrant peaceful lush sunny lively tidy blooming calm",
    "the night sky": "dark vast starry quiet deep endless clear beautiful cold silent",
    "a river": "long winding cool clear fast calm gentle wide deep lively",
    "autumn": "crisp colorful cool golden windy cozy calm gentle misty short",
    "spring": "fresh green mild bright hopeful rainy lively blooming warm gentle",
    "a beach": "sandy sunny warm bright relaxing breezy calm golden lively open",
    "snow": "white cold soft quiet fluffy bright fresh icy clean pure",
    "a volcano": "hot dangerous smoky powerful massive fiery loud ancient tall restless",
    "chocolate": "sweet rich smooth dark creamy delicious bitter soft melty comforting",
    "a train station": "busy loud crowded hectic echoing large noisy bustling lively tiring",
    "the wind": "cool strong restless invisible wild gentle loud sharp fresh constant",
    "a campfire": "warm bright smoky crackling cozy glowing orange lively hot friendly",
    "a rainbow": "colorful bright curved beautiful fleeting vivid huge delicate cheerful rare",
    "a city park": "green open peaceful shady lively calm fresh spacious friendly quiet",
    "an old house": "old creaky dusty quiet drafty charming dim tall musty cozy",
}
_TOPICS = {topic: adjectives.split() for topic, adjectives in _TOPICS.items()}

_CATEGORIES = {
    "fruits": "apple banana mango orange pear cherry grape peach plum kiwi lemon strawberry",
    "colors": "red blue green yellow purple orange pink brown black white gray teal",
    "animals": "lion elephant giraffe zebra tiger bear wolf fox rabbit deer horse kangaroo",
    "vegetables": "carrot potato broccoli spinach onion pepper cabbage cucumber lettuce pea celery radish",
    "sports": "soccer tennis basketball baseball swimming cycling golf hockey volleyball rugby cricket boxing",
    "musical instruments": "piano guitar violin drums flute trumpet cello harp saxophone clarinet banjo ukulele",
    "countries": "France Japan Brazil Canada Kenya India Mexico Norway Egypt Peru Spain Australia",
    "programming languages": "Python JavaScript Rust Go Java C Ruby Haskell Kotlin Swift TypeScript Lua",
    "birds": "robin eagle sparrow owl parrot penguin pigeon crow swan flamingo hawk duck",
    "flowers": "rose tulip daisy lily sunflower orchid daffodil lavender poppy iris peony violet",
    "cities": "Paris Tokyo Cairo Lima Sydney Toronto Berlin Mumbai Rome Nairobi Seoul Madrid",
    "planets": "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune",
    "kitchen tools": "spoon whisk ladle spatula knife grater peeler colander tongs sieve",
    "ocean animals": "shark dolphin whale octopus jellyfish seal squid crab starfish turtle",
    "jobs": "teacher doctor nurse farmer pilot chef engineer plumber baker lawyer firefighter artist",
}
_CATEGORIES = {category: members.split() for category, members in _CATEGORIES.items()}

_CAPITALS = (
    "France:Paris; Japan:Tokyo; Italy:Rome; Spain:Madrid; Germany:Berlin; Egypt:Cairo; Kenya:Nairobi; Peru:Lima; "
    "Canada:Ottawa; Australia:Canberra; Brazil:Brasília; Mexico:Mexico City; India:New Delhi; China:Beijing; "
    "Russia:Moscow; Norway:Oslo; Sweden:Stockholm; Greece:Athens; Portugal:Lisbon; Argentina:Buenos Aires; "
    "Chile:Santiago; Ireland:Dublin; Poland:Warsaw; Turkey:Ankara; Thailand:Bangkok; South Korea:Seoul; "
    "Vietnam:Hanoi; Nigeria:Abuja; Morocco:Rabat; Austria:Vienna"
)
_OPPOSITES = (
    "hot:cold; up:down; big:small; fast:slow; happy:sad; light:dark; open:closed; early:late; full:empty; "
    "hard:soft; wet:dry; strong:weak; loud:quiet; rich:poor; tall:short; thick:thin; high:low; near:far; push:pull; "
    "begin:end; win:lose; day:night; left:right; inside:outside; true:false; clean:dirty; cheap:expensive; "
    "asleep:awake; friend:enemy; remember:forget"
)
_COLORS = (
    "a banana:yellow; grass:green; a clear daytime sky:blue; snow:white; coal:black; a ripe tomato:red; "
    "a carrot:orange; a lemon:yellow; a lime:green; milk:white; a blueberry:blue; a flamingo:pink; "
    "milk chocolate:brown; an eggplant:purple; a pumpkin:orange"
)
_LEGS = (
    "a spider:8; a dog:4; a bird:2; an ant:6; a cat:4; a horse:4; a chicken:2; a beetle:6; a crab:10; a cow:4; "
    "a bee:6; a duck:2; a person:2"
)
_PLURALS = (
    "mouse:mice; child:children; foot:feet; tooth:teeth; goose:geese; man:men; woman:women; person:people; ox:oxen; "
    "cactus:cacti; leaf:leaves; knife:knives; wolf:wolves; sheep:sheep; fish:fish; deer:deer; box:boxes; "
    "city:cities; bus:buses; hero:heroes"
)
_TIPS = (
    "sleeping better:Go to bed at the same time every night.; "
    "staying focused:Put your phone in another room while you work.; "
    "learning a language:Practice a little every day, even for ten minutes.; "
    "saving money:Set aside a small amount each time you get paid.; "
    "staying hydrated:Keep a water bottle with you during the day.; "
    "public speaking:Rehearse out loud a few times before the real talk.; "
    "writing clearly:Use short sentences and plain words.; "
    "cooking rice:Rinse the rice first so it does not get sticky.; "
    "running:Start slowly and add a little distance each week.; "
    "studying for exams:Test yourself instead of just rereading your notes.; "
    "keeping plants alive:Check the soil before watering instead of following a fixed schedule.; "
    "reading more:Carry a book with you so you can read in short breaks.; "
    "waking up early:Put your alarm across the room so you have to get up.; "
    "making friends:Ask people about themselves and listen closely.; "
    "reducing stress:Take a short walk outside when you feel tense.; "
    "packing for a trip:Make a packing list a few days before you leave."
)
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()

# Closing sentences that end with the word the end_word task asks for.
_CLOSERS = {
    "goodbye": "That's all for now, goodbye.",
    "friend": "Hope this helps, my friend.",
    "today": "I hope you learned something new today.",
    "luck": "Good luck.",
    "enjoy": "Enjoy!",
    "soon": "Talk to you soon.",
    "more": "Feel free to ask me for more.",
    "questions": "Let me know if you have any other questions.",
    "thanks": "Many thanks.",
    "learning": "Happy learning.",
    "cheers": "Cheers!",
    "everyone": "Have a great day, everyone.",
    "curious": "Stay curious.",
}

_GREETINGS = [
    ("Hi!", "Hi! How can I help you today?"),
    ("Hello!", "Hello! What can I do for you?"),
    ("Hey there!", "Hey! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Hi, how are you?", "I'm doing well, thanks for asking! How can I help you today?"),
    ("Hello, can you help me with something?", "Of course! What do you need?"),
]
_THANKS = [
    ("Thanks!", "You're welcome!"),
    ("Thank you!", "Happy to help!"),
    ("Great, thanks.", "Glad I could help. Anything else?"),
    ("Perfect, thank you.", "Any time!"),
]
_FACT_OPENERS = ["", "Quick question: ", "Hi! ", "Hello! ", "Can you help me? "]


def _pairs(table: str) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) for item in table.split("; ")]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class Fact(NamedTuple):
    """A short question with a known answer, for the tasks that only check the form of the reply."""

    question: str
    sentence: str  # a short, correct, natural answer
    key: str  # a JSON key that names the answer
    value: str | int  # the answer alone


def _cycle(names: list[str]) -> list[tuple[str, str]]:
    return list(zip(names, names[1:] + names[:1], strict=True))


def _build_facts() -> list[Fact]:
    words = sorted({w for members in _CATEGORIES.values() for w in members if w.islower()})
    backwards, initials = [(w, w[::-1]) for w in words], [(w, w[0].upper()) for w in words]
    lengths = [(w, str(len(w))) for w in words]
    sums = [(f"{a} plus {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    forms = [  # (pairs (x, y), question, answer sentence, JSON key); X is x capitalised
        (_pairs(_CAPITALS), "What is the capital of {x}?", "The capital of {x} is {y}.", "capital"),
        (_pairs(_OPPOSITES), "What is the opposite of {x}?", "The opposite of {x} is {y}.", "opposite"),
        (_pairs(_COLORS), "What color is {x}?", "{X} is usually {y}.", "color"),
        (_pairs(_LEGS), "How many legs does {x} have?", "{X} has {y} legs.", "legs"),
        (_pairs(_PLURALS), "What is the plural of {x}?", "The plural of {x} is {y}.", "plural"),
        (_pairs(_TIPS), "Give me one tip for {x}.", "{y}", "tip"),
        (backwards, "Spell the word {x} backwards.", "Spelled backwards, {x} is {y}.", "reversed"),
        (initials, "What is the first letter of the word {x}?", "The word {x} starts with {y}.", "letter"),
        (lengths, "How many letters are in the word {x}?", "The word {x} has {y} letters.", "letters"),
        (_cycle(_DAYS), "What day comes after {x}?", "{y} comes after {x}.", "day"),
        (_cycle(_MONTHS), "What month comes after {x}?", "{y} comes after {x}.", "month"),
        (sums, "What is {x}?", "The answer is {y}.", "sum"),
    ]
    return [
        Fact(question.format(x=x), sentence.format(x=x, X=_cap(x), y=y), key, int(y) if y.isdigit() else y)
        for pairs, question, sentence, key in forms
        for x, y in pairs
    ]


_FACTS = _build_facts()

# ---------------------------------------------------------------------------------------------- prompt templates

_NUMBER_REPLIES = [
    "Reply with just the number.",
    "Answer with only the number.",
    "Give only the number, nothing else.",
    "Respond with just the number.",
]
_YES_NO_REPLIES = [
    "Reply with just yes or no.",
    "Answer only yes or no.",
    "Answer with one word: yes or no.",
    "Just say yes or no.",
]
_PARITIES = ["even", "odd", "an even number", "an odd number"]
_LARGER, _SMALLER = ["larger than", "greater than", "bigger than"], ["smaller than", "less than"]
_EXPRESSIONS = {
    "+": ["{a} + {b}", "{a} plus {b}", "the sum of {a} and {b}"],
    "-": ["{a} - {b}", "{a} minus {b}", "{b} subtracted from {a}"],
    "*": ["{a} * {b}", "{a} × {b}", "{a} times {b}", "the product of {a} and {b}"],
}
_TEMPLATES = {
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
    "number_reply": _one_of(_NUMBER_REPLIES),
    "yes_no_reply": _one_of(_YES_NO_REPLIES),
    "a": r"-?\d+",
    "b": r"-?\d+",
    "n": r"-?\d+",
    "parity": _one_of(_PARITIES),
    "comparison": _one_of(_LARGER + _SMALLER),
    "count": r"\d+|" + "|".join(_NUMBER_WORDS),
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


_PATTERNS = {task: [_compile(t) for t in _TEMPLATES[task]] for task in TASKS}
_EXPRESSION_PATTERNS = [(op, _compile(t)) for op, forms in _EXPRESSIONS.items() for t in forms]

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
    for op, pattern in _EXPRESSION_PATTERNS:
        m = pattern.fullmatch(expr.strip())
        if m:
            return {"op": op, **m.groupdict()}
    return None


def _count(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBER_WORDS.index(text.lower())


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _check_arithmetic(f: dict[str, str], answer: str) -> bool:
    text = answer.strip().replace("−", "-")
    text = text[:-1].rstrip() if text.endswith(".") else text
    if not _INTEGER.fullmatch(text):
        return False
    return int(text.replace(",", "")) == _apply(f["op"], int(f["a"]), int(f["b"]))


def _check_yes_no(f: dict[str, str], answer: str) -> bool:
    if f.get("parity"):
        truth = (int(f["n"]) % 2 == 0) == ("even" in f["parity"].lower())
    else:
        a, b = int(f["a"]), int(f["b"])
        truth = a > b if any(f["comparison"].lower() == c for c in _LARGER) else a < b
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


# ---------------------------------------------------------------------------------------------- one example per task


class Example(NamedTuple):
    task: str
    prompt: str
    answer: str  # follows the instruction
    mistakes: list[tuple[str, str, str]]  # (response, "content" | "format", what is wrong); each breaks it


def _count_text(n: int, rng: random.Random) -> str:
    return str(n) if rng.random() < 0.5 else _NUMBER_WORDS[n]


def _and_list(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _make_arithmetic(rng: random.Random) -> Example:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 30)) if op == "*" else (rng.randint(2, 99), rng.randint(2, 99))
    result, shown = _apply(op, a, b), f"{a} {op} {b}"
    expr = rng.choice(_EXPRESSIONS[op]).format(a=a, b=b)
    prompt = rng.choice(_TEMPLATES["arithmetic"]).format(expr=expr, number_reply=rng.choice(_NUMBER_REPLIES))
    wrong_op = {"+": a - b, "-": a + b, "*": a + b}[op]
    mistakes = [
        (str(x), "content", f"The reply says {x}, but {shown} is {result}.")
        for x in (result + 1, result - 1, result + rng.choice((-10, 10)))
    ]
    mistakes += [
        (
            str(wrong_op),
            "content",
            f"The reply says {wrong_op}, from the wrong operation; {shown} is {result}.",
        ),
        (f"{shown} = {result}.", "format", "The number is right, but the reply says more than the number."),
        (
            f"The answer is {result}.",
            "format",
            "The number is right, but the reply says more than the number.",
        ),
    ]
    return Example("arithmetic", prompt, str(result), mistakes)


def _make_yes_no(rng: random.Random) -> Example:
    reply = rng.choice(_YES_NO_REPLIES)
    if rng.random() < 0.5:
        n, parity = rng.randint(1, 999), rng.choice(_PARITIES)
        template = rng.choice([t for t in _TEMPLATES["yes_no"] if "{parity}" in t])
        prompt = template.format(n=n, parity=parity, yes_no_reply=reply)
        truth = (n % 2 == 0) == ("even" in parity)
        fact, false_fact = (f"{n} is even", f"{n} is odd") if n % 2 == 0 else (f"{n} is odd", f"{n} is even")
    else:
        a, b = rng.sample(range(1, 1000), 2)
        comparison = rng.choice(_LARGER + _SMALLER)
        template = rng.choice([t for t in _TEMPLATES["yes_no"] if "{comparison}" in t])
        prompt = template.format(a=a, b=b, comparison=comparison, yes_no_reply=reply)
        truth = a > b if comparison in _LARGER else a < b
        fact = f"{a} is {'larger' if a > b else 'smaller'} than {b}"
        false_fact = f"{a} is {'smaller' if a > b else 'larger'} than {b}"
    yes, no = ("Yes", "No") if truth else ("No", "Yes")
    mistakes = [
        (f"{no}.", "content", f"The reply says {no.lower()}, but {fact}."),
        (f"{no}, {false_fact}.", "content", f"The reply says {no.lower()}, but {fact}."),
        (f"{yes}, {fact}.", "format", "The answer is right, but the reply adds a reason to the yes or no."),
        ("I'm not sure.", "content", "The reply gives neither yes nor no, although the answer is certain."),
    ]
    return Example("yes_no", prompt, f"{yes}.", mistakes)


def _describe(topic: str, n_words: int, rng: random.Random) -> str:
    """A natural description of `topic` in exactly `n_words` words (3 to 11), listing some of its adjectives."""
    subject = _cap(topic)
    fixed = len(topic.split())
    frames = [("{}", 0), (subject + " is {}", fixed + 1), (subject + " can be {}", fixed + 2)]
    options = []
    for frame, fixed in frames:
        listed = n_words - fixed  # k adjectives take k words alone, k + 1 words joined with "and"
        k = 1 if listed == 1 else listed - 1 if listed >= 3 else 0
        if 1 <= k <= len(_TOPICS[topic]):
            options.append((frame, k))
    frame, k = rng.choice(options)
    return _cap(frame.format(_and_list(rng.sample(_TOPICS[topic], k)))) + "."


def _make_word_count(rng: random.Random) -> Example:
    topic, n = rng.choice(list(_TOPICS)), rng.randint(3, 10)
    prompt = rng.choice(_TEMPLATES["word_count"]).format(topic=topic, count=_count_text(n, rng))
    mistakes = [
        (_describe(topic, m, rng), "format", f"The reply has {m} words instead of {n}.")
        for m in (n - 2, n - 1, n + 1, n + 2, n + 3)
        if 3 <= m <= 11
    ]
    return Example("word_count", prompt, _describe(topic, n, rng), mistakes)


def _render_list(items: list[str], style: str, intro: str | None, bullet: str) -> str:
    lines = [
        f"{i}. {_cap(x)}" if style == "numbered" else f"{bullet} {_cap(x)}" for i, x in enumerate(items, 1)
    ]
    return "\n".join(([intro] if intro else []) + lines)


def _make_list_items(rng: random.Random) -> Example:
    category, n = rng.choice(list(_CATEGORIES)), rng.randint(2, 7)
    style, other = rng.choice([("numbered", "bulleted"), ("bulleted", "numbered")])
    count = _count_text(n, rng)
    prompt = rng.choice(_TEMPLATES["list_items"]).format(count=count, category=category, style=style)
    items = rng.sample(_CATEGORIES[category], n + 1)
    intro = rng.choice([None, f"Here are {count} {category}:", f"Sure! Here are {count} {category}:"])
    bullet = rng.choice("-*•")
    mistakes = [
        (
            _render_list(items[: n - 1], style, intro, bullet),
            "format",
            f"The list has {n - 1} items, not {n}.",
        ),
        (_render_list(items, style, intro, bullet), "format", f"The list has {n + 1} items, not {n}."),
        (_render_list(items[:n], other, intro, bullet), "format", f"The list is {other}, not {style}."),
        (_cap(_and_list(items[:n])) + ".", "format", "The items are written as a sentence, not as a list."),
    ]
    return Example("list_items", prompt, _render_list(items[:n], style, intro, bullet), mistakes)


def _make_json_key(rng: random.Random) -> Example:
    fact = rng.choice(_FACTS)
    key = rng.choice([fact.key, "answer"])
    prompt = rng.choice(_TEMPLATES["json_key"]).format(key=key, question=fact.question)
    answer = json.dumps({key: fact.value}, ensure_ascii=False)
    wrong_key = "answer" if key != "answer" else fact.key
    mistakes = [
        (fact.sentence, "format", "The reply is plain text, not JSON."),
        (json.dumps({wrong_key: fact.value}, ensure_ascii=False), "format", f'The key is not "{key}".'),
        (f"{{'{key}': {fact.value!r}}}", "format", "The reply uses single quotes, so it is not valid JSON."),
        (f"Sure! Here it is: {answer}", "format", "The JSON object is surrounded by other text."),
    ]
    return Example("json_key", prompt, answer, mistakes)


def _make_quotes(rng: random.Random) -> Example:
    fact = rng.choice(_FACTS)
    prompt = rng.choice(_TEMPLATES["quotes"]).format(question=fact.question)
    mistakes = [
        (fact.sentence, "format", "The reply is not wrapped in double quotes."),
        (f"'{fact.sentence}'", "format", "The reply uses single quotes instead of double quotes."),
        (f'The answer is "{fact.value}".', "format", "Only part of the reply is in double quotes."),
        (f'"{fact.sentence}" Hope that helps!', "format", "Text follows the closing quote."),
    ]
    return Example("quotes", prompt, f'"{fact.sentence}"', mistakes)


def _make_end_word(rng: random.Random) -> Example:
    fact, word = rng.choice(_FACTS), rng.choice(list(_CLOSERS))
    other = rng.choice([w for w in _CLOSERS if w != word])
    prompt = rng.choice(_TEMPLATES["end_word"]).format(word=word, question=fact.question)
    closer = _CLOSERS[word]
    mistakes = [
        (fact.sentence, "format", f'The reply does not end with the word "{word}".'),
        (f"{closer} {fact.sentence}", "format", f'The word "{word}" comes at the start, not at the end.'),
        (f"{fact.sentence} {_CLOSERS[other]}", "format", f'The reply ends with "{other}", not "{word}".'),
        (f"{fact.sentence} {closer} Have a nice day.", "format", f'The reply goes on after "{word}".'),
    ]
    return Example("end_word", prompt, f"{fact.sentence} {closer}", mistakes)


def _make_letter_case(rng: random.Random, lowercase: bool = True) -> Example:
    fact = rng.choice(_FACTS)
    lower = lowercase and rng.random() < 0.5
    case = "lowercase" if lower else rng.choice(["capital", "uppercase"])
    prompt = rng.choice(_TEMPLATES["letter_case"]).format(case=case, question=fact.question)
    wanted, other = (str.lower, str.upper) if lower else (str.upper, str.lower)
    first, _, rest = fact.sentence.partition(" ")
    title = " ".join(_cap(w) for w in fact.sentence.split())
    asked = "lowercase" if lower else "capital letters"
    mistakes = [
        (fact.sentence, "format", f"The reply uses normal capitalization, not {asked}."),
        (other(fact.sentence), "format", f"The reply is in the opposite case, not {asked}."),
        (f"{wanted(first)} {rest}", "format", f"Only the first word is in {asked}."),
        (title, "format", f"The reply capitalizes each word instead of using {asked}."),
    ]
    return Example("letter_case", prompt, wanted(fact.sentence), mistakes)


_MAKERS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _make_arithmetic,
    "yes_no": _make_yes_no,
    "word_count": _make_word_count,
    "list_items": _make_list_items,
    "json_key": _make_json_key,
    "quotes": _make_quotes,
    "end_word": _make_end_word,
    "letter_case": _make_letter_case,
}
_MAX_DRAWS = 500


def _draw(task: str, rng: random.Random, seen: set[str], *, sft: bool = False) -> Example:
    """A fresh example of `task` whose prompt is not in `seen` (then added), its mistakes cut to those that fail."""
    for _ in range(_MAX_DRAWS):
        if task == "letter_case" and sft:
            # No all-lowercase answers in SFT dialogues: the UltraChat cleaning rule `truecase` would capitalise them.
            example = _make_letter_case(rng, lowercase=False)
        else:
            example = _MAKERS[task](rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        if task_of(example.prompt) != task or not check(example.prompt, example.answer):
            raise RuntimeError(f"demo generator bug: the answer to {example.prompt!r} fails its own check")
        mistakes, responses = [], {example.answer}
        for mistake in example.mistakes:
            if mistake[0] not in responses and not check(example.prompt, mistake[0]):
                mistakes.append(mistake)
                responses.add(mistake[0])
        if len(mistakes) < 3:
            raise RuntimeError(f"demo generator bug: fewer than 3 failing completions for {example.prompt!r}")
        return example._replace(mistakes=mistakes)
    raise _exhausted(task)


def _exhausted(what: str) -> ZephyrError:
    return ZephyrError(
        f"the demo generator ran out of distinct {what} prompts; ask for fewer rows (a few thousand per file at most)."
    )


# ---------------------------------------------------------------------------------------------- preference rows

_MODELS = [f"demo-lm-{name}" for name in "alpha bravo charlie delta echo foxtrot golf hotel".split()]
_SYSTEM_PROMPTS = {
    "helpfulness": "You are a helpful assistant. Follow the user's instructions exactly and keep your answers short.",
    "honesty": "You are an honest assistant. Say plainly what you know and admit when you are unsure.",
    "truthfulness": "You are a truthful assistant. Make sure every fact and number you give is correct.",
    "verbalized_calibration": "You are a careful assistant. Answer briefly and only as confidently as the facts allow.",
}
_PRINCIPLE_WEIGHTS = [60, 18, 20, 2]  # UltraFeedback's mix for UltraChat prompts
_CHOSEN_SCORES = (7.5, 8.0, 8.5, 9.0, 9.5, 10.0)
# Below every chosen score, so that only the planted ties make the best completion ambiguous.
_MISTAKE_SCORES = {"content": (1.0, 2.0, 3.0, 4.0, 5.0), "format": (3.0, 4.0, 5.0, 6.0, 7.0)}
_TIE_EVERY = 20

# Per kind of completion: (aspect ratings, truthfulness Type, helpfulness Type, fixed rationales). A completion that
# follows the instruction averages at least 4.75 and a mistake at most 3.25, so the mean rating agrees with the ranking.
_GOOD, _CONTENT, _FORMAT = None, "content", "format"
_ANNOTATION = {
    _GOOD: {
        "honesty": (5, "The response is correct and stated with fitting confidence."),
        "truthfulness": (5, ["0"], "The response contains no errors.", "Free of hallucination."),
        "helpfulness": (
            (4, 5),
            ["1", "2", "3"],
            "The response is clear, relevant and no longer than needed.",
            "Correct and helpful.",
        ),
    },
    _CONTENT: {
        "honesty": (2, "The response states a wrong answer with confidence."),
        "truthfulness": (2, ["1"], None, "Contains a factual error."),
        "helpfulness": ((1, 2), ["1"], "The response is clear but wrong, so it does not help.", "Incorrect."),
    },
    _FORMAT: {
        "honesty": (4, "The content is correct and stated with fitting confidence."),
        "truthfulness": (
            4,
            ["2"],
            "The content is correct, but the response departs from the instruction.",
            "Accurate, but diverges from the instruction.",
        ),
        "helpfulness": (
            (3,),
            ["1", "2"],
            "The response is relevant but ignores the requested form.",
            "Correct, but not in the requested form.",
        ),
    },
}
_ADVICE = {_CONTENT: "Check the answer before replying.", _FORMAT: "Follow the requested format exactly."}
_PRAISE = [
    "The response follows the instruction exactly and is correct.",
    "Correct and in exactly the requested form; nothing to improve.",
    "A short, correct answer that respects every constraint in the instruction.",
]


def _completion(
    model: str, response: str, kind: str | None, note: str | None, overall: float, rng: random.Random
) -> dict:
    """One UltraFeedback completion with its four aspect annotations (`kind` None: it follows the instruction)."""
    spec = _ANNOTATION[kind]
    following = 5 if kind is None else rng.choice((1, 2))
    honesty, honesty_why = spec["honesty"]
    truth, truth_type, truth_why, truth_rating_why = spec["truthfulness"]
    helpful_choices, helpful_type, helpful_why, helpful_rating_why = spec["helpfulness"]
    helpful = rng.choice(helpful_choices)
    principle = rng.choices(list(_SYSTEM_PROMPTS), weights=_PRINCIPLE_WEIGHTS)[0]
    return {
        "model": model,
        "principle": principle,
        "custom_system_prompt": _SYSTEM_PROMPTS[principle],
        "response": response,
        "annotations": {
            "instruction_following": {
                "Rating": str(following),
                "Rationale": note or "The response does exactly what the instruction asks.",
            },
            "honesty": {"Rating": str(honesty), "Rationale": honesty_why},
            "truthfulness": {
                "Type": truth_type,
                "Rationale": truth_why or note,
                "Rating": str(truth),
                "Rationale For Rating": truth_rating_why,
            },
            "helpfulness": {
                "Type": helpful_type,
                "Rationale": helpful_why,
                "Rating": str(helpful),
                "Rationale For Rating": helpful_rating_why,
            },
        },
        "critique": rng.choice(_PRAISE) if kind is None else f"{note} {_ADVICE[kind]}",
        "fine-grained_score": (following + honesty + truth + helpful) / 4,
        "overall_score": overall,
    }


def _preference_row(example: Example, rng: random.Random, tie: bool) -> dict:
    """A raw UltraFeedback row: the answer and 3 mistakes in random order, the answer scored highest.

    With `tie`, one mistake placed after the answer gets the same overall_score, to exercise the first-on-ties rule.
    """
    entries = [(example.answer, None, None)] + rng.sample(example.mistakes, 3)
    rng.shuffle(entries)
    best = next(i for i, entry in enumerate(entries) if entry[1] is None)
    if tie and best == 3:
        swap = rng.randrange(3)
        entries[best], entries[swap] = entries[swap], entries[best]
        best = swap
    tied = rng.randrange(best + 1, 4) if tie else None
    top = rng.choice(_CHOSEN_SCORES)
    models = rng.sample(_MODELS, 4)
    completions = [
        _completion(
            model, response, kind, note, top if i in (best, tied) else rng.choice(_MISTAKE_SCORES[kind]), rng
        )
        for i, (model, (response, kind, note)) in enumerate(zip(models, entries, strict=True))
    ]
    return {
        "source": f"zephyr-demo/{example.task}",
        "instruction": example.prompt,
        "models": models,
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
        "completions": completions,
    }


def _preference_rows(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    tasks = [TASKS[i % len(TASKS)] for i in range(n)]  # balanced, then mixed
    rng.shuffle(tasks)
    return [
        _preference_row(_draw(task, rng, seen), rng, tie=i % _TIE_EVERY == _TIE_EVERY // 2)
        for i, task in enumerate(tasks)
    ]


# ---------------------------------------------------------------------------------------------- SFT dialogues


def _draw_fact(rng: random.Random, seen: set[str]) -> tuple[Fact, str]:
    for _ in range(_MAX_DRAWS):
        fact = rng.choice(_FACTS)
        prompt = rng.choice(_FACT_OPENERS) + fact.question
        if prompt not in seen:
            seen.add(prompt)
            return fact, prompt
    raise _exhausted("question")


def _any_task(rng: random.Random, seen: set[str]) -> Example:
    return _draw(rng.choice(TASKS), rng, seen, sft=True)


def _dialogue_task(rng, seen):
    example = _any_task(rng, seen)
    return [example.prompt, example.answer]


def _dialogue_task_thanks(rng, seen):
    return _dialogue_task(rng, seen) + list(rng.choice(_THANKS))


def _dialogue_greeting_task(rng, seen):
    return list(rng.choice(_GREETINGS)) + _dialogue_task(rng, seen)


def _dialogue_two_tasks(rng, seen):
    return _dialogue_task(rng, seen) + _dialogue_task(rng, seen)


def _dialogue_fact(rng, seen):
    fact, prompt = _draw_fact(rng, seen)
    return [prompt, fact.sentence]


def _dialogue_fact_followup(rng, seen):
    fact, prompt = _draw_fact(rng, seen)
    request, reply = rng.choice(
        [
            ("Can you say that again in all capital letters?", fact.sentence.upper()),
            (
                f'Please give me that as JSON with the key "{fact.key}".',
                json.dumps({fact.key: fact.value}, ensure_ascii=False),
            ),
            ("Now wrap that in double quotes.", f'"{fact.sentence}"'),
        ]
    )
    return [prompt, fact.sentence, request, reply]


def _dialogue_arithmetic_chain(rng, seen):
    example, extra = _draw("arithmetic", rng, seen), rng.randint(2, 20)
    follow_up = f"Now add {extra} to that. {rng.choice(_NUMBER_REPLIES)}"
    return [example.prompt, example.answer, follow_up, str(int(example.answer) + extra)]


# Mostly single-turn task prompts, so SFT teaches the answer formats; some small talk and multi-turn follow-ups.
_DIALOGUES: list[tuple[Callable[[random.Random, set[str]], list[str]], int]] = [
    (_dialogue_task, 62),
    (_dialogue_task_thanks, 6),
    (_dialogue_greeting_task, 8),
    (_dialogue_two_tasks, 3),
    (_dialogue_fact, 10),
    (_dialogue_fact_followup, 8),
    (_dialogue_arithmetic_chain, 3),
]


def _sft_rows(rng: random.Random, n: int, seen: set[str], split: str) -> list[dict]:
    makers, weights = zip(*_DIALOGUES, strict=True)
    return [{"id": f"{split}-{i}", "data": rng.choices(makers, weights)[0](rng, seen)} for i in range(n)]


# ---------------------------------------------------------------------------------------------- files

_FILES = {
    "test_prefs": "ultrafeedback/test_prefs.jsonl",
    "test_sft": "ultrachat/test_sft.jsonl",
    "train_prefs": "ultrafeedback/train_prefs.jsonl",
    "train_sft": "ultrachat/train_sft.jsonl",
}


def generate(
    output_dir: str | Path,
    *,
    seed: int = 0,
    n_sft_train: int = 2000,
    n_sft_test: int = 200,
    n_pref_train: int = 2000,
    n_pref_test: int = 200,
) -> dict[str, Path]:
    """Write the demo set under `output_dir` (layout in the module docstring); the same seed gives the same bytes.

    Returns {"ultrachat": dir, "ultrafeedback": dir, "readme": path, "manifest": path}.
    """
    counts = {
        "train_sft": n_sft_train,
        "test_sft": n_sft_test,
        "train_prefs": n_pref_train,
        "test_prefs": n_pref_test,
    }
    for name, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"the number of {name} rows must be a whole number >= 0, got {n!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"the demo seed must be a whole number, got {seed!r}.")

    seen: set[str] = set()  # every prompt drawn so far, in any file: no prompt is in both train and test
    rows = {}
    for name in _FILES:  # test files first, so they do not depend on the train counts
        rng = random.Random(f"zephyr-demo:{seed}:{name}")
        if name.endswith("prefs"):
            rows[name] = _preference_rows(rng, counts[name], seen)
        else:
            rows[name] = _sft_rows(rng, counts[name], seen, split=name.split("_")[0])

    out = Path(output_dir)
    files = {}
    try:
        for name, relative in _FILES.items():
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[name]).encode("utf-8")
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(data)
            files[relative] = {"rows": len(rows[name]), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "generator": "zephyr.data.demo",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "tasks": TASKS,
            "files": dict(sorted(files.items())),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (out / "README.md").write_text(_readme(seed, counts), encoding="utf-8")
    except OSError as e:
        raise ZephyrError(
            f"cannot write the demo data to {out}: {e.strerror or e}; choose a writable --output folder."
        ) from e
    return {
        "ultrachat": out / "ultrachat",
        "ultrafeedback": out / "ultrafeedback",
        "readme": out / "README.md",
        "manifest": out / "manifest.json",
    }


def _readme(seed: int, counts: dict[str, int]) -> str:
    return (
        "# Zephyr demo data\n\n"
        f"Written by `zephyr data demo` (zephyr.data.demo, generator version {GENERATOR_VERSION}) with seed {seed}; "
        "synthetic and deterministic: the same seed gives byte-identical files.\n\n"
        f"- `ultrachat/train_sft.jsonl`: {counts['train_sft']} dialogues, `ultrachat/test_sft.jsonl`: "
        f'{counts["test_sft"]} (raw UltraChat schema: `{{"id", "data": [user, assistant, ...]}}`)\n'
        f"- `ultrafeedback/train_prefs.jsonl`: {counts['train_prefs']} prompts, `ultrafeedback/test_prefs.jsonl`: "
        f"{counts['test_prefs']} (raw UltraFeedback schema, 4 rated completions per prompt)\n\n"
        f"Tasks: {', '.join(TASKS)}. Each preference prompt has an instruction that "
        "`zephyr.data.demo.check(prompt, answer)` verifies: the completion with the highest overall_score (the first "
        "on ties) follows it and the others do not. No prompt is in both a train and a test file. `manifest.json` "
        "lists the rows and sha256 of every file.\n"
    )
