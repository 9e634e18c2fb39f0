"""One device of a multi-device full replica under torch DDP: gradients all-reduced every step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from distrain.config import TrainConfig
from distrain.inner.devices import ReplicaDevices
from distrain.inner.schedule import Batch
from distrain.inner.single import SingleSchedule


class DDPSchedule(SingleSchedule):
    """The replica's devices all-reduce gradients over their device group; after the outer step the
    others take the leader's weights (``refresh``)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, next_batch: Callable[[], Batch], device: torch.device,
                 devices: ReplicaDevices, seed: int = 0, **clocked: Any):
        from torch.nn.parallel import DistributedDataParallel

        self.devices = devices
        self.module = model
        # No buffer sync in forward: the leader evaluates alone, and a collective there would hang.
        ddp = DistributedDataParallel(model, process_group=devices.group, forward_sync_buffers=False,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        super().__init__(ddp, cfg, next_batch, device, seed=seed, **clocked)

    def _agree(self, vote: bool) -> bool:
        return self.devices.any(vote)

    def refresh(self) -> None:
        self.devices.broadcast_from_leader(self.module)
