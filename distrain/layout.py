"""Process layout: which process is which replica, who talks to whom, what each Ray worker needs.

Every launcher derives the same layout from the config, so simulation, torchrun and Ray build the
same workers: replica ``r`` owns global ranks ``start[r] .. start[r] + devices[r] - 1``; its first
rank is the replica's *leader*, the only rank of the replica that takes part in the outer round
(group ``"replicas"`` = the leaders). A single-process replica is its own leader, so with one
process per replica the layout is exactly the simulation's (rank r = replica r).
"""

from __future__ import annotations

from dataclasses import dataclass

from distrain.config import Config, ConfigError, check_runtime  # noqa: F401 - re-exported

REPLICAS = "replicas"  # the outer-round group: one leader per replica


@dataclass(frozen=True)
class Layout:
    """Ranks of every replica; ``devices[r]`` processes for replica ``r``."""

    devices: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> "Layout":
        check_runtime(cfg)
        devs = cfg.runtime.replica_devices or [1] * cfg.topology.replicas
        return cls(tuple(devs))

    @property
    def replicas(self) -> int:
        return len(self.devices)

    @property
    def world_size(self) -> int:
        return sum(self.devices)

    def ranks(self, replica: int) -> list[int]:
        start = sum(self.devices[:replica])
        return list(range(start, start + self.devices[replica]))

    def replica_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        for r in range(self.replicas):
            if rank in self.ranks(r):
                return r
        raise AssertionError("unreachable")

    def leader(self, replica: int) -> int:
        return self.ranks(replica)[0]

    def leaders(self) -> list[int]:
        return [self.leader(r) for r in range(self.replicas)]

    def is_leader(self, rank: int) -> bool:
        return rank == self.leader(self.replica_of(rank))

    def groups(self) -> dict[str, list[int]]:
        """Named byte-collective groups for the Transport (the world group is implicit)."""
        return {REPLICAS: self.leaders()}

    def data_rank(self, rank: int) -> tuple[int, int]:
        """``(shard, n_shards)`` of the token sampler: one disjoint shard per process.

        With one process per replica this is ``(replica, replicas)``, as in simulation.
        """
        return rank, self.world_size


def ray_bundles(cfg: Config) -> list[dict[str, float]]:
    """One placement-group bundle per worker, from ``runtime.worker_cpus/gpus/memory_mb``."""
    check_runtime(cfg)
    rt, out = cfg.runtime, []
    for r in range(cfg.topology.replicas):
        b: dict[str, float] = {"CPU": float(rt.worker_cpus[r]) if rt.worker_cpus else 1.0}
        if rt.worker_gpus and rt.worker_gpus[r] > 0:
            b["GPU"] = float(rt.worker_gpus[r])
        if rt.worker_memory_mb and rt.worker_memory_mb[r] > 0:
            b["memory"] = float(rt.worker_memory_mb[r]) * 2**20
        if not any(v > 0 for v in b.values()):
            raise ConfigError(f"worker {r}: its Ray bundle reserves nothing (set runtime.worker_cpus > 0)")
        out.append(b)
    return out
