"""The inner schedule of a pipeline stage worker: one micro-batched GPipe/1F1B step at a time.

Every stage of a pipeline replica reads the same batches (its replica's data stream), splits the
step's ``batch_size · grad_accum`` sequences into the replica's micro-batches and runs its part of
the step (``distrain.parallel.pipeline.step.pipeline_step``): activations forward and activation
gradients backward through the Transport's point-to-point calls, loss on the last stage, the clip
norm the whole replica's. Compute is charged to the worker's clock per micro-batch before each
send (``network.step_time_s`` × the stage's share of the layers, or the measured seconds), so the
pipeline's bubble and boundary transfers show up on the virtual clock as waits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from distrain.comm.boundary import BoundaryBounds
from distrain.comm.transport import Transport
from distrain.config import TrainConfig
from distrain.inner.schedule import Batch, InnerSchedule, StepOutcome
from distrain.parallel.pipeline.step import StagePlace, pipeline_eval_loss, pipeline_step
from distrain.parallel.pipeline.subspace import Subspace

FORWARD_SHARE = 1.0 / 3.0  # of a micro-batch's compute; the backward takes the other two thirds
EVAL_TAG = 1 << 40  # evaluation passes are numbered from here, apart from training steps


class PipelineSchedule(InnerSchedule):
    def __init__(self, stage: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 transport: Transport, place: StagePlace, microbatches: int, schedule: str, wire_dtype: str,
                 sub: Subspace | None = None, share: float = 1.0, seed: int = 0, **clocked: Any):
        """``share``: the stage's share of the model's layers (what it charges of a step's time)."""
        super().__init__(stage, cfg, device, seed=seed, **clocked)
        self.next_batch = next_batch
        self.transport, self.place, self.microbatches = transport, place, microbatches
        self.schedule_name, self.wire_dtype, self.sub = schedule, wire_dtype, sub
        self.share = share
        self.bounds = BoundaryBounds()  # per link and direction, kept across steps
        self._charged = 0.0
        self._evals = 0

    def _charge_micro(self, kind: str, micro: int, seconds: float) -> None:
        if self.step_time_s:
            part = FORWARD_SHARE if kind == "F" else 1.0 - FORWARD_SHARE
            seconds = self.step_time_s * self.share * part / self.microbatches
        self._charged += seconds / self.speed * self.slowdown
        self.clock.advance(seconds / self.speed)
        if self.slowdown > 1.0:
            self.clock.stall((self.slowdown - 1.0) * seconds / self.speed)

    def _charge(self, seconds: float) -> float:
        """Compute (and a slowed worker's extra time) was charged per micro-batch during the step,
        so the waits fall between."""
        charged, self._charged = self._charged, 0.0
        return charged

    def _micro_batches(self) -> list[Batch]:
        xs, ys = zip(*(self.next_batch() for _ in range(self.cfg.grad_accum)))
        x, y = torch.cat(xs), torch.cat(ys)
        size = x.shape[0] // self.microbatches
        return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]

    def _step(self) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        cw = self.cfg.chunkwise
        res = pipeline_step(self.model, self._micro_batches(), self.transport, self.place, step=self.step,
                            schedule=self.schedule_name, subspace=self.sub, wire_dtype=self.wire_dtype,
                            grad_clip=self.cfg.grad_clip, chunkwise=cw if cw.mode != "off" else None,
                            chunk_generator=self.generator, autocast_dtype=self.amp_dtype,
                            on_compute=self._charge_micro, stop_vote=self._vote if self.window is not None else None,
                            bounds=self.bounds)
        self.optimizer.step()
        if self.sub is not None:
            self.sub.after_step()
        extra = {"boundary_bytes": float(res.bytes_sent["forward"] + res.bytes_sent["backward"]),
                 "positions": float(res.positions), "wait_s": res.wait_s, "bubble": res.bubble_fraction}
        return StepOutcome(res.loss, res.tokens, res.grad_norm, extra, res.stop if self.window is not None else None)

    def evaluate(self, batches: list[Batch], model: nn.Module | None = None) -> float:
        """Validation loss of ``model`` (e.g. an uncompressed copy of the stage holding the global
        weights) through the replica's stages; every stage returns the same value."""
        self._evals += 1
        return pipeline_eval_loss(self.model if model is None else model, batches, self.transport, self.place,
                                  step=EVAL_TAG + self._evals, wire_dtype="fp32")
