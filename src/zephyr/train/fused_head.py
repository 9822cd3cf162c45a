"""Give a causal LM a forward mode that returns completion log-probs instead of logits.

`model(input_ids=..., attention_mask=..., completion_labels=labels)` runs the decoder, then the chunked LM head of
`zephyr.train.logprobs.completion_logps` on the completion positions only, and returns its `SequenceLogps`; without
`completion_labels` the forward is the original one, so generation is unchanged. With `completion_gather`
([sequences, positions] indices into the flattened hidden states, `zephyr.train.shared_prefix`), the hidden states
are first laid out as those sequences, so one packed row can be scored as many ordinary ones. The LM head is called
as a module (its forward patched the same way), never read from outside, so sharded weights arrive whole.

The mode is a patch of the instance's `forward` rather than a wrapper module because DDP, FSDP and PEFT all call
`model.forward` through their own wrappers: patching keeps gradient synchronisation, sharding hooks and LoRA layers
in the path, and keeps parameter names (and so checkpoints) those of the plain model. Patch before wrapping in PEFT.
"""

from __future__ import annotations

import torch

from zephyr.errors import ZephyrError
from zephyr.train.logprobs import SequenceLogps, completion_logps

_MARK = "_zephyr_completion_head"


def attach_completion_head(
    model: torch.nn.Module, *, chunk_size: int = 1024, temperature: float = 1.0
) -> None:
    if getattr(model, _MARK, False):
        return
    original_forward = model.forward
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if config is not None and getattr(config, attr, None) not in (None, 1.0):
            raise ZephyrError(
                f"this model sets {attr}, which the chunked LM head does not apply yet; "
                "train a model without it (Llama, Mistral, Qwen and SmolLM have none)"
            )

    def forward(
        *args,
        completion_labels: torch.Tensor | None = None,
        completion_gather: torch.Tensor | None = None,
        with_metrics: bool = True,
        with_wpo: bool = False,
        **kwargs,
    ):
        if completion_labels is None:
            return original_forward(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs.setdefault("use_cache", False)
        hidden = model.get_decoder()(*args, **kwargs).last_hidden_state
        if (
            completion_gather is not None
        ):  # a packed row, read as the [sequence, position] rows the labels describe
            hidden = hidden.reshape(-1, hidden.shape[-1])[completion_gather]
        return model.get_output_embeddings()(
            hidden,
            completion_labels=completion_labels,
            chunk_size=chunk_size,
            temperature=temperature,
            with_metrics=with_metrics,
            with_wpo=with_wpo,
        )

    _attach_to_head(model.get_output_embeddings())
    model.forward = forward
    setattr(model, _MARK, True)


def _attach_to_head(head: torch.nn.Module) -> None:
    """`head(hidden, completion_labels=...)` -> `SequenceLogps`. The kernel runs inside the head module's own call
    so that sharding hooks fetch its weight: DeepSpeed ZeRO-3 gathers a partitioned weight in the module's forward
    pre-hook (and again before its backward), FSDP2 unshards the module that owns it; read from outside, the
    weight would be an empty partition or a shard."""
    if getattr(head, _MARK, False):
        return
    original_forward = head.forward

    def forward(hidden: torch.Tensor, completion_labels: torch.Tensor | None = None, **options):
        if completion_labels is None:
            return original_forward(hidden)
        return completion_logps(
            hidden, head.weight, completion_labels, lm_head_bias=getattr(head, "bias", None), **options
        )

    head.forward = forward
    setattr(head, _MARK, True)


__all__ = ["SequenceLogps", "attach_completion_head"]
