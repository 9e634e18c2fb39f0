"""Inner schedules: how one worker runs its inner steps, injected into the Worker by kind.

- ``single``: one device, ``InnerTrainer`` (with the DDP-baseline gradient hook when the outer
  algorithm syncs every step);
- ``ddp``: one device of a multi-device full replica, ``InnerTrainer`` over torch DDP on the
  replica's device group; ``refresh`` hands the leader's weights to every device after the
  outer step;
- ``deepspeed``: the same with a DeepSpeed ZeRO-1/2 engine (``distrain.deepspeed_schedule``);
- ``pipeline``: a stage of a pipeline replica (the pipeline schedules land with that issue).

Every schedule offers ``train_step``, ``evaluate``, ``seek``, ``refresh``, ``state_dict`` and
``load_state_dict``, and a ``step`` counter; the Worker knows nothing else of it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from distrain.config import TrainConfig
from distrain.replica_devices import ReplicaDevices
from distrain.trainer import GradSync, InnerTrainer, StepResult

Batch = tuple[torch.Tensor, torch.Tensor]


class InnerSchedule(Protocol):
    step: int

    def train_step(self) -> StepResult: ...

    def evaluate(self, batches: list[Batch]) -> float: ...

    def seek(self, step: int) -> None: ...

    def refresh(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DDPTrainer(InnerTrainer):
    """One device of a DDP replica: gradients all-reduced over the replica's devices each step."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 devices: ReplicaDevices, seed: int = 0):
        from torch.nn.parallel import DistributedDataParallel

        self.devices = devices
        self.module = model
        # No buffer sync in forward: the leader evaluates alone, and a collective there would hang.
        ddp = DistributedDataParallel(model, process_group=devices.group, forward_sync_buffers=False,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        super().__init__(ddp, cfg, next_batch, device, seed=seed)

    def refresh(self) -> None:
        self.devices.broadcast_from_leader(self.module)


def build_schedule(parallel: str, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch],
                   device: torch.device, seed: int, devices: ReplicaDevices | None = None,
                   grad_sync: GradSync | None = None, zero_stage: int = 2) -> InnerSchedule:
    """The inner schedule of kind ``parallel`` for one worker's ``model``."""
    if parallel == "single":
        return InnerTrainer(model, cfg, next_batch, device, grad_sync=grad_sync, seed=seed)
    if parallel in ("ddp", "deepspeed"):
        if devices is None:
            raise ValueError(f"parallel = {parallel!r} needs the replica's device group")
        if parallel == "ddp":
            return DDPTrainer(model, cfg, next_batch, device, devices, seed)
        from distrain.deepspeed_schedule import DeepSpeedTrainer

        return DeepSpeedTrainer(model, cfg, next_batch, device, devices, zero_stage, seed)
    if parallel == "pipeline":
        raise NotImplementedError("pipeline replicas: the micro-batched pipeline schedule is not built yet "
                                  "(layouts, segments and groups for them are)")
    raise ValueError(f"unknown inner schedule {parallel!r}")
