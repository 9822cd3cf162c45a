"""The OpenAI API as the official `openai` client sees it, against a real server over a tiny random model.

Expected answers come from the engine itself, run directly: the server must hand back exactly what one
`engine.run` of the same prompt and sampling gives (the tiny model's greedy answer is a run of newlines; sampled
answers with a seed are fixed strings of junk).
"""

from __future__ import annotations

import json

import pytest

from zephyr.engine import Request
from zephyr.serve import ServeLimits, create_app

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server(tiny_engine, start_server):
    server = start_server(create_app(tiny_engine, ServeLimits(batch_wait_ms=1)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server, client_for):
    return client_for(server)


def direct(engine, **sampling) -> str:
    """The engine's own answer to MESSAGES."""
    ids = engine.encode_chat(MESSAGES)
    return engine.run([Request(ids, engine.sampling(**sampling))])[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "zephyr")


def test_health(server):
    status, _, body = server.request("GET", "/health")
    assert status == 200
    assert body == {"status": "ok", "model": "tiny", "context_length": 512, "queue_depth": 0, "running": 0}


def test_non_streamed_answer_has_openai_shape_and_engine_defaults(client, tiny_engine):
    # No temperature given: the engine's default (greedy for the tiny model's generation config) applies.
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == "tiny"
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert choice.message.content == direct(tiny_engine, max_new_tokens=6)
    prompt_tokens = len(tiny_engine.encode_chat(MESSAGES))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 6)
    assert answer.usage.total_tokens == prompt_tokens + 6


def test_streamed_answer_equals_the_non_streamed_one(client, tiny_engine):
    settings = {"temperature": 1.0, "seed": 7, "max_tokens": 12}
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **settings
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == direct(tiny_engine, temperature=1.0, seed=7, max_new_tokens=12)
    assert (
        streamed
        == client.chat.completions.create(model="tiny", messages=MESSAGES, **settings)
        .choices[0]
        .message.content
    )


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    status, headers, raw = server.request(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    parsed = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [p["choices"][0]["finish_reason"] for p in parsed][-1] == "length"
    assert all("usage" not in p for p in parsed)  # only with stream_options.include_usage


def test_n_choices_use_seed_plus_index(client, tiny_engine):
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, temperature=1.0, seed=7, max_tokens=10
    )
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1]
    assert texts == [direct(tiny_engine, temperature=1.0, seed=s, max_new_tokens=10) for s in (7, 8)]
    assert texts[0] != texts[1]
    assert answer.usage.completion_tokens == 20


def test_streamed_n_choices_interleave_by_index(client, tiny_engine):
    chunks = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, temperature=1.0, seed=7, max_tokens=10, stream=True
    )
    texts, finishes = ["", ""], [None, None]
    for c in chunks:
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [direct(tiny_engine, temperature=1.0, seed=s, max_new_tokens=10) for s in (7, 8)]
    assert finishes == ["length", "length"]


def test_same_seed_same_text_other_seed_other_text(client):
    def ask(seed):
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=16
        )
        return answer.choices[0].message.content

    assert ask(3) == ask(3)
    assert ask(3) != ask(4)


def test_stop_string_cuts_the_answer(client, tiny_engine):
    full = direct(tiny_engine, temperature=1.0, seed=7, max_new_tokens=30)
    stop = full[4:7]
    assert full.find(stop) == 4  # the stop first occurs at character 4, so the answer is full[:4]
    for given in (stop, [stop, "never-seen"]):
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, seed=7, max_tokens=30, stop=given
        )
        assert answer.choices[0].message.content == full[:4]
        assert answer.choices[0].finish_reason == "stop"


def test_top_k_1_is_greedy(client, tiny_engine):
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=1.5, max_tokens=8, extra_body={"top_k": 1}
    )
    assert answer.choices[0].message.content == direct(tiny_engine, temperature=0.0, max_new_tokens=8)


def test_max_completion_tokens(client):
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3)
    assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"
