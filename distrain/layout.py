"""Layout: the topology's workers numbered as ranks, the segments, and every group derived from them.

Workers are numbered replica by replica, stage by stage, device by device: rank = the position of
(replica, stage, device) in that order, so with single-device full replicas rank r is replica r,
as in the simulation of old. From the ranks follow, once, for every mode:

- **segments** — the common refinement of every replica's stage boundaries: layer ranges no
  replica splits. The embedding belongs to the first segment, the final norm and head to the
  last. The outer round runs once per segment, in the group of the workers that own it (one per
  replica): a pipeline stage worker owns the segments inside its layers, a full replica's first
  device (its leader) owns every segment;
- **byte groups** for the Transport (slow links): ``segment{g}``, and ``replica{r}`` for each
  pipeline replica (its stages reduce the clip norm there);
- **device groups** for tensors (fast links): each multi-device full replica's ranks (DDP, ZeRO,
  and later every sequence-parallel subgroup), plus single-rank groups for DeepSpeed;
- **data shards**: one disjoint token stream per full-replica device, one per pipeline replica
  (all its stages read the same micro-batches, so token ids never cross a boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

from distrain.comm.network import Link
from distrain.config import Config
from distrain.parallel.sp.search import device_classes, merge_nearest
from distrain.topology import ReplicaSpec, WorkerSpec, resolve_topology


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker sits: its replica, stage and device, and the layers it holds."""

    rank: int
    replica: int
    stage: int
    device: int
    layers: tuple[int, int]  # [start, end) of the model's layers
    spec: WorkerSpec

    @property
    def is_leader(self) -> bool:
        """Device 0 of its stage: the worker that takes part in the outer rounds."""
        return self.device == 0


def sp_candidate_groups(rep: ReplicaSpec) -> list[tuple[int, ...]]:
    """Device-index groups (size >= 2) an adaptive-SP plan of ``rep`` can use: consecutive devices
    inside a speed class, and inside every class the planner may merge (``distrain.parallel.sp.planner``)."""
    classes = device_classes(len(rep.workers), [w.speed for w in rep.workers], rep.sp_capacity or None)
    seen: list[tuple[int, ...]] = []
    while True:
        for c in classes:
            devs = c.devices
            for size in range(2, len(devs) + 1):
                seen.extend(tuple(devs[i:i + size]) for i in range(len(devs) - size + 1))
        if len(classes) == 1:
            return list(dict.fromkeys(seen))
        classes = merge_nearest(classes)


def segment_of(name: str, n_layers: int, segments: list[tuple[int, int]]) -> int:
    """The segment a parameter belongs to, from its name (layers keep their global index)."""
    if name.startswith("layers."):
        layer = int(name.split(".", 2)[1])
        for g, (a, b) in enumerate(segments):
            if a <= layer < b:
                return g
        raise ValueError(f"parameter {name}: layer {layer} is outside the model's {n_layers} layers")
    if name.startswith("tok_embeddings."):
        return 0
    if name.startswith(("norm.", "output.")):
        return len(segments) - 1
    raise ValueError(f"parameter {name} belongs to no segment")


class Layout:
    """Ranks, segments and groups of one run (the same on every worker and launcher)."""

    def __init__(self, replicas: list[ReplicaSpec], n_layers: int, extra_cuts: tuple[int, ...] = ()):
        """``extra_cuts``: further segment boundaries (smaller frames; tests compare segmentations)."""
        if not replicas:
            raise ValueError("a run needs at least one replica")
        self.replicas = list(replicas)
        self.n_layers = n_layers
        slots: list[WorkerSlot] = []
        for rep in self.replicas:
            for stage in range(rep.stages):
                layers = (rep.bounds[stage], rep.bounds[stage + 1])
                for device in range(rep.devices):
                    spec = rep.workers[device if rep.kind == "full" else stage]
                    slots.append(WorkerSlot(len(slots), rep.index, stage, device, layers, spec))
        self.workers = slots
        cuts = sorted({b for rep in self.replicas for b in rep.bounds} | {c for c in extra_cuts if 0 < c < n_layers})
        self.segments: list[tuple[int, int]] = list(zip(cuts, cuts[1:]))

    @classmethod
    def from_config(cls, cfg: Config) -> "Layout":
        return cls(resolve_topology(cfg), cfg.model.n_layers)

    # ----- ranks -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.workers)

    @property
    def n_replicas(self) -> int:
        return len(self.replicas)

    def slot(self, rank: int) -> WorkerSlot:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return self.workers[rank]

    def replica_of(self, rank: int) -> int:
        return self.slot(rank).replica

    def ranks(self, replica: int) -> list[int]:
        return [w.rank for w in self.workers if w.replica == replica]

    def stage_ranks(self, replica: int, stage: int) -> list[int]:
        return [w.rank for w in self.workers if w.replica == replica and w.stage == stage]

    def leader(self, replica: int) -> int:
        return self.ranks(replica)[0]

    def reporter(self, replica: int) -> int:
        """The worker whose training loss stands for the replica: the (last stage's) leader."""
        rep = self.replicas[replica]
        return self.stage_ranks(replica, rep.stages - 1)[0]

    @property
    def eval_replica(self) -> int:
        """Validation runs on the first full replica (the global weights, unconstrained)."""
        return next((r.index for r in self.replicas if r.kind == "full"), 0)

    def eval_ranks(self, replica: int | None = None) -> list[int]:
        """Who evaluates: a full replica's leader, or every stage of a pipeline (the last has the loss)."""
        replica = self.eval_replica if replica is None else replica
        if self.replicas[replica].kind == "full":
            return [self.leader(replica)]
        return [self.stage_ranks(replica, s)[0] for s in range(self.replicas[replica].stages)]

    # ----- segments and groups -----------------------------------------------------------------
    def segments_in(self, layers: tuple[int, int]) -> list[int]:
        return [g for g, (a, b) in enumerate(self.segments) if layers[0] <= a and b <= layers[1]]

    def owned_segments(self, rank: int) -> list[int]:
        """Segments whose outer round ``rank`` takes part in (none for a follower device)."""
        slot = self.slot(rank)
        return self.segments_in(slot.layers) if slot.is_leader else []

    @staticmethod
    def segment_group(g: int) -> str:
        return f"segment{g}"

    def segment_members(self, g: int) -> list[int]:
        return [w.rank for w in self.workers if g in self.owned_segments(w.rank)]

    @staticmethod
    def replica_group(replica: int) -> str:
        return f"replica{replica}"

    def byte_groups(self) -> dict[str, list[int]]:
        """Named groups for the Transport (the world group is implicit)."""
        groups = {self.segment_group(g): self.segment_members(g) for g in range(len(self.segments))}
        for rep in self.replicas:
            if rep.kind == "pipeline":
                groups[self.replica_group(rep.index)] = self.ranks(rep.index)
        return groups

    def device_group_specs(self) -> list[tuple[int, ...]]:
        """Rank tuples that need a torch process group, created once at start-up: each multi-device
        replica, DeepSpeed's single-rank groups, and every group an adaptive-SP plan may use."""
        specs: list[tuple[int, ...]] = []
        for rep in self.replicas:
            if rep.kind == "full" and rep.devices > 1:
                ranks = tuple(self.ranks(rep.index))
                specs.append(ranks)
                if rep.parallel == "deepspeed":  # its "model-parallel" group: each process alone
                    specs.extend((r,) for r in ranks)
                if rep.parallel == "sp":
                    specs.extend(tuple(ranks[i] for i in g) for g in sp_candidate_groups(rep))
        return list(dict.fromkeys(specs))

    # ----- data, links, resources --------------------------------------------------------------
    def data_shard(self, rank: int) -> tuple[int, int]:
        """``(shard, n_shards)`` of the token sampler: one per full-replica device, one per pipeline."""
        def unit(w: WorkerSlot) -> tuple[int, int]:  # a pipeline's stages and an SP replica's devices share one
            rep = self.replicas[w.replica]
            return w.replica, w.device if rep.kind == "full" and rep.parallel != "sp" else 0

        units = list(dict.fromkeys(unit(w) for w in self.workers))
        return units.index(unit(self.slot(rank))), len(units)

    def links(self) -> dict[int, Link]:
        return {w.rank: Link(w.spec.up_mbps, w.spec.down_mbps, w.spec.latency_ms) for w in self.workers}

    def ray_bundle(self, rank: int) -> dict[str, float]:
        """The placement-group bundle of one worker's actor."""
        spec = self.slot(rank).spec
        b: dict[str, float] = {"CPU": float(spec.cpus)}
        if spec.gpus > 0:
            b["GPU"] = float(spec.gpus)
        if spec.memory_mb > 0:
            b["memory"] = float(spec.memory_mb) * 2**20
        if not any(v > 0 for v in b.values()):
            raise ValueError(f"worker {rank}: its Ray bundle reserves nothing (give its replica cpus > 0)")
        return b

    def describe(self) -> str:
        """One line per replica, for logs and --help examples."""
        lines = []
        for rep in self.replicas:
            ranks = self.ranks(rep.index)
            lines.append(f"replica {rep.index}: {rep.kind} ({rep.parallel}), layers {list(rep.bounds)}, "
                         f"ranks {ranks[0]}..{ranks[-1]}")
        lines.append(f"segments: {self.segments}")
        return "\n".join(lines)
