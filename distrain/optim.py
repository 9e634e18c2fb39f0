"""Inner optimiser (AdamW, or torchao's AdamW with 8-/4-bit moments) and its warm-up + cosine
learning-rate schedule."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from distrain.config import TrainConfig


def lr_multiplier(step: float, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``. ``step`` is the
    run's progress in inner steps of a full-speed replica (fractional for a replica that takes
    fewer steps per round)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# cfg.optimizer → torchao's class (the `lowmem` extra): moments block-quantised to 8 or 4 bits. torchao
# quantises a tensor of >= 4096 values whose count is a multiple of its block (256 / 128); smaller
# ones (norm gains, small projections) keep fp32 moments.
QUANTISED = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit"}


def build_inner_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are not decayed), as in LLaMA. Its
    learning rate is set before every step from the run's progress (``lr_multiplier``).
    ``cfg.optimizer`` picks where the moments live: fp32 (``adamw``) or torchao's quantised states,
    imported here, only by a replica that asks for them."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)
    quantised = getattr(_torchao_optim(cfg.optimizer), QUANTISED[cfg.optimizer])
    return quantised(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def _torchao_optim(name: str):  # noqa: ANN202 - the module, untyped: torchao is optional
    """``torchao.optim``, imported quietly: torchao logs a warning for each CUDA kernel library it cannot
    load, which a CPU build never can (the optimisers do not need them)."""
    # ... and torch asks its state subclasses for a cache hash they lack (once per class, harmless)
    warnings.filterwarnings("ignore", message=r"OptimState\w+ does not implement _stable_hash_for_caching")
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao.optim
    except ImportError as e:
        raise ImportError(f"optimizer {name!r} needs torchao: pip install 'distrain[lowmem]'") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return torchao.optim
