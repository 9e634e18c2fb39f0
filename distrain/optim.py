"""Inner optimiser (AdamW, or torchao's AdamW with 8-/4-bit moments) and its warm-up + cosine
learning-rate schedule."""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
import weakref

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
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)
    else:
        quantised = getattr(_torchao_optim(cfg.optimizer), QUANTISED[cfg.optimizer])
        optimizer = quantised(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return _one_step_at_a_time(optimizer)


# torch.compile marks the whole *process* as compiling while it traces: torch.compiler.is_compiling() reads
# one global flag, and eager optimiser code branches on it (torch.optim's bias corrections become float32
# tensors instead of Python floats, and a flag that flips mid-step raises a TypeError in _multi_tensor_adam).
# In the simulation every worker is a thread of one process, so a torchao replica compiling its first step
# would change, or crash, the step another replica takes at that moment. One lock around every inner
# optimiser step keeps the compiling step apart from the eager ones; under torchrun and Ray each process
# holds one worker and the lock is never contended. (Eager forward code reads the flag too, where it does not
# matter to us: module hooks, which distrain registers none of, and DDP's set-up of optimisers-in-backward.)
_STEP_LOCK = threading.Lock()


def _one_step_at_a_time(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` with its ``step`` taken under the process-wide step lock. The wrapper holds the
    optimiser weakly: a cycle would leave it (and the tensors of a ZeRO partition it steps) to the
    garbage collector, possibly until interpreter shutdown, after the process groups are gone."""
    step = type(optimizer).step
    owner = weakref.ref(optimizer)

    @functools.wraps(step)
    def locked_step(*args, **kwargs):  # the optimiser's own signature
        with _STEP_LOCK:
            return step(owner(), *args, **kwargs)

    optimizer.step = locked_step  # type: ignore[method-assign]
    return optimizer


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
