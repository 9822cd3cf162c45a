"""The shared generation engine: batched decoding equals transformers' own greedy generation, streaming shows
exactly the final text, stop strings, budgets, seeds, cancellation, and the sampling distribution."""

from __future__ import annotations

import pytest
import torch

from zephyr.engine import Engine, Request, RequestError, SamplingParams, check_messages, truncated_probs

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How can I help you?"}],
    [{"role": "user", "content": "Write exactly five words about the sea, please, and nothing else."}],
]


@pytest.fixture(scope="module")
def engine():
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return Engine(tiny_model(tok, seed=3), tok, name="tiny")


def _reference_greedy(engine: Engine, messages, max_new_tokens: int) -> str:
    enc = engine.tokenizer(engine.render_chat(messages), return_tensors="pt", add_special_tokens=False)
    out = engine.model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id
    )
    return engine.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_batched_greedy_equals_transformers_generate_one_by_one(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    done = engine.run([Request(engine.encode_chat(m), params) for m in CONVERSATIONS])
    for messages, completion in zip(CONVERSATIONS, done, strict=True):
        assert completion.text == _reference_greedy(engine, messages, 12)
        assert completion.prompt_tokens == len(engine.encode_chat(messages))
        assert completion.finish_reason in {"stop", "length"}
        if completion.finish_reason == "length":
            assert completion.completion_tokens == 12


def test_streamed_pieces_join_to_the_final_text(engine):
    pieces: list[str] = []
    done = engine.chat(
        CONVERSATIONS[0], SamplingParams(max_new_tokens=20, temperature=0.9, seed=5), on_text=pieces.append
    )
    assert pieces and "".join(pieces) == done.text


def test_stop_string_cuts_the_text_and_is_never_streamed(engine):
    free = engine.chat(CONVERSATIONS[2], SamplingParams(max_new_tokens=30, temperature=1.0, seed=11))
    assert len(free.text) > 6
    stop = free.text[3:6]  # a string the unconstrained answer produces
    pieces: list[str] = []
    cut = engine.chat(
        CONVERSATIONS[2],
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=11, stop=(stop,)),
        on_text=pieces.append,
    )
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == cut.text


def test_budget_ends_with_length(engine):
    done = engine.chat(CONVERSATIONS[1], SamplingParams(max_new_tokens=3, temperature=1.0, seed=0, top_k=5))
    assert (done.finish_reason, done.completion_tokens) in {
        ("length", 3),
        ("stop", 0),
        ("stop", 1),
        ("stop", 2),
    }


def test_same_seed_same_answer_other_seed_usually_differs(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=42)
    a = engine.chat(CONVERSATIONS[0], params).text
    b = engine.chat(CONVERSATIONS[0], params).text
    others = {
        engine.chat(CONVERSATIONS[0], SamplingParams(max_new_tokens=16, temperature=1.0, seed=s)).text
        for s in range(4)
    }
    assert a == b
    assert len(others) > 1


def test_cancelled_row_leaves_the_batch_and_others_finish(engine):
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    # eos suppressed by a budget the greedy tiny model reaches; the second row must be unaffected by the first
    done = engine.run(
        [
            Request(engine.encode_chat(CONVERSATIONS[0]), params, cancelled=cancel_after_two),
            Request(engine.encode_chat(CONVERSATIONS[1]), params),
        ]
    )
    assert done[0].finish_reason in {"cancelled", "stop"}
    if done[0].finish_reason == "cancelled":
        assert done[0].completion_tokens == 2
    assert done[1].text == _reference_greedy(engine, CONVERSATIONS[1], 10)


def test_prompt_longer_than_the_context_is_a_request_error(engine):
    long = [{"role": "user", "content": "fox " * (engine.context_length + 10)}]
    with pytest.raises(RequestError) as err:
        engine.encode_chat(long)
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"


def test_generate_batches_decodes_a_batch_turn_by_turn_each_after_its_own_answer(engine, monkeypatch):
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    sizes = []
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda requests: sizes.append(len(requests)) or run(requests))
    follow_ups = [["And 12 * 3?"], [], ["Shorter.", "Shorter still."]]
    batches = list(engine.generate_batches(CONVERSATIONS, params, batch_size=2, follow_ups=follow_ups))
    assert [b.indices for b in batches] == [range(0, 2), range(2, 3)]
    # batch 1: both first turns together, then conversation 0's second; batch 2: conversation 2's three turns
    assert sizes == [2, 1, 1, 1, 1]
    answers = [turns for b in batches for turns in b.answers]
    assert [len(turns) for turns in answers] == [2, 1, 3]
    history = list(CONVERSATIONS[2])
    for turn, done in enumerate(answers[2]):
        if turn:
            history += [
                {"role": "assistant", "content": answers[2][turn - 1].text.strip()},
                {"role": "user", "content": follow_ups[2][turn - 1]},
            ]
        assert done.text == _reference_greedy(engine, history, 6)


def test_generate_batches_checks_every_first_prompt_before_decoding_any(engine, monkeypatch):
    long = [{"role": "user", "content": "fox " * (engine.context_length + 10)}]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    runs = []
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda requests: runs.append(requests) or run(requests))
    with pytest.raises(RequestError):
        engine.generate_batches([CONVERSATIONS[0], long], params, batch_size=1)
    assert runs == []

    told = []
    batches = engine.generate_batches(
        [long, CONVERSATIONS[0]], params, batch_size=2, follow_ups=[["Shorter."], []],
        on_bad_prompt=lambda i, turn, err: told.append((i, turn, err.code)),
    )  # fmt: skip
    assert told == [(0, 0, "context_length_exceeded")] and runs == []
    ((skipped, answered),) = [b.answers for b in batches]
    # the skipped turn is answered "", and the conversation goes on (its second turn is still too long)
    assert told[1:] == [(0, 1, "context_length_exceeded")]
    assert [(d.text, d.finish_reason) for d in skipped] == [("", "context_length_exceeded")] * 2
    assert answered[0].text == _reference_greedy(engine, CONVERSATIONS[0], 4)


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
        (["hi"], "messages[0]"),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(RequestError) as err:
        check_messages(messages)
    assert err.value.param == param


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert check_messages(parts) == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    "overrides, param",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_tokens"),
     ({"top_k": -2}, "top_k"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"seed": "x"}, "seed")],
)  # fmt: skip
def test_bad_sampling_values_name_the_field(engine, overrides, param):
    with pytest.raises(RequestError) as err:
        engine.sampling(**overrides)
    assert err.value.param == param


def test_sampling_defaults_come_from_the_generation_config():
    from transformers import GenerationConfig

    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    card = GenerationConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.95, max_new_tokens=256)
    eng = Engine(tiny_model(tok), tok, name="t", generation_config=card)
    assert eng.defaults == SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.95, top_k=50)
    assert eng.sampling(temperature=0, stop="x").temperature == 0
    assert eng.sampling(stop="x").stop == ("x",)
    greedy = Engine(tiny_model(tok), tok, name="t", generation_config=GenerationConfig(do_sample=False))
    assert greedy.defaults.temperature == 0.0


def test_truncated_probs_by_hand():
    """logits log([0.5, 0.3, 0.15, 0.05]) at temperature 1:
    top_k=2 keeps 0.5, 0.3 -> renormalised 0.625, 0.375;
    top_p=0.8 keeps the smallest prefix reaching 0.8: 0.5 + 0.3 -> same as top_k=2;
    top_p=0.5 keeps just the first (0.5 already reaches it)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    expected = torch.tensor([0.625, 0.375, 0.0, 0.0])
    torch.testing.assert_close(truncated_probs(logits, 1.0, 2, 1.0), expected)
    torch.testing.assert_close(truncated_probs(logits, 1.0, 0, 0.8), expected)
    torch.testing.assert_close(truncated_probs(logits, 1.0, 0, 0.5), torch.tensor([1.0, 0, 0, 0]))
    # temperature 0.5 squares the odds before normalising: 0.25, 0.09 -> 0.735..., 0.264...
    probs = truncated_probs(logits, 0.5, 2, 1.0)
    torch.testing.assert_close(probs[:2], torch.tensor([0.25, 0.09]) / 0.34)


def test_a_temperature_too_small_to_divide_by_is_greedy(engine):
    greedy = engine.chat(CONVERSATIONS[0], SamplingParams(max_new_tokens=8, temperature=0.0))
    tiny = engine.chat(CONVERSATIONS[0], SamplingParams(max_new_tokens=8, temperature=1e-7, seed=1))
    assert tiny.text == greedy.text
