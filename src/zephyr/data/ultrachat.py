"""Raw UltraChat -> the cleaned `HuggingFaceH4/ultrachat_200k` variant Zephyr's SFT stage was trained on.

    zephyr data clean-ultrachat stingning/ultrachat --output data/ultrachat_clean.jsonl

The ultrachat_200k card names two cleaning rules (docs/data.md has the details and the exact patterns):

1. truecase: about 5% of turns have sentences that start in lowercase ("Hello. how are you?"); the first letter of
   such a sentence is capitalised. Code (fenced or inline), URLs, identifiers and words that stay lowercase after an
   abbreviation ("e.g. apples") or an ellipsis are left alone; a turn with nothing to fix is returned unchanged.
2. disclaims_feelings: a dialogue is removed when an assistant turn says it has no emotions, feelings, opinions,
   beliefs or preferences ("As an AI language model, I don't have personal opinions"), whatever the prompt asked.

Raw rows are `{"id": ..., "data": [user, assistant, user, assistant, ...]}`; output rows, one JSON object per line:

    {"prompt": first user turn, "prompt_id": sha256(prompt) hex,
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zephyr.data.rejects import Rejects
from zephyr.data.sources import iter_records
from zephyr.data.ultrafeedback import reject_or_raise, write_jsonl_atomic, write_rejects
from zephyr.errors import DataError

RULES = ("truecase", "disclaims_feelings")

# ---------------------------------------------------------------------------------------------- truecasing

# Fenced blocks (an unclosed fence runs to the end of the turn) and inline code spans are never edited.
_CODE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]*`", re.DOTALL)
# A sentence break: end punctuation, optional closing brackets or quotes, whitespace, optional opening marks.
_BREAK = re.compile(r"(?P<punct>[.!?…]+)(?P<close>[\"'”’)\]]*)\s+(?P<open>[\"'“‘(\[*_]*)")
_TEXT_START = re.compile(r"\s*[\"'“‘(\[*_]*")
# Only plain lowercase words are capitalised: "iPhone", "npm_install", "x2", "example.com" and URLs are not.
_PLAIN_WORD = re.compile(r"[a-z]+(?:[-'’][a-z]+)*")
_WORD_TRAILER = ".,;:!?)]}\"'”’*_"
# After these a lowercase word is deliberate ("e.g. apples", "Smith et al. showed").
ABBREVIATIONS = frozenset(
    "e.g eg i.e ie etc vs cf viz approx ca al a.m p.m u.s no nos fig incl esp mr mrs ms dr st jr sr prof".split()
)


def truecase(text: str) -> str:
    """Capitalise the first letter of each sentence that starts in lowercase; everything else is kept byte for byte.

    "Hello. how are you?" -> "Hello. How are you?"; "Use `ls`. see e.g. man ls." -> "Use `ls`. See e.g. man ls."
    """
    fixes: list[int] = []
    position = 0
    for code in [*_CODE.finditer(text), None]:
        end = code.start() if code else len(text)
        fixes += _sentence_starts(text, position, end, at_text_start=position == 0)
        position = code.end() if code else end
    if not fixes:
        return text
    chars = list(text)
    for i in fixes:
        chars[i] = chars[i].upper()
    return "".join(chars)


def _sentence_starts(text: str, start: int, end: int, *, at_text_start: bool) -> list[int]:
    """Indices in text[start:end] (prose, no code) of lowercase letters that begin a sentence and should be capitals."""
    found = []
    if at_text_start:
        m = _TEXT_START.match(text, start, end)
        if _capitalisable(text, m.end(), end):
            found.append(m.end())
    for m in _BREAK.finditer(text, start, end):
        if _ends_sentence(text, m, start) and _capitalisable(text, m.end(), end):
            found.append(m.end())
    return found


def _ends_sentence(text: str, m: re.Match, start: int) -> bool:
    punct, close = m["punct"], m["close"]
    if ".." in punct or "…" in punct:  # an ellipsis often continues the sentence in lowercase on purpose
        return False
    if any(q in close for q in "\"'”’"):  # '"Stop." she said' is one sentence
        return False
    token_start = m.start()
    while token_start > start and not text[token_start - 1].isspace():
        token_start -= 1
    token = text[token_start : m.start()].lstrip("\"'“‘([").lower()
    if punct == ".":
        if token in ABBREVIATIONS or len(token) == 1:  # "e.g.", initials, "a." list items
            return False
        line_start = text.rfind("\n", 0, token_start) + 1
        if token.isdigit() and not text[line_start:token_start].strip():  # "1. apples" list items
            return False
    return True


def _capitalisable(text: str, i: int, end: int) -> bool:
    if i >= end or not text[i].islower():
        return False
    j = i
    while j < end and not text[j].isspace():
        j += 1
    return _PLAIN_WORD.fullmatch(text[i:j].rstrip(_WORD_TRAILER)) is not None


# ---------------------------------------------------------------------------------------------- disclaimers

_NOT = r"(?:do\s+not|don[’']t|cannot|can[’']t|can\s+not)"
_STATES = r"(?:emotions?|feelings?|opinions?|beliefs?|preferences?)"
_QUALIFIERS = r"(?:(?:any|an?|the)\s+)?(?:(?:personal|human|real|true|genuine|subjective|own|my\s+own)\s+)*"
# Case-insensitive; matched against assistant turns only. The comment above each pattern shows what it catches.
DISCLAIMER_PATTERNS: tuple[re.Pattern, ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        # "I do not have emotions", "As an AI language model, I don't have personal opinions", "I cannot feel emotions"
        rf"\bI\s+{_NOT}\s+(?:have|possess|hold|form|experience|feel)\s+{_QUALIFIERS}{_STATES}\b",
        # "I have no personal beliefs"
        rf"\bI\s+have\s+no\s+{_QUALIFIERS}{_STATES}\b",
        # "I am not capable of having emotions", "I'm unable to form opinions"
        rf"\bI(?:\s+am|[’']m)\s+(?:not\s+capable\s+of|incapable\s+of|unable\s+to|not\s+able\s+to)\s+"
        rf"(?:hav(?:e|ing)|feel(?:ing)?|experienc(?:e|ing)|form(?:ing)?|hold(?:ing)?)\s+{_QUALIFIERS}{_STATES}\b",
        # "I don't have the ability to feel", "I do not have the capacity to form opinions"
        rf"\bI\s+{_NOT}\s+have\s+the\s+(?:ability|capacity)\s+to\s+(?:feel|form\s+{_STATES}|hold\s+{_STATES}|have\s+{_STATES})",
    )
)


def disclaims_feelings(text: str) -> bool:
    """True when TEXT says that the speaker has no emotions, feelings, opinions, beliefs or preferences."""
    return any(p.search(text) for p in DISCLAIMER_PATTERNS)


# ---------------------------------------------------------------------------------------------- one dialogue


def clean_dialogue(row: dict) -> tuple[dict | None, set[str]]:
    """A raw UltraChat row -> (an ultrachat_200k row, or None when a rule removed it; the names of the rules that fired).

    Raises `DataError(reason, field=...)` without file or row for a row that is not a user/assistant dialogue.
    """
    turns = _turns(row)
    if any(disclaims_feelings(turn) for turn in turns[1::2]):
        return None, {"disclaims_feelings"}
    cased = [truecase(turn) for turn in turns]
    fired = {"truecase"} if cased != turns else set()
    prompt = cased[0]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(cased)
        ],
    }, fired


def _turns(row: Any) -> list[str]:
    if not isinstance(row, dict):
        raise DataError("row is not a JSON object")
    turns = row.get("data")
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError("expected a list of at least two turns (user, assistant, ...)", field="data")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise DataError("turn is missing, empty or not a string", field=f"data[{i}]")
    if len(turns) % 2:
        raise DataError("dialogue ends on a user turn with no assistant reply", field="data")
    return turns


# ---------------------------------------------------------------------------------------------- a file


@dataclass
class CleanReport:
    """What `clean_ultrachat_file` did; `changed`/`removed` map a rule to the 1-based rows it changed or removed."""

    source: str
    output: Path
    read: int = 0
    written: int = 0
    changed: dict[str, list[int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    rejects_path: Path | None = None

    def summary(self) -> str:
        lines = [f"read {self.read} dialogues from {self.source}; wrote {self.written} to {self.output}"]
        for verb, by_rule in (("changed", self.changed), ("removed", self.removed)):
            for rule in RULES:
                if rule in by_rule:
                    lines.append(f"  {rule}: {verb} {len(by_rule[rule])} dialogues{_rows(by_rule[rule])}")
        for reason, rows in self.skipped.items():
            lines.append(f"  skipped {len(rows)} malformed: {reason}{_rows(rows)}")
        if self.rejects_path is not None:
            lines.append(f"  skipped rows are listed in {self.rejects_path}")
        return "\n".join(lines)


def _rows(rows: list[int]) -> str:
    return " (rows " + ", ".join(str(r) for r in rows[:5]) + (", ...)" if len(rows) > 5 else ")")


def clean_ultrachat_file(
    source: str, output: str | Path, *, split: str | None = None, skip_invalid: bool = False
) -> CleanReport:
    """Clean every dialogue of SOURCE (a file, folder or hub id read by `iter_records`) into OUTPUT (JSONL).

    A malformed row stops the run with a `DataError` naming file, row and field, unless `skip_invalid`, which skips
    it and lists it in OUTPUT.rejects.jsonl. OUTPUT is replaced atomically, and only when the whole source went through.
    """
    output = Path(output)
    report = CleanReport(source=str(source), output=output)
    rejects = Rejects(skip_invalid=True)

    def cleaned() -> Iterator[dict]:
        for record in iter_records(source, split=split):
            report.read += 1
            try:
                if record.error is not None:
                    raise record.error
                dialogue, fired = clean_dialogue(record.data)
            except DataError as err:
                reject_or_raise(err, record, rejects, skip_invalid=skip_invalid, output=output)
                continue
            for rule in fired:
                (report.changed if dialogue is not None else report.removed).setdefault(rule, []).append(
                    record.row
                )
            if dialogue is not None:
                yield dialogue
        if report.read == 0:  # raised inside the writer, so an existing OUTPUT is left alone
            raise DataError("no dialogues to clean; check the path, split or dataset id", file=str(source))

    report.written = write_jsonl_atomic(output, cleaned())
    for r in rejects.rows:
        report.skipped.setdefault(r["reason"], []).append(r["row"])
    report.rejects_path = write_rejects(rejects, output)
    return report
