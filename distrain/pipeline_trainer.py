"""The inner schedule of a pipeline stage worker: one micro-batched GPipe/1F1B step at a time.

Every stage of a pipeline replica reads the same batches (its replica's data stream), splits the
step's ``batch_size · grad_accum`` sequences into the replica's micro-batches and runs its part of
the step (``parallel.pipeline.pipeline_step``): activations forward and activation gradients
backward through the Transport's point-to-point calls, loss on the last stage, the clip norm the
whole replica's. Compute is charged to the worker's simulated clock per micro-batch before each
send (``network.step_time_s`` × the stage's share of the layers, or the measured seconds), so the
pipeline's bubble and boundary transfers show up on the virtual clock as waits.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from comm.clock import ComputeClock
from comm.transport import Transport
from distrain.config import TrainConfig
from distrain.optim import build_inner_optimizer, schedule_at
from distrain.trainer import StepResult, autocast_dtype
from parallel.pipeline import StagePlace, pipeline_eval_loss, pipeline_step
from parallel.subspace import Subspace

Batch = tuple[torch.Tensor, torch.Tensor]
FORWARD_SHARE = 1.0 / 3.0  # of a micro-batch's compute; the backward takes the other two thirds


class PipelineTrainer:
    charges_clock = True  # compute is charged per micro-batch, inside the step

    def __init__(self, stage: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 transport: Transport, place: StagePlace, microbatches: int, schedule: str, wire_dtype: str,
                 sub: Subspace | None = None, clock: ComputeClock | None = None, step_time_s: float = 0.0,
                 share: float = 1.0, speed: float = 1.0, seed: int = 0):
        self.model, self.cfg, self.next_batch, self.device = stage, cfg, next_batch, device
        self.transport, self.place, self.microbatches = transport, place, microbatches
        self.schedule_name, self.wire_dtype, self.sub = schedule, wire_dtype, sub
        self.clock, self.step_time_s, self.share, self.speed = clock, step_time_s, share, speed
        self.optimizer, self.scheduler = build_inner_optimizer(stage, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)  # SpaCO chunks: the same on every stage
        self.last: dict[str, float] = {}

    def _charge(self, kind: str, micro: int, seconds: float) -> None:
        if self.clock is None:
            return
        if self.step_time_s:
            part = FORWARD_SHARE if kind == "F" else 1.0 - FORWARD_SHARE
            seconds = self.step_time_s * self.share * part / self.microbatches
        self.clock.advance(seconds / self.speed)

    def _micro_batches(self) -> list[Batch]:
        xs, ys = zip(*(self.next_batch() for _ in range(self.cfg.grad_accum)))
        x, y = torch.cat(xs), torch.cat(ys)
        size = x.shape[0] // self.microbatches
        return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        cw = self.cfg.chunkwise
        res = pipeline_step(self.model, self._micro_batches(), self.transport, self.place, step=self.step,
                            schedule=self.schedule_name, subspace=self.sub, wire_dtype=self.wire_dtype,
                            grad_clip=self.cfg.grad_clip, chunkwise=cw if cw.mode != "off" else None,
                            chunk_generator=self.generator, autocast_dtype=self.amp_dtype, on_compute=self._charge)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.sub is not None:
            self.sub.after_step()
        self.step += 1
        self.last = {"boundary_bytes": float(res.bytes_sent["forward"] + res.bytes_sent["backward"]),
                     "positions": float(res.positions), "wait_s": res.wait_s, "bubble": res.bubble_fraction}
        return StepResult(res.loss, res.tokens, res.grad_norm, lr, time.perf_counter() - t0)

    def evaluate_weights(self, stage: nn.Module, batches: list[Batch], tag: int) -> float:
        """Validation loss of ``stage`` (an uncompressed copy holding the global weights) through
        the replica's stages; every stage returns the same value."""
        return pipeline_eval_loss(stage, batches, self.transport, self.place, step=tag, wire_dtype="fp32")

    def evaluate(self, batches: list[Batch]) -> float:
        return self.evaluate_weights(self.model, batches, 1 << 40)

    def seek(self, step: int) -> None:
        self.step = int(step)
        self.scheduler = schedule_at(self.optimizer, self.cfg, self.step)

    def refresh(self) -> None:
        """The outer step loaded new weights (through the constraint): nothing else to do."""

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
