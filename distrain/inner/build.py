"""The one place that decides which inner schedule a worker runs, from its replica's table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from distrain.comm.clock import ComputeClock
from distrain.comm.device_groups import DeviceGroups
from distrain.comm.transport import Transport
from distrain.config import Config, TrainConfig
from distrain.data import DocumentSampler, TokenSampler
from distrain.inner.ddp import DDPSchedule
from distrain.inner.devices import ReplicaDevices
from distrain.inner.pipeline import PipelineSchedule
from distrain.inner.schedule import InnerSchedule
from distrain.inner.single import GradSync, SingleSchedule
from distrain.inner.sp import SPSchedule
from distrain.layout import Layout, WorkerSlot
from distrain.parallel.pipeline.step import StagePlace
from distrain.parallel.pipeline.subspace import Subspace
from distrain.topology import ReplicaSpec


@dataclass(frozen=True)
class WorkerEnv:
    """Where one worker runs and how it reaches the others: what every builder of its parts needs."""

    cfg: Config
    layout: Layout
    rank: int
    device: torch.device
    transport: Transport
    device_groups: DeviceGroups | None = None
    clock: ComputeClock | None = None  # simulated; real launchers leave it None (a wall clock)

    @property
    def slot(self) -> WorkerSlot:
        return self.layout.slot(self.rank)

    @property
    def replica(self) -> ReplicaSpec:
        return self.layout.replicas[self.slot.replica]

    @property
    def seed(self) -> int:
        """The replica's seed: every worker of a replica draws the same SpaCO chunks."""
        return self.cfg.run.seed * 1000 + self.slot.replica


def replica_devices(env: WorkerEnv) -> ReplicaDevices | None:
    """A multi-device full replica's process group as this device sees it (None for one device)."""
    rep = env.replica
    if rep.kind != "full" or rep.devices == 1:
        return None
    if env.device_groups is None:
        raise ValueError(f"replica {rep.index} has {rep.devices} devices: its workers need device groups")
    return ReplicaDevices.of(env.device_groups, env.layout.ranks(rep.index), env.rank,
                             solo=rep.parallel == "deepspeed", device=env.device)


def build_schedule(env: WorkerEnv, model: nn.Module, sub: Subspace | None, sampler: TokenSampler | DocumentSampler,
                   train_cfg: TrainConfig, grad_sync: GradSync | None = None) -> InnerSchedule:
    """The inner schedule of ``env``'s worker over its stage ``model`` (``sub``: its subspace, when
    its pipeline is compressed) and data stream ``sampler``. Its optimiser is the replica's own
    (``ReplicaSpec.optimizer``: a table may override ``train.optimizer``)."""
    cfg, layout, rep, slot = env.cfg, env.layout, env.replica, env.slot
    if train_cfg.optimizer != rep.optimizer:
        train_cfg = replace(train_cfg, optimizer=rep.optimizer)
    clocked: dict[str, Any] = dict(seed=env.seed, clock=env.clock, step_time_s=cfg.network.step_time_s,
                                   speed=rep.speed)
    devices = replica_devices(env)
    if rep.parallel == "sp":
        assert isinstance(sampler, DocumentSampler)
        return SPSchedule(model, train_cfg, sampler, env.device, devices, env.device_groups, cfg.model.n_heads,
                          [w.speed for w in rep.workers], rep.sp_capacity, rep.sp_costs, **clocked)
    if rep.parallel == "pipeline":
        place = StagePlace(tuple(layout.stage_ranks(rep.index, s)[0] for s in range(rep.stages)), slot.stage,
                           layout.replica_group(rep.index))
        share = (slot.layers[1] - slot.layers[0]) / layout.n_layers
        return PipelineSchedule(model, train_cfg, sampler.next_batch, env.device, env.transport, place,
                                rep.microbatches, rep.schedule, rep.wire_dtype, sub, share, **clocked)
    if rep.parallel == "single":
        return SingleSchedule(model, train_cfg, sampler.next_batch, env.device, grad_sync, **clocked)
    if rep.parallel == "ddp":
        assert devices is not None
        return DDPSchedule(model, train_cfg, sampler.next_batch, env.device, devices, **clocked)
    if rep.parallel == "deepspeed":
        from distrain.inner.deepspeed import DeepSpeedSchedule  # optional dependency, imported when asked for

        assert devices is not None
        return DeepSpeedSchedule(model, train_cfg, sampler.next_batch, env.device, devices, cfg.runtime.zero_stage,
                                 **clocked)
    raise ValueError(f"replica {rep.index}: unknown inner schedule {rep.parallel!r}")
