"""`run_mt_bench` end to end: a tiny random model answers three hand-written questions, a judge served over HTTP
from this test grades them, and the scores, files, resume and judge-client retries are checked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zephyr.engine import Engine
from zephyr.errors import ZephyrError
from zephyr.eval.judge import JudgeClient
from zephyr.eval.mt_bench import run_mt_bench

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write about the sea.", "Now shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 12 + 30?", "And 12 * 3?"]},
    {"question_id": 3, "category": "stem", "turns": ["What is a fox?", "GARBAGE please"]},
]
PROMPT_TEMPLATES = {
    "single-v1": "general Q:{question} A:{answer}",
    "single-math-v1": "math Q:{question} REF:{ref_answer_1} A:{answer}",
    "single-v1-multi-turn": "general-mt {question_1} {answer_1} || {question_2} {answer_2}",
    "single-math-v1-multi-turn": "math-mt {question_1} {ref_answer_1} || {question_2} {ref_answer_2}",
}


class JudgeServer:
    """An OpenAI-style /v1/chat/completions on localhost: scripted failures first, then a rating that depends on
    the prompt (8 for turn 1, 6 for turn 2, no rating at all when the prompt says GARBAGE)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.failures: list[tuple[int, dict]] = []  # (status, headers), answered before any rating
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such route"}})
                if server.failures:
                    status, headers = server.failures.pop(0)
                    return self._send(status, {"error": {"message": f"scripted {status}"}}, headers)
                prompt = body["messages"][-1]["content"]
                if "GARBAGE please" in prompt:
                    text = "I cannot rate this."
                else:
                    multi_turn = prompt.startswith(("general-mt", "math-mt"))
                    text = f"Fine. Rating: [[{6 if multi_turn else 8}]]"
                self._send(
                    200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                )

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge():
    server = JudgeServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine():
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return Engine(tiny_model(tok, seed=1), tok, name="tiny")


@pytest.fixture
def data_files(tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    prompts = tmp_path / "judge_prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"name": n, "type": "single", "system_prompt": f"system of {n}", "prompt_template": t,
                        "output_format": "[[rating]]"}) + "\n"
            for n, t in PROMPT_TEMPLATES.items()
        )
    )  # fmt: skip
    references = tmp_path / "gpt-4.jsonl"
    references.write_text(
        json.dumps({"question_id": 2, "choices": [{"index": 0, "turns": ["42", "36"]}]}) + "\n"
    )
    return {"questions": questions, "judge_prompts": prompts, "references": references}


def _run(engine, judge, data_files, output, **overrides):
    kwargs = dict(
        judge_base_url=judge.base_url, judge_model="judge-1", output_dir=output, max_new_tokens=4,
        batch_size=2, parallel=3, progress=False, log=lambda _: None, **data_files,
    )  # fmt: skip
    return run_mt_bench(engine, **(kwargs | overrides))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_scores_files_and_judge_requests(engine, judge, data_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekrit")
    out = tmp_path / "out"
    scores = _run(engine, judge, data_files, out, judge_api_key_env="TEST_JUDGE_KEY")

    # Ratings: every turn 1 gets 8, turns 2 get 6, except question 3's turn 2 (GARBAGE), which has no rating.
    # turn_1 = 8; turn_2 = (6 + 6) / 2 = 6; overall = (8 * 3 + 6 * 2) / 5 = 7.2; stem has only its turn 1: 8.
    assert scores == {
        "overall": pytest.approx(7.2), "turn_1": 8.0, "turn_2": 6.0,
        "categories": {"writing": 7.0, "math": 7.0, "stem": 8.0},
        "failed_judgments": 1, "model": "tiny", "judge_model": "judge-1", "questions": 3,
    }  # fmt: skip
    assert json.loads((out / "scores.json").read_text()) == scores
    assert (out / "categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    answers = {a["question_id"]: a for a in _read_jsonl(out / "answers.jsonl")}
    assert sorted(answers) == [1, 2, 3]
    assert {a["temperature"] for a in answers.values()} == {0.7, 0.0, 0.1}
    assert all(len(a["turns"]) == 2 and a["model"] == "tiny" for a in answers.values())

    judgments = {(j["question_id"], j["turn"]): j for j in _read_jsonl(out / "judgments.jsonl")}
    assert sorted(judgments) == [(q, t) for q in (1, 2, 3) for t in (1, 2)]
    assert judgments[(3, 2)]["score"] == -1 and judgments[(3, 2)]["judgment"] == "I cannot rate this."
    assert judgments[(2, 1)]["judge_prompt"] == "single-math-v1"
    assert judgments[(1, 2)]["judge_prompt"] == "single-v1-multi-turn"

    # The requests: FastChat's judge settings, the system prompt, and prompts filled with the model's own answers.
    assert len(judge.requests) == 6
    assert all(
        r["temperature"] == 0 and r["max_tokens"] == 2048 and r["model"] == "judge-1" for r in judge.requests
    )
    assert all(h["Authorization"] == "Bearer sekrit" for h in judge.headers)
    by_prompt = {r["messages"][-1]["content"]: r for r in judge.requests}
    a2 = answers[2]["turns"]
    math_turn_2 = "math-mt What is 12 + 30? 42 || And 12 * 3? 36"
    assert math_turn_2 in by_prompt
    assert by_prompt[math_turn_2]["messages"][0] == {
        "role": "system",
        "content": "system of single-math-v1-multi-turn",
    }
    assert f"math Q:What is 12 + 30? REF:42 A:{a2[0]}" in by_prompt


def test_turn_2_is_asked_after_the_models_own_turn_1_answer(engine, judge, data_files, tmp_path, monkeypatch):
    prompts = []
    original = engine.encode_chat
    monkeypatch.setattr(
        engine, "encode_chat", lambda messages: prompts.append(list(messages)) or original(messages)
    )
    _run(engine, judge, data_files, tmp_path / "out")
    answers = {a["question_id"]: a for a in _read_jsonl(tmp_path / "out" / "answers.jsonl")}
    second_turns = [m for m in prompts if len(m) == 3]
    assert len(second_turns) == 3
    for messages in second_turns:
        q = next(q for q in QUESTIONS if q["turns"][0] == messages[0]["content"])
        assert messages == [
            {"role": "user", "content": q["turns"][0]},
            {"role": "assistant", "content": answers[q["question_id"]]["turns"][0]},
            {"role": "user", "content": q["turns"][1]},
        ]


def test_rerun_resumes_without_answering_or_judging_again(engine, judge, data_files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = _run(engine, judge, data_files, out)
    calls_after_first = len(judge.requests)
    answers_before = (out / "answers.jsonl").read_text()

    runs = []
    monkeypatch.setattr(engine, "run", lambda requests: runs.append(requests) or [])
    # Question 3's turn 2 failed (no rating): FastChat's cache judges it again, and nothing else.
    again = _run(engine, judge, data_files, out)
    assert runs == []
    assert len(judge.requests) == calls_after_first + 1
    assert judge.requests[-1]["messages"][-1]["content"].startswith("general-mt What is a fox?")
    assert again == first
    assert (out / "answers.jsonl").read_text() == answers_before


def test_rerun_after_a_crash_mid_line_judges_only_the_lost_turn(engine, judge, data_files, tmp_path):
    out = tmp_path / "out"
    _run(engine, judge, data_files, out)
    lines = (out / "judgments.jsonl").read_text().splitlines()
    good = [line for line in lines if json.loads(line)["score"] != -1]
    lost = json.loads(good[-1])
    (out / "judgments.jsonl").write_text("\n".join(good[:-1]) + "\n" + good[-1][:25])  # cut mid-line
    warnings = []
    judge.requests.clear()
    _run(engine, judge, data_files, out, log=warnings.append)
    asked = {r["messages"][-1]["content"] for r in judge.requests}
    assert len(judge.requests) == 2  # the lost judgment and the failed GARBAGE one
    assert any("half-written" in w for w in warnings)
    records = _read_jsonl(out / "judgments.jsonl")
    assert sum((r["question_id"], r["turn"]) == (lost["question_id"], lost["turn"]) for r in records) == 1
    assert any(lost["user_prompt"] == prompt for prompt in asked)


def test_answers_of_another_model_in_the_output_folder_are_refused(engine, judge, data_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "answers.jsonl").write_text(
        json.dumps({"question_id": 1, "model": "other", "turns": ["a", "b"]}) + "\n"
    )
    with pytest.raises(ZephyrError, match="answers of model 'other', not 'tiny'"):
        _run(engine, judge, data_files, out)


def test_missing_api_key_variable_fails_before_answering(engine, judge, data_files, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ZephyrError, match="NO_SUCH_JUDGE_KEY, but it is not set"):
        _run(engine, judge, data_files, tmp_path / "out", judge_api_key_env="NO_SUCH_JUDGE_KEY")
    assert not (tmp_path / "out").exists()


def test_a_judge_that_keeps_failing_stops_the_run_and_keeps_the_answers(engine, judge, data_files, tmp_path):
    judge.failures = [(503, {"Retry-After": "0"})] * 100
    with pytest.raises(
        ZephyrError, match=r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions kept failing.*503"
    ):
        _run(engine, judge, data_files, tmp_path / "out", parallel=1)
    assert len(_read_jsonl(tmp_path / "out" / "answers.jsonl")) == 3


# ---------------------------------------------------------------------------------------------------------------
# The judge client


MESSAGES = [{"role": "user", "content": "rate"}]


def test_client_retries_429_honouring_retry_after_then_succeeds(judge):
    judge.failures = [(429, {"Retry-After": "3"}), (502, {})]
    waits = []
    client = JudgeClient(judge.base_url, "judge-1", sleep=waits.append, backoff_s=0.5)
    assert client.complete(MESSAGES) == "Fine. Rating: [[8]]"
    assert len(judge.requests) == 3
    assert waits[0] == 3.0  # the server's Retry-After
    assert 1.0 <= waits[1] / 1.0 <= 1.25  # then backoff for attempt 2: 0.5 * 2**1, with up to 25% jitter


def test_client_gives_up_after_bounded_attempts_naming_url_and_status(judge):
    judge.failures = [(500, {})] * 10
    waits = []
    client = JudgeClient(judge.base_url, "judge-1", max_attempts=4, backoff_s=1.0, sleep=waits.append)
    with pytest.raises(
        ZephyrError, match=r"/v1/chat/completions kept failing after 4 attempts \(last: HTTP 500"
    ):
        client.complete(MESSAGES)
    assert len(judge.requests) == 4
    # Waits between the 4 attempts double: 1, 2, 4 seconds, each with up to 25% jitter.
    assert all(1 <= w / b <= 1.25 for w, b in zip(waits, [1, 2, 4], strict=True))


def test_client_stops_at_once_on_401_naming_the_key_variable(judge):
    judge.failures = [(401, {})] * 3
    client = JudgeClient(judge.base_url, "judge-1", api_key="bad", api_key_env="MY_KEY", sleep=lambda s: None)
    with pytest.raises(ZephyrError, match=r"refused the API key in \$MY_KEY .*set MY_KEY to a valid key"):
        client.complete(MESSAGES)
    assert len(judge.requests) == 1


def test_client_does_not_retry_other_client_errors(judge):
    client = JudgeClient(judge.base_url.replace("/v1", "/v2"), "judge-1", sleep=lambda s: None)
    with pytest.raises(ZephyrError, match="HTTP 404: no such route"):
        client.complete(MESSAGES)
    assert len(judge.requests) == 1


def test_client_retries_connection_errors_then_names_the_url(judge):
    url = judge.base_url
    judge.close()  # nothing listens on the port any more
    waits = []
    client = JudgeClient(url, "judge-1", max_attempts=3, sleep=waits.append)
    with pytest.raises(ZephyrError, match=r"kept failing after 3 attempts \(last: connection failed"):
        client.complete(MESSAGES)
    assert len(waits) == 2


def test_answers_of_other_settings_or_model_files_are_not_reused(
    engine, judge, data_files, tmp_path, monkeypatch
):
    """The reproduction: a rerun reused the answers after --seed or --max-new-tokens changed, or after the model at
    the same path was retrained. answers.run.json names both; a mismatch is refused, and overwrite starts over."""
    out = tmp_path / "out"
    _run(engine, judge, data_files, out)
    assert json.loads((out / "answers.run.json").read_text())["settings"]["seed"] == 0
    with pytest.raises(
        ZephyrError, match=r"another model or other settings \(settings.seed: 0 then, 1 now\)"
    ):
        _run(engine, judge, data_files, out, seed=1)
    with pytest.raises(ZephyrError, match=r"settings.max_new_tokens: 4 then, 5 now"):
        _run(engine, judge, data_files, out, max_new_tokens=5)
    monkeypatch.setattr(engine, "identity", {"files": {"model.safetensors": [1, 2]}})
    with pytest.raises(ZephyrError, match=r"model.files: null then.*Pass --overwrite"):
        _run(engine, judge, data_files, out)

    judged_before = len(judge.requests)
    _run(engine, judge, data_files, out, overwrite=True)
    assert len(judge.requests) > judged_before + 1  # every turn judged again, not just the failed one
    assert json.loads((out / "answers.run.json").read_text())["model"] == {
        "files": {"model.safetensors": [1, 2]}
    }
