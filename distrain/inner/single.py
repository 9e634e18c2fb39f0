"""One device: micro-batches, accumulation, clipping, AdamW (with SeCO/SpaCO for long sequences).

This is also the "AdamW DDP" baseline when a ``grad_sync`` hook averages gradients across
replicas before the optimiser step (``distrain.outer.ddp``), and the base of a DDP replica's
device (``distrain.inner.ddp``), whose model is wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from distrain.config import TrainConfig
from distrain.inner.schedule import Batch, InnerSchedule, StepOutcome
from distrain.model import cross_entropy

GradSync = Callable[[list[torch.Tensor]], None]


class SingleSchedule(InnerSchedule):
    """Owns a model (whole or stage), its AdamW state and schedule, and a batch source."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 grad_sync: GradSync | None = None, seed: int = 0, **clocked: Any):
        super().__init__(model, cfg, device, seed=seed, **clocked)
        self.next_batch = next_batch
        self.grad_sync = grad_sync
        self.params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]

    def _backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """The micro-batch's mean token loss, detached, on the device (no host sync)."""
        cw = self.cfg.chunkwise
        if cw.mode != "off":  # SeCO/SpaCO read their chunk losses on the host (documented there)
            from distrain.parallel.chunkwise import chunkwise_backward

            res = chunkwise_backward(self.model, x, y, cw, loss_scale=scale, generator=self.generator,
                                     autocast_dtype=self.amp_dtype)
            return torch.tensor(float(res.loss), device=self.device)
        with self._autocast():
            loss = cross_entropy(self.model(x), y)
        (loss * scale).backward()
        return loss.detach()

    def _step(self) -> StepOutcome:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, tokens = [], 0
        accum = self.cfg.grad_accum
        for _ in range(accum):
            x, y = self.next_batch()
            losses.append(self._backward(self.to_device(x), self.to_device(y), 1.0 / accum))
            tokens += y.numel()
        loss = torch.stack(losses).float().mean()
        self._check_finite(loss)
        if self.grad_sync is not None:
            self.grad_sync([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 \
            else torch.zeros((), device=self.device)
        self.optimizer.step()
        return StepOutcome(loss, tokens, norm.detach())
