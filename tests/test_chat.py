"""`zephyr chat`: the loop keeps the conversation, obeys its commands, and Ctrl-C stops an answer, not the
program."""

from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest

from zephyr.chat import chat_loop
from zephyr.engine import Completion, SamplingParams


class ScriptedEngine:
    """Answers 'answer N' in one piece each; remembers the conversations it was asked to continue."""

    name = "scripted"

    def __init__(self):
        self.seen: list[list[dict]] = []

    def encode_chat(self, messages):
        self.seen.append([dict(m) for m in messages])
        return [0]

    def run(self, requests):
        text = f"answer {len(self.seen)}"
        requests[0].on_text(text)
        return [Completion(text, "stop", 1, 2)]


class EndlessEngine(ScriptedEngine):
    """Streams 'x' every 10 ms until cancelled (or 30 s)."""

    def run(self, requests):
        request, text = requests[0], ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if request.cancelled():
                return [Completion(text, "cancelled", 1, len(text))]
            request.on_text("x")
            text += "x"
            time.sleep(0.01)
        return [Completion(text, "length", 1, len(text))]


def _reader(lines):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_conversation_is_kept_and_commands_work():
    engine, out = ScriptedEngine(), []
    status = chat_loop(
        engine, SamplingParams(), system="Be brief.",
        read=_reader(["Hi", "And then?", "/reset", "Again", "/system Talk like a pirate.", "Ahoy", "/nope", "/exit", "never read"]),
        write=out.append,
    )  # fmt: skip
    assert status == 0
    assert engine.seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert engine.seen[1][1:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "And then?"},
    ]
    assert engine.seen[2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Again"},
    ]
    assert engine.seen[3] == [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Ahoy"},
    ]
    assert len(engine.seen) == 4
    text = "".join(out)
    assert "answer 2" in text and "unknown command /nope" in text and "conversation cleared" in text


@pytest.fixture
def terminal_sigint():
    """A terminal's Python has its default SIGINT handler (raise KeyboardInterrupt); interrupt_main() calls whatever
    handler is installed, and a server run earlier in this process may have left its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(terminal_sigint):
    engine, out = EndlessEngine(), []
    first_piece = threading.Event()

    def write(text: str) -> None:
        out.append(text)
        if text == "x" and not first_piece.is_set():
            first_piece.set()

    def press_ctrl_c() -> None:
        first_piece.wait(10)
        time.sleep(0.05)
        _thread.interrupt_main()  # what the terminal's SIGINT does

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    started = time.monotonic()
    status = chat_loop(engine, SamplingParams(), read=_reader(["Talk forever", "/exit"]), write=write)
    assert status == 0
    assert time.monotonic() - started < 10  # stopped long before the engine's own 30 s limit
    text = "".join(out)
    assert "[stopped]" in text
    assert text.count("x") >= 1


def test_ctrl_d_quits(capsys):
    assert chat_loop(ScriptedEngine(), SamplingParams(), read=_reader([])) == 0
    assert "chatting with scripted" in capsys.readouterr().out


def test_real_tiny_model_streams_an_answer(tiny_model_dir):
    from zephyr.engine import Engine

    engine, out = Engine.load(str(tiny_model_dir)), []
    params = engine.sampling(temperature=0, max_new_tokens=8)
    assert chat_loop(engine, params, read=_reader(["Hello!"]), write=out.append) == 0
    assert out[1] == "assistant> "
    streamed = "".join(out[2:-1])
    reference = engine.chat([{"role": "user", "content": "Hello!"}], params).text
    assert streamed.startswith(reference) and reference
