"""The inner schedule's seam: how one worker runs its inner steps, and what a step reports.

``InnerSchedule`` owns what every schedule shares — the model it trains, AdamW and its learning-
rate schedule, the step counter, the generator for SpaCO's chunk sampling, the worker's clock —
and the step's report with its timing. A subclass implements ``_step`` (one optimiser step: the
forward/backward its parallelism needs, clipping, ``optimizer.step``, ``scheduler.step``) and, if
its devices must agree after the weights were overwritten from outside, ``refresh``. The Worker
knows nothing else of it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distrain.comm.clock import ComputeClock, WallClock
from distrain.config import TrainConfig
from distrain.model import cross_entropy
from distrain.optim import build_inner_optimizer, schedule_at

Batch = tuple[torch.Tensor, torch.Tensor]


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
class StepOutcome:
    """What ``_step`` computed."""

    loss: float  # mean token loss of the step
    tokens: int  # target tokens it trained on
    grad_norm: float  # before clipping
    extra: dict[str, float] = field(default_factory=dict)  # schedule-specific figures (boundary bytes, SP groups)


@dataclass
class StepReport(StepOutcome):
    """One inner step as the worker sees it: what it computed, at which learning rate, and its time."""

    lr: float = 0.0
    seconds: float = 0.0  # real seconds
    compute_s: float = 0.0  # compute charged for it: network.step_time_s / speed, or the real seconds / speed
    elapsed_s: float = 0.0  # on the worker's clock (simulated: compute plus a pipeline's bubble and boundary waits)


class InnerSchedule:
    """One worker's inner steps. ``step_time_s`` (simulation: seconds per step at speed 1, 0 to
    measure) and ``speed`` set what a step charges to ``clock``; real launchers pass a wall clock."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, *, seed: int = 0,
                 clock: ComputeClock | None = None, step_time_s: float = 0.0, speed: float = 1.0):
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer, self.scheduler = build_inner_optimizer(model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)  # SpaCO chunk sampling
        self.clock = clock if clock is not None else WallClock()
        self.step_time_s, self.speed = step_time_s, speed

    # ----- the step ----------------------------------------------------------------------------
    def _step(self) -> StepOutcome:
        raise NotImplementedError

    def _check_finite(self, loss: float) -> None:
        """Before the optimiser steps: a non-finite loss must never reach the weights."""
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite training loss {loss} at step {self.step}")

    def _charge(self, seconds: float) -> float:
        """Charge the step's compute to the clock; returns what was charged."""
        compute = (self.step_time_s or seconds) / self.speed
        self.clock.advance(compute)
        return compute

    def train_step(self) -> StepReport:
        t0, c0 = time.perf_counter(), self.clock.now()
        lr = self.optimizer.param_groups[0]["lr"]
        out = self._step()
        self.step += 1
        seconds = time.perf_counter() - t0
        compute = self._charge(seconds)
        return StepReport(out.loss, out.tokens, out.grad_norm, out.extra, lr, seconds, compute, self.clock.now() - c0)

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ----- around the steps --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: list[Batch], model: nn.Module | None = None) -> float:
        """Mean validation loss of ``model`` (default: the trained one) over ``batches``."""
        model = self.model if model is None else model
        model.eval()
        losses = []
        for x, y in batches:
            with self._autocast():
                losses.append(cross_entropy(model(x.to(self.device)), y.to(self.device)).item())
        return sum(losses) / max(1, len(losses))

    def seek(self, step: int) -> None:
        """Be at inner step ``step`` without training (a restarted worker catching up)."""
        self.step = int(step)
        self.scheduler = schedule_at(self.optimizer, self.cfg, self.step)

    def refresh(self) -> None:
        """The weights were overwritten from outside (the outer step): devices that must agree take
        the leader's. A single device reads them as they are."""

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
