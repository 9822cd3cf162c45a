"""`zephyr chat`: talk to a model in the terminal, the answer streamed as it is generated.

    zephyr chat [--model outputs/dpo] [--system "You are a pirate."] [--temperature 0.7]

Commands at the prompt: `/reset` forgets the conversation, `/system TEXT` sets the system prompt (and resets),
`/exit` (or Ctrl-D) quits. Ctrl-C while an answer streams stops that answer and keeps the conversation; the part
already shown stays in it, so the model sees what the user saw.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from zephyr.engine import Completion, Engine, Request, RequestError, SamplingParams

HELP = "commands: /reset  /system TEXT  /exit   (Ctrl-C stops an answer, Ctrl-D quits)"


class Conversation:
    """The messages so far, with an optional system prompt in front."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self, system: str | None = None) -> None:
        if system is not None:
            self.system = system or None
        self.turns = []


def answer(
    engine: Engine, messages: list[dict], params: SamplingParams, write: Callable[[str], None]
) -> Completion:
    """Stream one answer to WRITE; Ctrl-C (KeyboardInterrupt in this thread) stops it at the next token.

    Generation runs in a worker thread so that the interrupt lands here, in a wait, and not inside a forward pass.
    """
    stop, finished = threading.Event(), threading.Event()
    result: dict = {}

    def work() -> None:
        try:
            result["done"] = engine.run(
                [Request(engine.encode_chat(messages), params, on_text=write, cancelled=stop.is_set)]
            )[0]
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err
        finally:
            finished.set()

    threading.Thread(target=work, daemon=True).start()
    # An Event, not Thread.join: an interrupt inside join can leave the thread wrongly marked as finished.
    while not finished.is_set():
        try:
            finished.wait(timeout=0.1)
        except KeyboardInterrupt:
            stop.set()
    if "error" in result:
        raise result["error"]
    return result["done"]


def chat_loop(
    engine: Engine,
    params: SamplingParams,
    *,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> int:
    """The read-answer loop; returns the exit status."""
    if write is None:

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    conversation = Conversation(system)
    write(f"chatting with {engine.name}; {HELP}\n")
    while True:
        try:
            line = read("\nyou> ")
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n(type /exit or press Ctrl-D to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conversation.reset()
            write("(conversation cleared)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            conversation.reset(text[len("/system") :].strip())
            write(f"(system prompt {'set' if conversation.system else 'cleared'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        conversation.turns.append({"role": "user", "content": line})
        write("assistant> ")
        try:
            done = answer(engine, conversation.messages(), params, write)
        except RequestError as err:
            conversation.turns.pop()
            write(f"\n(error: {err}; try /reset)\n")
            continue
        if done.finish_reason == "cancelled":
            write(" [stopped]")
        elif done.finish_reason == "length":
            write(" [cut: max_new_tokens reached]")
        write("\n")
        conversation.turns.append({"role": "assistant", "content": done.text})
