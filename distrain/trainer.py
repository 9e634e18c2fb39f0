"""The inner training step of one worker: micro-batches, accumulation, clipping, AdamW.

This is also the "AdamW DDP" baseline when a ``grad_sync`` hook averages gradients across
replicas before the optimiser step, and the inner schedule of a DDP replica when the model is
wrapped in ``DistributedDataParallel``. Every inner schedule (this one, DeepSpeed's, the
pipeline's) offers the same small protocol to the worker: ``train_step``, ``evaluate``,
``seek(step)`` (move the step and learning-rate schedule: catch-up) and ``refresh()`` (the weights
were overwritten from outside: the outer step).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distrain.config import TrainConfig
from distrain.model import cross_entropy
from distrain.optim import build_inner_optimizer, schedule_at

GradSync = Callable[[list[torch.Tensor]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it well; CPU bf16 matmuls are slow, so auto = fp32 there."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float
    lr: float
    seconds: float


class InnerTrainer:
    """Owns a model (whole or stage), its AdamW state and schedule, and a batch source."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        grad_sync: GradSync | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.cfg = cfg
        self.next_batch = next_batch
        self.device = device
        self.grad_sync = grad_sync
        self.optimizer, self.scheduler = build_inner_optimizer(model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)  # SpaCO chunk sampling
        self.params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
        cw = self.cfg.chunkwise
        if cw.mode != "off":
            from parallel.chunkwise import chunkwise_backward

            res = chunkwise_backward(self.model, x, y, cw, loss_scale=scale, generator=self.generator,
                                     autocast_dtype=self.amp_dtype)
            return float(res.loss)
        with self._autocast():
            loss = cross_entropy(self.model(x), y)
        (loss * scale).backward()
        return loss.item()

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        accum = self.cfg.grad_accum
        for _ in range(accum):
            x, y = self.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            total += self._backward(x, y, 1.0 / accum)
            tokens += y.numel()
        loss = total / accum
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite training loss {loss} at step {self.step}")
        if self.grad_sync is not None:
            self.grad_sync([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else torch.tensor(0.0)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return StepResult(loss, tokens, float(norm), lr, time.perf_counter() - t0)

    def seek(self, step: int) -> None:
        """Be at inner step ``step`` without training (a restarted worker catching up)."""
        self.step = int(step)
        self.scheduler = schedule_at(self.optimizer, self.cfg, self.step)

    def refresh(self) -> None:
        """The parameters were overwritten in place; AdamW reads them as they are (nothing to do)."""

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.model.eval()
        losses = []
        for x, y in batches:
            with self._autocast():
                losses.append(cross_entropy(self.model(x.to(self.device)), y.to(self.device)).item())
        return sum(losses) / max(1, len(losses))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
