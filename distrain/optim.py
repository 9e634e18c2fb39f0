"""Inner optimiser (AdamW) and its warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from distrain.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_inner_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (norm gains are not decayed), as in LLaMA."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)
    return opt, schedule_at(opt, cfg, 0)


def schedule_at(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule of ``opt`` positioned at ``step`` (its learning rates set).

    Building a new scheduler at a step is LambdaLR's public way to move it (catch-up, resume)."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg), last_epoch=step - 1)
