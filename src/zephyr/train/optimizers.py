"""The optimizers `optim` names, in one table: each transformers name Zephyr builds, and how.

The table is the one place a new optimizer is added; recipe validation (`zephyr.recipe`) refuses any other name
before a model loads (transformers names more optimizers than this loop carries; running AdamW in their place would
be a silent lie). Built as transformers' Trainer builds them: `learning_rate`, `weight_decay` on the decaying
parameters only, Adam's betas and epsilon for the AdamW family, the others at torch's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zephyr.errors import ConfigError

DEFAULT_OPTIMIZER = "adamw_torch"


def _adam(cfg) -> dict[str, Any]:
    return dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def _adamw(groups, cfg):
    return torch.optim.AdamW(groups, fused=_fused_adamw(groups) or None, **_adam(cfg))


def _adafactor(groups, cfg):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False)


def _bitsandbytes(class_name: str) -> Callable:
    def build(groups, cfg):
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                f"optim: {cfg.optim} needs bitsandbytes (pip install bitsandbytes) and a GPU"
            ) from err
        return getattr(bnb.optim, class_name)(groups, **_adam(cfg))

    return build


# name -> build(parameter groups, cfg)
OPTIMIZERS: dict[str, Callable] = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": _adamw,
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.learning_rate),
    "adagrad": lambda groups, cfg: torch.optim.Adagrad(groups, lr=cfg.learning_rate),
    "rmsprop": lambda groups, cfg: torch.optim.RMSprop(groups, lr=cfg.learning_rate),
    "adafactor": _adafactor,
    "adamw_8bit": _bitsandbytes("AdamW8bit"),
    "adamw_bnb_8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw_8bit": _bitsandbytes("PagedAdamW8bit"),
    "paged_adamw_32bit": _bitsandbytes("PagedAdamW32bit"),
}


def optimizer_name(cfg) -> str:
    """The `optim` this run builds (lower-cased, default adamw_torch); a ConfigError for a name not in the table."""
    optim = (cfg.optim or DEFAULT_OPTIMIZER).lower()
    if optim not in OPTIMIZERS:
        raise ConfigError(
            f"optim: {optim} is not an optimizer Zephyr builds; use one of {', '.join(OPTIMIZERS)}"
        )
    return optim


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[optimizer_name(cfg)](decay_parameter_groups(model, cfg.weight_decay), cfg)


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and normalisation weights get no weight decay, as in transformers' Trainer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partition reads as shape (0,): its whole shape
        is_norm = "norm" in name.lower() or len(shape) < 2
        (no_decay if is_norm or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_adamw(groups: list[dict]) -> bool:
    """torch's single-kernel AdamW where it runs (CUDA, and CPU since torch 2.4): one pass over each tensor instead of
    foreach's chain of whole-model temporaries. On a 2-core CPU with 135M fp32 parameters it took 0.13 s a step
    against foreach's 0.7-1.1 s, with 520 MB less peak memory (`benchmarks/optimizer_step.py`)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for g in groups for p in g["params"]]
    supported = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.device.type in supported and p.dtype.is_floating_point for p in params)
