"""The inner schedule's seam: how one worker runs its inner steps, and what a step reports.

``InnerSchedule`` owns what every schedule shares — the model it trains, AdamW, the learning rate
(a function of the run's global progress, so replicas that take different step counts in a round
are always at the same point of warm-up and decay), the step counter, the generator for SpaCO's
chunk sampling, the worker's clock — and the step's report with its timing. A subclass implements
``_step`` (one optimiser step: the forward/backward its parallelism needs, clipping,
``optimizer.step``) and, if its devices must agree, ``refresh`` (after the weights were overwritten
from outside) and ``_agree`` (a vote to stop as a round's window closes). The Worker knows nothing
else of it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distrain.comm.clock import ComputeClock, WallClock
from distrain.config import TrainConfig
from distrain.model import cross_entropy
from distrain.optim import build_inner_optimizer, lr_multiplier
from distrain.optim_state import flat_state, restore_state, state_bytes

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


# A replica's last step may end this much of a step past its window: a replica 1 % slower than the
# fastest is not a step short (the planner counts steps with the same slack).
OVERRUN = 0.25


@dataclass(frozen=True)
class Window:
    """A round's compute window as a step sees it: after a step, stop when the next one would end
    more than ``OVERRUN`` of a step past the window (a replica running slower than its measured pace)."""

    start: float  # the worker clock's reading when the round's steps began
    length_s: float
    step_s: float  # the replica's expected step time

    def overrun(self, now: float, last_step_s: float = 0.0) -> bool:
        """Would the next step end too late? It is expected to take the longer of the replica's
        usual step and the step just done (a worker that slowed down mid-round)."""
        return now - self.start + (1.0 - OVERRUN) * max(self.step_s, last_step_s) > self.length_s


@dataclass
class StepOutcome:
    """What ``_step`` computed. Loss and norm may be 0-d tensors on the device: the worker reads them
    once per round, so a step on a GPU waits for no host sync."""

    loss: float | torch.Tensor  # mean token loss of the step
    tokens: int  # target tokens it trained on
    grad_norm: float | torch.Tensor  # before clipping
    extra: dict[str, float] = field(default_factory=dict)  # schedule-specific figures (boundary bytes, SP groups)
    stop: bool | None = None  # the replica's agreed vote to stop after this step, if the step agreed it itself


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
        self.optimizer = build_inner_optimizer(model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)  # SpaCO chunk sampling
        self.clock = clock if clock is not None else WallClock()
        self.step_time_s, self.speed = step_time_s, speed
        self.slowdown = 1.0  # fault injection: every step takes this many times longer
        self.window: Window | None = None  # the window of the step in progress
        self._step_start = 0.0  # the clock when the step in progress began

    # ----- the step ----------------------------------------------------------------------------
    def _step(self) -> StepOutcome:
        raise NotImplementedError

    def _check_finite(self, loss: float | torch.Tensor) -> None:
        """Before the optimiser steps, a non-finite loss stops the step. On a CPU that check is free;
        on a GPU it would be a host sync every step, so there the worker checks the round's loss
        once, before anything is exchanged (the replica then leaves the round and rejoins from the
        global weights: a non-finite local update never reaches them)."""
        if isinstance(loss, torch.Tensor) and loss.device.type != "cpu":
            return
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite training loss {value} at step {self.step}")

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch to the device: from pinned memory, without blocking, when it is a GPU."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _charge(self, seconds: float) -> float:
        """Charge the step's compute to the clock (and a slowed worker's extra time); returns it."""
        compute = (self.step_time_s or seconds) / self.speed
        self.clock.advance(compute)
        if self.slowdown > 1.0:
            self.clock.stall((self.slowdown - 1.0) * compute)
        return compute * self.slowdown

    def _vote(self) -> bool:
        """This worker's vote to stop after the step in progress (its window is about to close)."""
        if self.window is None:
            return False
        now = self.clock.now()
        return self.window.overrun(now, now - self._step_start)

    def _agree(self, vote: bool) -> bool:
        """The replica's decision from every worker's vote; one device decides alone."""
        return vote

    def set_progress(self, progress: float) -> float:
        """The learning rate at ``progress`` (inner steps of a full-speed replica, global)."""
        lr = self.cfg.lr * lr_multiplier(progress, self.cfg)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao's optimisers keep it a tensor (compiled steps)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def train_step(self, progress: float | None = None, window: Window | None = None) -> StepReport:
        """One inner step at global ``progress`` (default: this worker's own step count); with a
        ``window``, ``report.stop`` says whether the replica stops after it."""
        t0, c0 = time.perf_counter(), self.clock.now()
        self._step_start = c0
        lr = self.set_progress(self.step if progress is None else progress)
        self.window = window
        out = self._step()
        self.step += 1
        seconds = time.perf_counter() - t0
        compute = self._charge(seconds)
        stop = out.stop if out.stop is not None else (window is not None and self._agree(self._vote()))
        self.window = None
        return StepReport(out.loss, out.tokens, out.grad_norm, out.extra, stop, lr, seconds, compute,
                          self.clock.now() - c0)

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

    def refresh(self) -> None:
        """The weights were overwritten from outside (the outer step): devices that must agree take
        the leader's. A single device reads them as they are."""

    # ----- checkpoint state, by content --------------------------------------------------------
    def param_names(self) -> dict[int, str]:
        """Parameter tensors (by id) → their names in the model (a wrapper's ``module.`` dropped)."""
        return {id(p): n.removeprefix("module.") for n, p in self.model.named_parameters()}

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The schedule's own state: the optimiser's per-parameter state by parameter name
        (``optim/<name>/<key>``, so a pipeline whose split moved regroups it by layer) and the
        generator as tensors; the step count as JSON. The weights are not in it (the worker's).
        Quantised moments are stored by their plain parts (``distrain.optim_state``)."""
        names = self.param_names()
        out = {"rng/generator": self.generator.get_state()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in flat_state(self.optimizer.state.get(p, {})).items():
                    out[f"optim/{names[id(p)]}/{k}"] = v
        return out, {"step": self.step}

    def state_bytes_per_param(self) -> float:
        """Bytes of optimiser state per trained parameter (0 before the first step creates it)."""
        params = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        return state_bytes(self.optimizer) / max(1, params)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[int, int]:
        """Take ``state_tensors`` (possibly regrouped from other workers' by name). A parameter whose
        state is absent or of another shape starts fresh; (parameters restored, parameters). State
        saved by another optimiser is converted to this one's form (``optim_state.restore_state``)."""
        self.step = int(meta["step"])
        if "rng/generator" in tensors:
            self.generator.set_state(tensors["rng/generator"])
        names = self.param_names()
        restored = total = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                total += 1
                prefix = f"optim/{names[id(p)]}/"
                got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                self.optimizer.state.pop(p, None)
                state = restore_state(self.optimizer, p, got) if got else None
                if state is None:
                    continue
                self.optimizer.state[p] = state
                restored += 1
        return restored, total
