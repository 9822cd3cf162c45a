"""The LLM judge of MT-Bench's single-answer grading: which prompt, how it is filled, how the rating is read, and
the client that asks any OpenAI-compatible chat endpoint for it.

Everything here mirrors FastChat's `llm_judge` (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", https://arxiv.org/abs/2306.05685): math, reasoning and coding answers are graded against a reference
answer, turn 2 is graded with the whole conversation in view, the judge decodes greedily with up to 2048 tokens, and
the rating is the first `[[x]]` in the judgment (else the first `[x]`), -1 when there is none.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from zephyr.errors import ZephyrError

# Categories graded against a reference answer (FastChat's NEED_REF_CATS).
NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")

JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048
FAILED_SCORE = -1.0
_MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is better met by rerunning later

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


def judge_prompt_name(category: str, turn: int) -> str:
    """The name of the judge prompt for an answer of CATEGORY at TURN (1 or 2)."""
    name = "single-math-v1" if category in NEED_REF_CATEGORIES else "single-v1"
    return f"{name}-multi-turn" if turn == 2 else name


def judge_messages(
    prompt: dict, questions: list[str], answers: list[str], references: list[str] | None, turn: int
) -> list[dict]:
    """The chat messages that ask the judge to grade ANSWERS[TURN - 1]: the prompt's system message and its template
    filled with the user's QUESTIONS, the model's ANSWERS and, for reference-based prompts, the REFERENCES.

    Turn 1 fills {question}, {answer} (and {ref_answer_1}); turn 2 fills {question_1}, {question_2}, {answer_1},
    {answer_2} (and {ref_answer_1}, {ref_answer_2}), as FastChat's create_conv_single does.
    """
    fields = {}
    if references is not None:
        fields["ref_answer_1"] = references[0]
        if turn == 2:
            fields["ref_answer_2"] = references[1]
    if turn == 2:
        fields |= {
            "question_1": questions[0],
            "question_2": questions[1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
    else:
        fields |= {"question": questions[0], "answer": answers[0]}
    # str.format reads braces in the template only, so braces in answers (code) pass through unchanged.
    user = prompt["prompt_template"].format(**fields)
    messages = [{"role": "system", "content": prompt["system_prompt"]}] if prompt["system_prompt"] else []
    return messages + [{"role": "user", "content": user}]


def parse_rating(judgment: str) -> float:
    """The judge's rating: the first `[[x]]` in JUDGMENT, else the first `[x]`, else -1 (a failed judgment).

    "Rating: [[8.5]]" -> 8.5; "[7]" -> 7.0; "[[6]] ... [[9]]" -> 6.0 (FastChat's re.search takes the first).
    """
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    return float(match.group(1)) if match else FAILED_SCORE


# ---------------------------------------------------------------------------------------------------------------
# The client


class JudgeClient:
    """Asks `POST {base_url}/chat/completions` for judgments, with retries on rate limits and server errors.

    Safe to call from several threads: each call opens its own connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_attempts: int = 6,
        backoff_s: float = 2.0,
        max_backoff_s: float = 120.0,
        timeout_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ZephyrError(
                f"the judge URL '{base_url}' must start with http:// or https://, e.g. http://localhost:8000/v1"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.api_key_env = api_key_env  # named in the message of a 401
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.sleep = sleep

    def complete(self, messages: list[dict]) -> str:
        """The judge's reply to MESSAGES ("" when the endpoint returns no content, e.g. a content filter)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": JUDGE_TEMPERATURE,
                "max_tokens": JUDGE_MAX_TOKENS,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_failure = ""
        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code == 401:
                    raise ZephyrError(self._auth_message(detail)) from err
                if err.code != 429 and err.code < 500 and err.code != 408:
                    raise ZephyrError(
                        f"the judge at {self.url} refused the request with HTTP {err.code}: {detail}; check "
                        f"--judge-base-url and --judge-model"
                    ) from err
                last_failure = f"HTTP {err.code}: {detail}"
                wait = _retry_after(err.headers.get("Retry-After"))
                if wait is not None:
                    wait = min(wait, _MAX_RETRY_AFTER_S)
            except (OSError, http.client.HTTPException) as err:
                # URLError (an OSError) wraps refused connections and DNS failures; a connection dropped midway
                # is a ConnectionError, a cut-off body an http.client.IncompleteRead.
                reason = getattr(err, "reason", err)
                last_failure = f"connection failed: {reason}"
                wait = None
            if attempt < self.max_attempts:
                # Exponential backoff with jitter, so parallel callers do not retry in lockstep.
                backoff = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(
                    1.0, 1.25
                )
                self.sleep(backoff if wait is None else wait)
        raise ZephyrError(
            f"the judge at {self.url} kept failing after {self.max_attempts} attempts (last: {last_failure}); check "
            f"that the endpoint is up and run again: finished answers and judgments are kept"
        )

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise ZephyrError(
                f"the judge at {self.url} answered with something that is not a chat completion; check that "
                f"--judge-base-url is the API's base (usually ending in /v1)"
            ) from err
        return content if isinstance(content, str) else ""

    def _auth_message(self, detail: str) -> str:
        if self.api_key_env is None:
            return (
                f"the judge at {self.url} wants an API key (HTTP 401: {detail}); put it in an environment variable "
                f"and name that variable with --judge-api-key-env"
            )
        return (
            f"the judge at {self.url} refused the API key in ${self.api_key_env} (HTTP 401: {detail}); set "
            f"{self.api_key_env} to a valid key"
        )


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The message of an error response: OpenAI's {"error": {"message"}} when present, else the start of the body."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or "no details"
    try:
        message = json.loads(raw)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
        return str(message)[:300]
    except (ValueError, KeyError, TypeError):
        return raw.strip()[:300] or str(err.reason)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
