"""The device a worker computes on, and a multi-device full replica as its devices see it.

The devices of a replica train data-parallel over a fast interconnect; only the leader (device 0)
takes part in the outer rounds, and after each one the others take its weights from it over the
replica's own process group. Ranks inside the group are positions (device indices), so this runs
unchanged over torchrun's world, a Ray replica's own world and the simulation's thread groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distrain.comm.device_groups import DeviceGroups


def resolve_device(name: str) -> torch.device:
    """``run.device``: auto (CUDA when present), cpu, or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


@dataclass
class ReplicaDevices:
    ranks: list[int]  # job ranks of the replica's devices, device 0 first
    position: int  # this process's device index
    group: Any  # torch ProcessGroup over the replica
    solo: Any = None  # this device alone (DeepSpeed's "model-parallel" group)
    device: torch.device = torch.device("cpu")  # where the group's small tensors live (CUDA for NCCL)

    @classmethod
    def of(cls, groups: DeviceGroups, ranks: list[int], rank: int, solo: bool = False,
           device: torch.device | None = None) -> "ReplicaDevices":
        """``device``: the worker's; the group's control tensors go there when the group is NCCL."""
        on = device if device is not None and groups.backend == "nccl" else torch.device("cpu")
        return cls(list(ranks), groups.position(ranks), groups.group(ranks), groups.group([rank]) if solo else None,
                   on)

    @property
    def is_leader(self) -> bool:
        return self.position == 0

    @torch.no_grad()
    def broadcast_from_leader(self, model: nn.Module) -> None:
        """The leader's trainable weights to every device (one flat broadcast, copied in place:
        DDP buckets and ZeRO's flat buffers keep pointing at the same tensors)."""
        params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        flat = torch.nn.utils.parameters_to_vector(params)
        dist.broadcast(flat, group_src=0, group=self.group)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def any(self, flag: bool) -> bool:
        """True on every device when any device says so (a vote to stop as a window closes)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)
