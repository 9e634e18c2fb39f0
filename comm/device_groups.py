"""Device groups: torch process groups for tensor collectives inside a replica (fast links).

The Transport moves bytes over slow links; DDP/ZeRO all-reduces and Ulysses all-to-alls need
torch process groups over the devices of one replica instead — the whole replica, and every
subset a sequence-parallel plan may use. A ``DeviceGroups`` provider creates them once at
start-up (creating a group is a collective, so every member must do it in the same order) and
hands them out by rank tuple. Inside a group, ranks are addressed by their position in the tuple
(``group_src=``/``group_dst=`` of ``torch.distributed``), never by global rank: the same code then
runs on every provider.

- ``ProcessDeviceGroups``: one process per worker with ``torch.distributed`` initialised —
  torchrun (the default group spans the job; ``to_local`` is the identity) and Ray (each
  multi-device replica has its own small world; ``to_local`` maps job ranks to replica ranks).
- ``ThreadDeviceGroups``: simulation, where workers are threads of one process: gloo groups over
  an in-memory store, one per thread and rank tuple, so DDP and Ulysses run there unchanged.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from distrain.comm.errors import CommError, NotAMemberError, UnknownGroupError

Ranks = tuple[int, ...]


def canonical(specs: Iterable[Sequence[int]]) -> list[Ranks]:
    """Distinct rank tuples (each sorted) in one order every member agrees on."""
    out = sorted({tuple(sorted(int(r) for r in s)) for s in specs}, key=lambda t: (len(t), t))
    for t in out:
        if len(set(t)) != len(t) or not t:
            raise ValueError(f"device group {t} must be non-empty with distinct ranks")
    return out


class DeviceGroups(ABC):
    """Process groups of this worker, created at start-up and cached by rank tuple."""

    def __init__(self, rank: int, groups: dict[Ranks, dist.ProcessGroup]):
        self.rank = rank
        self._groups = groups

    def group(self, ranks: Sequence[int]) -> dist.ProcessGroup:
        """The group of ``ranks`` (this worker must be one of them)."""
        key = tuple(sorted(int(r) for r in ranks))
        if self.rank not in key:
            raise NotAMemberError(f"rank {self.rank} is not in device group {key}")
        pg = self._groups.get(key)
        if pg is None:
            known = ", ".join(str(k) for k in sorted(self._groups)) or "none"
            raise UnknownGroupError(f"device group {key} was not created at start-up (this rank has: {known})")
        return pg

    def position(self, ranks: Sequence[int]) -> int:
        """This worker's index inside the group of ``ranks`` (its rank within that group)."""
        return sorted(int(r) for r in ranks).index(self.rank)

    @property
    def specs(self) -> list[Ranks]:
        return sorted(self._groups)

    @property
    @abstractmethod
    def backend(self) -> str:
        """``gloo`` or ``nccl``."""


class ProcessDeviceGroups(DeviceGroups):
    """Groups over processes of an initialised ``torch.distributed`` world (torchrun, Ray)."""

    def __init__(self, specs: Iterable[Sequence[int]], rank: int, to_local: Mapping[int, int] | None = None,
                 timeout_s: float | None = None, backend: str | None = None):
        """``backend``: of every group here (``runtime.device_backend``; default: the world's)."""
        if not dist.is_initialized():
            raise CommError("torch.distributed is not initialised: device groups need a process group")
        self._backend = backend or str(dist.get_backend())
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        groups: dict[Ranks, dist.ProcessGroup] = {}
        local = dict(to_local) if to_local is not None else None
        for spec in canonical(specs):  # every process of the world creates every group, in order
            ranks = [local[r] for r in spec] if local is not None else list(spec)
            pg = dist.new_group(ranks, backend=self._backend, **kwargs)
            if rank in spec:
                groups[spec] = pg
        super().__init__(rank, groups)

    @property
    def backend(self) -> str:
        return self._backend


class InProcessGroupHub:
    """The shared in-memory store that the simulation's worker threads rendezvous on."""

    def __init__(self, timeout_s: float = 120.0):
        self.store = dist.HashStore()
        self.timeout = timedelta(seconds=timeout_s)
        self._lock = threading.Lock()

    def groups_for(self, rank: int, specs: Iterable[Sequence[int]]) -> "ThreadDeviceGroups":
        """This thread's groups; every member thread must call it (concurrently) with the same specs."""
        return ThreadDeviceGroups(self, rank, [s for s in canonical(specs) if rank in s])

    def make(self, spec: Ranks, rank: int) -> dist.ProcessGroup:
        prefix = dist.PrefixStore("devgroup/" + "-".join(map(str, spec)), self.store)
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        opts._timeout = self.timeout
        position, size = spec.index(rank), len(spec)
        backend = dist.ProcessGroupGloo(prefix, position, size, opts)
        pg = dist.ProcessGroup(prefix, position, size)
        pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
        if torch.cuda.is_available():  # the threads' tensors may live on a GPU: gloo stages them through the host
            pg._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.GLOO, backend)
        return pg


class ThreadDeviceGroups(DeviceGroups):
    """One simulated worker's gloo groups (threads of one process over an in-memory store)."""

    def __init__(self, hub: InProcessGroupHub, rank: int, specs: list[Ranks]):
        super().__init__(rank, {spec: hub.make(spec, rank) for spec in specs})

    @property
    def backend(self) -> str:
        return "gloo"
