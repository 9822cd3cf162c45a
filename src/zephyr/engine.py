"""The one generation engine behind `zephyr chat`, `zephyr generate`, `zephyr serve` and `zephyr eval mt-bench`.

    engine = Engine.load("outputs/dpo")                        # or None: the embedded model
    params = engine.sampling(temperature=0.7, max_new_tokens=256)
    done = engine.run([Request(engine.encode_chat(messages), params, on_text=print)])

A batch of requests is decoded together: prompts left-padded, one prefill, then one token per step for every
unfinished row, each row with its own temperature, top-k, top-p, stop strings, seed and token budget. A row leaves
the batch (and the KV cache) the moment it ends: eos, a stop string, its budget, or its `cancelled()` turning true
(a client that went away). Text is handed to `on_text` as soon as it is final: held back while it could still be
the start of a stop string or an unfinished UTF-8 character, so a streamed answer never shows what the
non-streamed one would not.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from zephyr.errors import ZephyrError
from zephyr.fetch import EMBEDDED_MODEL
from zephyr.models import check_vocabulary, load_model, load_tokenizer, model_identity, resolve_model

ROLES = ("system", "user", "assistant")
MIN_TEMPERATURE = 1e-4


class RequestError(ZephyrError):
    """A request the engine cannot serve as given; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one answer. temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called with each new piece of final text
    cancelled: Callable[[], bool] | None = None  # polled once per step


@dataclass
class Completion:
    text: str
    # "stop" (eos or a stop string), "length" (token budget), "cancelled", or from `generate_batches` the code of a
    # prompt it was told to skip (e.g. "context_length_exceeded")
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class AnsweredBatch(NamedTuple):
    """One batch from `Engine.generate_batches`."""

    indices: range  # positions of the batch's conversations in the input
    # answers[k][t]: conversation indices[k]'s answer to its turn t (0: the first)
    answers: list[list[Completion]]


@dataclass
class _Row:
    """Decoding state of one request in the running batch."""

    request: Request
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already passed to on_text
    text: str = ""
    finish_reason: str | None = None


class Engine:
    """A causal LM, its tokenizer and chat template, and the sampling defaults of its generation config.

    Thread-safe: `run` holds a lock, so callers from several threads (a server's workers) take turns; the server
    batches concurrent requests into one `run` call itself.
    """

    def __init__(self, model, tokenizer, *, name: str, generation_config=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        # What made this engine's answers what they are (resumable outputs are keyed by it): the model's files and
        # dtype when loaded from a folder or the hub, else just its name.
        self.identity: dict = {"name": name}
        self.device = next(model.parameters()).device
        self.context_length = _context_length(model.config, tokenizer)
        self.eos_ids = _eos_ids(tokenizer, generation_config or getattr(model, "generation_config", None))
        self.defaults = _defaults(generation_config or getattr(model, "generation_config", None))
        self._lock = threading.Lock()
        # A fast tokenizer is not safe to use from two threads at once (a server encodes on its event loop while
        # the worker decodes): every use goes through this lock.
        self._tokenizer_lock = threading.Lock()
        # transformers 5.x renamed the forward argument `past_key_values` to `cache`.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
    ) -> Engine:
        """The engine for MODEL: a folder, a hub id, or None for the embedded model.

        The device defaults to the first GPU when there is one; the dtype to bf16 on a GPU and the saved dtype on
        a CPU (bf16 matrix products are slow on CPUs without AVX512-BF16 / AMX).
        """
        from transformers import GenerationConfig

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None and device.startswith("cuda"):
            dtype = "bfloat16"
        resolved = resolve_model(model)
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        if not tokenizer.chat_template:
            raise ZephyrError(
                f"the tokenizer of {resolved} has no chat template, so chat messages cannot be rendered; use a "
                f"chat model or a Zephyr training output (they save one)"
            )
        lm = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
        check_vocabulary(lm, tokenizer)
        try:
            generation = GenerationConfig.from_pretrained(resolved)
        except OSError:
            generation = lm.generation_config
        engine = cls(lm, tokenizer, name=name or model or EMBEDDED_MODEL, generation_config=generation)
        engine.identity = {"files": model_identity(model), "dtype": str(lm.dtype).removeprefix("torch.")}
        return engine

    # ----------------------------------------------------------------------------------------------- prompts

    def sampling(self, **overrides) -> SamplingParams:
        """SamplingParams from the generation config's defaults, with OVERRIDES (None values ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in given:
            given["stop"] = tuple([given["stop"]] if isinstance(given["stop"], str) else given["stop"])
        params = replace(self.defaults, **given)
        _check_sampling(params)
        return params

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The prompt text for MESSAGES, ending with the assistant's turn header."""
        checked = check_messages(messages)
        try:
            with self._tokenizer_lock:
                return self.tokenizer.apply_chat_template(checked, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a template's own raise_exception(), e.g. roles out of order
            raise RequestError(f"the chat template rejected the messages: {err}", param="messages") from err

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of MESSAGES' prompt; a RequestError when it leaves no room to answer in the context."""
        prompt = self.render_chat(messages)
        with self._tokenizer_lock:
            # verbose=False: an over-long prompt is ours to report (below), not a tokenizer warning in the log
            ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= self.context_length:
            raise RequestError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.context_length}; shorten the "
                f"messages",
                param="messages",
                code="context_length_exceeded",
            )
        return ids

    # ------------------------------------------------------------------------------------------- generation

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, **callbacks) -> Completion:
        """One answer to MESSAGES (callbacks: on_text, cancelled)."""
        request = Request(self.encode_chat(messages), params or self.defaults, **callbacks)
        return self.run([request])[0]

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Decode REQUESTS as one batch; completions in the same order."""
        if not requests:
            return []
        with self._lock, torch.inference_mode():
            return self._run(list(requests))

    def generate_batches(
        self,
        conversations: Sequence[Sequence[dict]],
        params: SamplingParams,
        *,
        batch_size: int,
        follow_ups: Sequence[Sequence[str]] | None = None,
        on_bad_prompt: Callable[[int, int, RequestError], None] | None = None,
    ) -> Iterator[AnsweredBatch]:
        """Answer CONVERSATIONS (each ending with a user turn) BATCH_SIZE at a time, yielding each batch as soon as
        it is decoded, so that a caller can save it before the next one starts.

        FOLLOW_UPS[i] are more user turns for conversation i, each asked after the model's own previous answer
        (stripped of surrounding whitespace, as FastChat's gen_model_answer keeps it): a batch decodes all its first
        turns together, then all its second turns, and so on.

        Every first prompt is encoded by this call, before anything is decoded, so a prompt the engine cannot take
        stops the work before it starts: a RequestError, or ON_BAD_PROMPT(i, turn, error) when given (turn 0 is the
        first). When ON_BAD_PROMPT returns instead of raising, that turn is answered "" with the error's code as its
        finish_reason, and the conversation goes on.
        """
        histories = [list(messages) for messages in conversations]
        follow_ups = follow_ups if follow_ups is not None else [()] * len(histories)
        first = [self._encode_turn(h, i, 0, on_bad_prompt) for i, h in enumerate(histories)]
        return self._answer_batches(histories, follow_ups, first, params, batch_size, on_bad_prompt)

    def _answer_batches(self, histories, follow_ups, first, params, batch_size, on_bad_prompt):
        for start in range(0, len(histories), batch_size):
            indices = range(start, min(start + batch_size, len(histories)))
            answers: dict[int, list[Completion]] = {i: [] for i in indices}
            for turn in range(1 + max(len(follow_ups[i]) for i in indices)):
                prompts: dict[int, list[int] | RequestError] = {}
                for i in indices:
                    if turn == 0:
                        prompts[i] = first[i]
                    elif turn <= len(follow_ups[i]):
                        histories[i] += [
                            {"role": "assistant", "content": answers[i][-1].text.strip()},
                            {"role": "user", "content": follow_ups[i][turn - 1]},
                        ]
                        prompts[i] = self._encode_turn(histories[i], i, turn, on_bad_prompt)
                asked = [i for i, prompt in prompts.items() if not isinstance(prompt, RequestError)]
                completions = iter(self.run([Request(prompts[i], params) for i in asked]))
                for i, prompt in prompts.items():
                    skipped = isinstance(prompt, RequestError)
                    answers[i].append(
                        Completion("", prompt.code or "error", 0, 0) if skipped else next(completions)
                    )
            yield AnsweredBatch(indices, [answers[i] for i in indices])

    def _encode_turn(self, messages, index: int, turn: int, on_bad_prompt) -> list[int] | RequestError:
        """MESSAGES' prompt ids, or the RequestError that ON_BAD_PROMPT was told of and let pass."""
        try:
            return self.encode_chat(messages)
        except RequestError as err:
            if on_bad_prompt is None:
                raise
            on_bad_prompt(index, turn, err)
            return err

    def _run(self, requests: list[Request]) -> list[Completion]:
        from transformers import DynamicCache

        rows = [_Row(r, _generator(r.params.seed, self.device)) for r in requests]
        budgets = [min(r.params.max_new_tokens, self.context_length - len(r.prompt_ids)) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token goes in the same column
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention[i, width - len(r.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        active = list(range(len(rows)))  # batch slot -> row index
        while active:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                **{self._cache_arg: cache},
                use_cache=True,
                logits_to_keep=1,
            )
            next_ids = self._sample(out.logits[:, -1, :].float(), [rows[i] for i in active])
            keep = []
            for slot, i in enumerate(active):
                row = rows[i]
                self._advance(row, next_ids[slot], budgets[i])
                if row.finish_reason is None:
                    keep.append(slot)
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                attention, positions, next_ids = attention[index], positions[index], next_ids[index]
                active = [active[s] for s in keep]
            input_ids = next_ids[:, None]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
        return [
            Completion(row.text, row.finish_reason, len(row.request.prompt_ids), len(row.ids)) for row in rows
        ]

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token per row. logits: [rows, vocab] fp32 -> [rows] long."""
        next_ids = logits.argmax(-1)
        for slot, row in enumerate(rows):
            p = row.request.params
            if p.temperature >= MIN_TEMPERATURE:  # below it, logits / T overflows: greedy is the limit anyway
                probs = truncated_probs(logits[slot], p.temperature, p.top_k, p.top_p)
                next_ids[slot] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return next_ids

    def _advance(self, row: _Row, token: torch.Tensor, budget: int) -> None:
        """Append TOKEN to ROW, emit the text that became final, and set finish_reason when the row ends."""
        request = row.request
        token_id = int(token)
        if token_id in self.eos_ids:
            row.finish_reason = "stop"
        else:
            row.ids.append(token_id)
            with self._tokenizer_lock:
                row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = _first_stop(row.text, request.params.stop)
            if cut is not None:
                row.text, row.finish_reason = row.text[:cut], "stop"
            elif len(row.ids) >= budget:
                row.finish_reason = "length"
            elif request.cancelled is not None and request.cancelled():
                row.finish_reason = "cancelled"
        if row.finish_reason is not None:
            final = len(row.text)
        else:
            final = _final_length(row.text, request.params.stop)
        if request.on_text is not None and final > row.sent:
            request.on_text(row.text[row.sent : final])
        row.sent = max(row.sent, final)


# --------------------------------------------------------------------------------------------------- helpers


def check_messages(messages) -> list[dict]:
    """MESSAGES as plain {"role", "content"} dicts, or a RequestError naming the first bad field.

    Content may be a string or OpenAI's list of text parts ([{"type": "text", "text": ...}]), which are joined.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{where}.role is {role!r}; use one of {', '.join(ROLES)}", param=f"{where}.role"
            )
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise RequestError(
                        f"{where}.content[{j}] must be a text part {{type: text, text: ...}}; only text is "
                        f"supported",
                        param=f"{where}.content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", param=f"{where}.content")
        checked.append({"role": role, "content": content})
    return checked


def truncated_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution over the vocabulary after temperature, top-k, then top-p (nucleus) truncation.

    logits: [vocab] -> probs: [vocab], zero outside the kept tokens. top-p keeps the smallest set of most likely
    tokens whose mass reaches top_p (always at least one), as transformers' TopPLogitsWarper does.
    """
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = mass_before >= top_p
        drop[0] = False
        probs = probs.scatter(0, order[drop], 0.0)
        probs = probs / probs.sum()
    return probs


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _final_length(text: str, stops: Sequence[str]) -> int:
    """How much of TEXT can be shown now: not an unfinished UTF-8 character at the end, nor a tail that may
    still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _context_length(config, tokenizer) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def _eos_ids(tokenizer, generation_config) -> list[int]:
    ids = []
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ZephyrError("the model has no end-of-sequence token in its tokenizer or generation config")
    return ids


def _defaults(generation_config) -> SamplingParams:
    """The generation config's sampling settings as SamplingParams (greedy when it does not sample)."""
    g = generation_config
    if g is None:
        return SamplingParams()
    sampling = bool(getattr(g, "do_sample", False))
    return SamplingParams(
        max_new_tokens=getattr(g, "max_new_tokens", None) or SamplingParams.max_new_tokens,
        temperature=(g.temperature if g.temperature is not None else 1.0) if sampling else 0.0,
        top_p=(g.top_p if g.top_p is not None else 1.0) if sampling else 1.0,
        top_k=(g.top_k or 0) if sampling else 0,
    )


def _check_sampling(p: SamplingParams) -> None:
    checks = [
        ("max_tokens", isinstance(p.max_new_tokens, int) and p.max_new_tokens >= 1, "an integer >= 1"),
        (
            "temperature",
            isinstance(p.temperature, (int, float)) and 0 <= p.temperature <= 2,
            "between 0 and 2",
        ),
        ("top_p", isinstance(p.top_p, (int, float)) and 0 < p.top_p <= 1, "in (0, 1]"),
        ("top_k", isinstance(p.top_k, int) and p.top_k >= 0, "an integer >= 0 (0: no top-k)"),
        (
            "stop",
            all(isinstance(s, str) and s for s in p.stop) and len(p.stop) <= 4,
            "up to 4 non-empty strings",
        ),
        ("seed", p.seed is None or isinstance(p.seed, int), "an integer"),
    ]
    for name, ok, accepted in checks:
        if not ok:
            raise RequestError(f"{name} must be {accepted}", param=name)


def model_label(path: str | Path | None) -> str:
    """A short name for a model in messages: the folder name, or the hub id / embedded name as given."""
    if path is None:
        return EMBEDDED_MODEL
    return Path(path).name if Path(path).is_dir() else str(path)
