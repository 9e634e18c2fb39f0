"""The topology: what each replica is and what each of its workers has, resolved from the config.

``[[topology.replica]]`` tables (``distrain.config.ReplicaConfig``) become ``ReplicaSpec``s: a
kind, an inner parallelism, the layer bounds of its stages (a full replica is one stage holding
every layer) and one ``WorkerSpec`` per worker (its speed, links and Ray resources, defaults
filled in from ``[network]``). ``topology.replicas = N`` is N single-device full replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distrain.config import Config, ReplicaConfig
from distrain.parallel.pipeline.formats import BoundaryFormat, choose_format


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: relative compute speed, access link, and the Ray bundle it reserves."""

    speed: float = 1.0
    up_mbps: float = 100.0
    down_mbps: float = 100.0
    latency_ms: float = 20.0
    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica: ``kind`` full or pipeline, its stages' layer bounds, its workers."""

    index: int
    kind: str
    parallel: str  # single | ddp | deepspeed (full) | pipeline
    bounds: tuple[int, ...]  # stage s holds layers [bounds[s], bounds[s + 1])
    workers: tuple[WorkerSpec, ...]  # a full replica's devices, or a pipeline's stages
    schedule: str = "1f1b"  # pipeline: 1f1b | gpipe
    microbatches: int = 1  # pipeline: micro-batches per step
    wire_dtype: str = "bf16"  # pipeline boundary values
    compress_k: int = 0  # pipeline: boundary coordinates per token (0: uncompressed)
    compress_method: str = "reparam"
    compress_seed: int = 1337
    compress_basis: str = "seeded"  # seeded | embedding (rebuilt from the global embedding every round)
    sp_costs: str = ""  # parallel = "sp": cost-model file (empty: reference costs)
    sp_capacity: int = 0  # parallel = "sp": tokens per device (0: no cap)
    choice: str = ""  # compress = "auto": what the boundary format is, and why
    optimizer: str = "adamw"  # inner optimiser: adamw | adamw8bit | adamw4bit (the table's, else train.optimizer)

    @property
    def compressed(self) -> bool:
        return self.kind == "pipeline" and self.compress_k > 0

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def devices(self) -> int:
        """Devices per stage: a full replica's devices; 1 for each pipeline stage."""
        return len(self.workers) if self.kind == "full" else 1

    @property
    def speed(self) -> float:
        """The replica moves at its slowest worker's pace (lock-step devices, or a pipeline)."""
        return min(w.speed for w in self.workers)


def balanced_bounds(n_layers: int, stages: int) -> tuple[int, ...]:
    """Layer bounds of ``stages`` contiguous stages whose sizes differ by at most one layer.

    The extra layers go to the middle stages first: the first stage also holds the embedding and
    the last the output head, so they take a layer fewer when the split is uneven.
    """
    if not 1 <= stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {stages} stages")
    sizes = [n_layers // stages] * stages
    order = list(range(1, stages - 1)) + [0, stages - 1] if stages > 2 else list(range(stages))
    for i in range(n_layers % stages):
        sizes[order[i]] += 1
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return tuple(bounds)


def _per_worker(value: Any, n: int, default: Any) -> list[Any]:
    if isinstance(value, list):
        return list(value) if value else [default] * n
    return [value] * n


def _replica_spec(index: int, table: ReplicaConfig, cfg: Config) -> ReplicaSpec:
    n_layers = cfg.model.n_layers
    if table.kind == "full":
        bounds: tuple[int, ...] = (0, n_layers)
        parallel = table.parallel
        if parallel == "auto" or (parallel == "single" and cfg.data.sampler == "documents"):
            if cfg.data.sampler == "documents":
                parallel = "sp"  # document batches: planned over the replica's devices (one is a group of one)
            else:
                parallel = "single" if table.devices == 1 else "ddp"
    else:
        bounds = balanced_bounds(n_layers, table.stages) if isinstance(table.stages, int) else tuple(table.stages)
        parallel = "pipeline"
    n = table.workers(n_layers)
    net = cfg.network
    cols = {
        "speed": _per_worker(table.speed, n, 1.0),
        "up_mbps": _per_worker(table.up_mbps, n, net.up_mbps),
        "down_mbps": _per_worker(table.down_mbps, n, net.down_mbps),
        "latency_ms": _per_worker(table.latency_ms, n, net.latency_ms),
        "cpus": _per_worker(table.cpus, n, 1.0),
        "gpus": _per_worker(table.gpus, n, 0.0),
        "memory_mb": _per_worker(table.memory_mb, n, 0),
    }
    workers = tuple(WorkerSpec(**{k: v[i] for k, v in cols.items()}) for i in range(n))
    optimizer = table.optimizer or cfg.train.optimizer
    if table.kind == "full":
        return ReplicaSpec(index, table.kind, parallel, bounds, workers, sp_costs=table.sp_costs,
                           sp_capacity=table.sp_capacity, optimizer=optimizer)
    c = table.subspace
    microbatches = table.microbatches or auto_microbatches(cfg.train.batch_size * cfg.train.grad_accum, n)
    k, wire, note = c.k, table.wire_dtype, ""
    if table.compress == "auto":
        fmt, note = auto_format(cfg, bounds, workers, microbatches)
        k, wire = fmt.k, fmt.wire_dtype
    return ReplicaSpec(index, table.kind, parallel, bounds, workers, table.schedule, microbatches, wire, k, c.method,
                       c.seed, c.basis, choice=note, optimizer=optimizer)


def auto_format(cfg: Config, bounds: tuple[int, ...], workers: tuple[WorkerSpec, ...],
                microbatches: int) -> tuple[BoundaryFormat, str]:
    """``compress = "auto"``: the least lossy boundary format whose transfers fit the slowest link
    between two stages against the least compute a stage does per step (``network.step_time_s``
    scaled by its share of the layers and its speed)."""
    n_layers = bounds[-1]
    mbps = min(min(workers[s].up_mbps, workers[s + 1].down_mbps, workers[s + 1].up_mbps, workers[s].down_mbps)
               for s in range(len(workers) - 1))
    compute = min(cfg.network.step_time_s * (bounds[s + 1] - bounds[s]) / n_layers / workers[s].speed
                  for s in range(len(workers)))
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return choose_format(cfg.model.dim, tokens, microbatches, compute, mbps)


def auto_microbatches(sequences: int, stages: int) -> int:
    """The largest divisor of the step's sequences up to twice the stages (bubble (S−1)/(M+S−1)
    small, micro-batches not too small to compute efficiently)."""
    return max(m for m in range(1, min(sequences, 2 * stages) + 1) if sequences % m == 0)


def resolve_topology(cfg: Config) -> list[ReplicaSpec]:
    """Every replica of the run, tables with ``count`` expanded, in order."""
    out: list[ReplicaSpec] = []
    for table in cfg.topology.tables():
        for _ in range(table.count):
            out.append(_replica_spec(len(out), table, cfg))
    return out
