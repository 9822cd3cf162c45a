"""Per-sequence completion log-probs without the full `[batch, seq, vocab]` logits.

DPO needs, for every sequence, `log p(completion | prompt) = Σ_t log p(label_t | prefix)` over completion tokens only.
The plain way projects every position through the LM head and takes a float32 log-softmax: at SmolLM2-135M sizes
(2 x 1024 tokens, vocab 49152) that is ~400 MB of logits, plus as much again for the log-softmax and its gradient; at
Zephyr's 7B sizes it dominates activation memory. Here we instead

1. drop prompt and padding positions before the LM head (`hidden[mask]`, a `[tokens, d_model]` copy), then
2. project, log-softmax and gather in chunks of `chunk_size` tokens inside one `torch.autograd.Function` that saves
   only its inputs and one log-normaliser per token, and recomputes each chunk's logits in backward.

So peak memory in forward and backward is one `[chunk_size, vocab]` float32 buffer (three with `with_metrics`) plus
the float32 weight gradient, whatever the sequence length. `benchmarks/logprobs_memory.py` measures this against the
plain path and against `torch.utils.checkpoint` around each chunk: on the CPU at SmolLM2-135M sizes, with 1024-token
chunks, checkpointing took 2.4x the extra memory (795 vs 334 MB: autograd keeps the recomputed logits, the
log-softmax and its gradient at once) and 4-6% more time than the closed-form backward here; the plain path 1943 MB.

Alignment: both functions take `labels` the shape of the inputs (`input_ids` with -100 at prompt and padding, as a
Hugging Face causal LM takes them) and shift inside: position t of the hidden states scores `labels[:, t + 1]`.

Not handled: logit soft-capping (Gemma 2) and logit scaling (Cohere, Granite); Llama and Mistral have neither. A model
with `final_logit_softcapping` or `logit_scale` in its config needs a transform added to `_chunk_logits` (and its
derivative in backward) before this can train it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from zephyr.data.tokenize import IGNORE_INDEX
from zephyr.errors import ZephyrError

# Columns of the per-token statistics the forward computes for logging (never differentiated).
_MEAN_LOGIT, _ENTROPY, _IS_TOP1, _LOG_SUM_SQ_PROBS = range(4)


class SequenceLogps(NamedTuple):
    """Completion log-probs of a batch of sequences and the per-sequence sums TRL's metrics are built from.

    logps:                [batch] float32 Σ over completion tokens of log p(label); differentiable.
    token_logps:          [batch, seq - 1] float32 log p(labels[:, t + 1]) at position t, 0 where the label is -100;
                          differentiable (LD-DPO re-weights these).
    token_counts:         [batch] int64 number of completion tokens (labels != -100, first position excluded).
    logits_sum:           [batch] Σ over completion tokens of the mean logit over the vocabulary (TRL's `logits/*`);
                          None unless `with_metrics`.
    entropy_sum:          [batch] Σ over completion tokens of the next-token entropy (TRL's `entropy`); None unless
                          `with_metrics`.
    top1_counts:          [batch] completion tokens whose label is the argmax (TRL's `mean_token_accuracy`); None
                          unless `with_metrics`.
    log_sum_sq_probs_sum: [batch] Σ over completion tokens of log Σ_v p_v² (WPO weights); None unless `with_wpo`.

    The statistics are float32 and carry no gradient. All logits are after `temperature`.
    """

    logps: Tensor
    token_logps: Tensor
    token_counts: Tensor
    logits_sum: Tensor | None = None
    entropy_sum: Tensor | None = None
    top1_counts: Tensor | None = None
    log_sum_sq_probs_sum: Tensor | None = None

    def chunk_pairs(self) -> tuple[SequenceLogps, SequenceLogps]:
        """Split a concatenated `[chosen; rejected]` batch of 2B sequences into (chosen, rejected), B each."""
        halves = [None if field is None else field.chunk(2, dim=0) for field in self]
        return (
            SequenceLogps(*(None if h is None else h[0] for h in halves)),
            SequenceLogps(*(None if h is None else h[1] for h in halves)),
        )


def completion_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_metrics: bool = True,
    with_wpo: bool = False,
) -> SequenceLogps:
    """Completion log-probs from final hidden states, in chunks of `chunk_size` tokens through the LM head.

    hidden:         [batch, seq, d_model] final hidden states (after the last norm), any float dtype.
    lm_head_weight: [vocab, d_model] (the input embedding matrix when embeddings are tied).
    labels:         [batch, seq] token ids with -100 at prompt and padding positions; shifted inside, so
                    `hidden[:, t]` scores `labels[:, t + 1]`.
    lm_head_bias:   [vocab] or None (Llama and Mistral heads have no bias).

    The LM head runs in the inputs' dtype (or the autocast dtype when autocast is on, as the model's own head would),
    and everything after it in float32. Peak extra memory is O(chunk_size x vocab) in forward and backward; gradients
    flow to `hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected_hidden = hidden[:, :-1][mask]  # [tokens, d_model]: prompt and padding never reach the LM head
    selected_targets = targets[mask]
    _check_label_range(selected_targets, lm_head_weight.shape[0])

    token_logps, stats = _ChunkedCompletionLogps.apply(
        selected_hidden,
        lm_head_weight,
        lm_head_bias,
        selected_targets,
        chunk_size,
        temperature,
        _stat_columns(with_metrics, with_wpo),
    )
    return _per_sequence(token_logps, stats, mask, with_metrics, with_wpo)


def final_hidden_states(model: torch.nn.Module, **inputs) -> Tensor:
    """[batch, seq, d_model] final hidden states (after the last norm) of a Hugging Face causal LM.

    Calls the model itself, so DDP / PEFT wrappers see a normal forward, with `logits_to_keep=1` so that only one
    position goes through the LM head; `completion_logps` then does the rest. Checked for Llama, Mistral and Qwen2
    with transformers 5.24, whose `hidden_states[-1]` is the normed output that the LM head reads.
    """
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return outputs.hidden_states[-1]


def reference_completion_logps(
    model_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_metrics: bool = True,
    with_wpo: bool = False,
) -> SequenceLogps:
    """The plain path: a full float32 log-softmax over `model_logits` [batch, seq, vocab]; the oracle in tests.

    Same alignment and outputs as `completion_logps` (labels [batch, seq], shifted inside).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = model_logits[:, :-1].float() / temperature
    log_probs = logits.log_softmax(dim=-1)  # [batch, seq - 1, vocab]
    gathered = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = gathered.masked_fill(~mask, 0.0)
    with torch.no_grad():
        probs = log_probs.exp()
        columns = [
            logits.mean(dim=-1),
            -(probs * log_probs).sum(dim=-1),
            (logits.argmax(dim=-1) == targets).float(),
            probs.square().sum(dim=-1).log(),
        ]
        wanted = [columns[c] for c in _stat_columns(with_metrics, with_wpo)]
        stats = torch.stack(wanted, dim=-1)[mask] if wanted else logits.new_empty(int(mask.sum()), 0)
    return _per_sequence(token_logps[mask], stats, mask, with_metrics, with_wpo)


def _stat_columns(with_metrics: bool, with_wpo: bool) -> tuple[int, ...]:
    return ((_MEAN_LOGIT, _ENTROPY, _IS_TOP1) if with_metrics else ()) + (
        (_LOG_SUM_SQ_PROBS,) if with_wpo else ()
    )


def _per_sequence(
    token_logps: Tensor, stats: Tensor, mask: Tensor, with_metrics: bool, with_wpo: bool
) -> SequenceLogps:
    """Scatter per-token values [tokens] / [tokens, k] back to [batch, seq - 1] and sum each sequence."""
    # masked_scatter keeps the result connected to the graph even when no token is selected, so an all-prompt batch
    # gives a zero loss that still backpropagates instead of failing.
    dense_logps = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)
    sums = []
    for k in range(stats.shape[-1]):
        sums.append(stats.new_zeros(mask.shape).masked_scatter(mask, stats[:, k]).sum(dim=1))
    metric_sums = sums[:3] if with_metrics else [None, None, None]
    return SequenceLogps(
        logps=dense_logps.sum(dim=1),
        token_logps=dense_logps,
        token_counts=mask.sum(dim=1),
        logits_sum=metric_sums[0],
        entropy_sum=metric_sums[1],
        top1_counts=metric_sums[2],
        log_sum_sq_probs_sum=sums[-1] if with_wpo else None,
    )


def _check_label_range(targets: Tensor, vocab_size: int) -> None:
    if targets.numel() == 0:
        return
    # One host sync per call, worth it: an out-of-range id otherwise surfaces as an opaque device-side assert.
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ZephyrError(
            f"Label token id {bad} is outside the model's vocabulary of {vocab_size} tokens: the tokenizer does not "
            "match the model; use the tokenizer saved with the model (or resize its embeddings)."
        )


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """[n, d_model] -> [n, vocab] float32 logits; the projection itself runs in the inputs' dtype."""
    logits = F.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


def _logsumexp_(logits: Tensor) -> Tensor:
    """logsumexp over the last dim, overwriting `logits` [n, vocab]: one chunk-sized buffer instead of two."""
    row_max = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(-1))


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


class _ChunkedCompletionLogps(torch.autograd.Function):
    """log p(target) for `tokens` rows of `hidden @ weight.T + bias`, `chunk_size` rows of logits at a time.

    Forward saves the inputs and one log-normaliser (logsumexp) per token; backward recomputes each chunk's logits
    and uses d log p_target / d z = onehot(target) - softmax(z), so nothing of size tokens x vocab is ever held.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, stat_columns):
        # hidden [tokens, d_model], weight [vocab, d_model], bias [vocab] | None, targets [tokens]
        # -> token_logps [tokens] float32, stats [tokens, len(stat_columns)] float32
        compute_dtype = _compute_dtype(hidden)
        n_tokens = hidden.shape[0]
        log_norm = hidden.new_empty(n_tokens, dtype=torch.float32)
        token_logps = hidden.new_empty(n_tokens, dtype=torch.float32)
        stats = hidden.new_empty(n_tokens, len(stat_columns), dtype=torch.float32)
        # Autocast is switched off and the dtype set by hand so that backward, which autocast does not cover,
        # recomputes exactly the logits the forward saw.
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
            for start in range(0, n_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows].to(compute_dtype), w, b, temperature)
                target_logits = logits.gather(1, targets[rows, None]).squeeze(1)
                if stat_columns:
                    log_norm[rows] = torch.logsumexp(logits, dim=-1)
                    stats[rows] = _chunk_stats(logits, log_norm[rows], targets[rows], stat_columns)
                else:
                    log_norm[rows] = _logsumexp_(logits)
                token_logps[rows] = target_logits - log_norm[rows]
                del logits  # before the next chunk's logits exist, or two chunk buffers live at once
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.mark_non_differentiable(stats)
        return token_logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        cd, chunk_size, temperature = ctx.compute_dtype, ctx.chunk_size, ctx.temperature
        grad_logps = grad_logps.float()
        # The weight and bias gradients sum over chunks, so they accumulate in float32 even for bf16 weights (summing
        # bf16-rounded chunk products would bias them). Each hidden-state row is produced by a single matmul, which
        # runs in the compute dtype like the model's own backward.
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        )
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(cd), None if bias is None else bias.to(cd)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(cd)
                g = grad_logps[rows, None]
                # d(g * log p_target)/d logits = g * (onehot(target) - softmax), built in place in the logits buffer
                grad_logits = _chunk_logits(h, w, b, temperature).sub_(log_norm[rows, None]).exp_().mul_(-g)
                grad_logits.scatter_add_(1, targets[rows, None], g)
                if temperature != 1.0:
                    grad_logits.div_(temperature)
                if need_hidden:
                    grad_hidden[rows] = grad_logits.to(cd) @ w
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), h.float())
                if need_bias:
                    grad_bias += grad_logits.sum(dim=0)
                del grad_logits
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def _chunk_stats(logits: Tensor, log_norm: Tensor, targets: Tensor, columns: tuple[int, ...]) -> Tensor:
    """[n, vocab] float32 logits -> [n, len(columns)] logging statistics (see `SequenceLogps`)."""
    out = []
    probs = (
        (logits - log_norm[:, None]).exp_() if _ENTROPY in columns or _LOG_SUM_SQ_PROBS in columns else None
    )
    for column in columns:
        if column == _MEAN_LOGIT:
            out.append(logits.mean(dim=-1))
        elif column == _ENTROPY:
            # H = logsumexp(z) - Σ p z, without forming p * log p
            out.append(log_norm - torch.einsum("nv,nv->n", probs, logits))
        elif column == _IS_TOP1:
            out.append((logits.argmax(dim=-1) == targets).float())
        else:
            out.append(torch.einsum("nv,nv->n", probs, probs).log())
    return torch.stack(out, dim=-1)
