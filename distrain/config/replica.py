"""What a replica is: the ``[[topology.replica]]`` tables and the ``[topology]`` section.

Checked against the rest of the config when it loads (``distrain.config.checks.check_replica``),
naming the table's index and the file it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass
class CompressConfig:
    """Subspace compression of a pipeline replica's boundaries (``[topology.replica.compress]``)."""

    k: int = 0  # coordinates per token at a boundary (0: send the d-dim activations uncompressed)
    method: str = "reparam"  # reparam (W = U·Z, Z trainable) | project (W ← U·UᵀW after every step)
    seed: int = 1337  # of U (d×k, orthonormal): the same on every worker
    # seeded: U is the seed's, fixed | embedding: rebuilt whenever the stage loads the global weights
    # (every round) from the global embedding's top-k principal directions, turned towards the seed's U
    basis: str = "seeded"


@dataclass
class ReplicaConfig:
    """One ``[[topology.replica]]`` table: a full replica, or a pipeline replica of stage workers.

    Per-worker values (``speed``, links, Ray resources) are one number for every worker of the
    replica or a list with one entry per worker (a full replica's devices, a pipeline's stages);
    an empty list takes the default (speed 1, ``[network]`` links, 1 CPU, no GPU, no memory).
    """

    kind: str = "full"  # full | pipeline
    count: int = 1  # this table stands for `count` identical replicas
    devices: int = 1  # full: processes joined by a fast interconnect
    parallel: str = "auto"  # full: auto (single, or ddp when devices > 1; sp with documents) | single | ddp | deepspeed | sp
    stages: int | list[int] = 0  # pipeline: a stage count (balanced split) or layer bounds [0, a, ..., n_layers]
    speed: float | list[float] = field(default_factory=list)  # relative compute speed (1.0: network.step_time_s)
    up_mbps: float | list[float] = field(default_factory=list)  # default: network.up_mbps
    down_mbps: float | list[float] = field(default_factory=list)  # default: network.down_mbps
    latency_ms: float | list[float] = field(default_factory=list)  # default: network.latency_ms
    cpus: float | list[float] = field(default_factory=list)  # Ray bundle CPUs per worker (default 1)
    gpus: float | list[float] = field(default_factory=list)  # Ray bundle GPUs per worker (default 0)
    memory_mb: int | list[int] = field(default_factory=list)  # Ray memory reservation per worker (default none)
    schedule: str = "1f1b"  # pipeline: 1f1b (activations of at most ~stages micro-batches) | gpipe
    microbatches: int = 0  # pipeline: micro-batches per step, dividing batch_size·grad_accum (0: automatic)
    wire_dtype: str = "bf16"  # pipeline: boundary values bf16 | fp32 | int8 | int4 (per-token quantised)
    # pipeline: subspace compression (a table), or "auto": the boundary format its links can afford
    compress: CompressConfig | str = field(default_factory=CompressConfig)
    sp_costs: str = ""  # parallel = "sp": cost-model JSON from `distrain profile-sp` (empty: reference GPU costs)
    sp_capacity: int = 0  # parallel = "sp": tokens one device holds (0: no memory cap)
    optimizer: str = ""  # this replica's inner optimiser: adamw | adamw8bit | adamw4bit (empty: train.optimizer)

    @property
    def subspace(self) -> CompressConfig:
        """The subspace table (k = 0 when ``compress = "auto"``: the topology decides)."""
        return self.compress if isinstance(self.compress, CompressConfig) else CompressConfig()

    def workers(self, n_layers: int) -> int:
        """Workers of one replica of this table (devices, or stages)."""
        if self.kind == "full":
            return self.devices
        return self.stages if isinstance(self.stages, int) else len(self.stages) - 1


@dataclass
class TopologyConfig:
    replicas: int = 0  # shorthand: N identical single-device full replicas (0: from the tables, or 1)
    replica: list[ReplicaConfig] = field(default_factory=list)  # [[topology.replica]] tables
    # How replicas of different speeds share a round (round-based algorithms):
    # window: a compute window per round; each replica runs as many inner steps as fit, from its own
    #   step time, so all reach the exchange together; fewer_steps: H × speed / fastest steps from the
    #   configured speeds; wait: H steps each, the round waits for the slowest.
    straggler_policy: str = "window"  # window | fewer_steps | wait
    window_s: float = 0.0  # the compute window (0: H × the fastest replica's step time)
    step_times: str = "measured"  # window: measured (EMA of each replica's steps) | configured (speeds only)
    step_plan: str = ""  # window: replay the step counts logged in this metrics.jsonl (reproduce a run)
    grace_s: float = 30.0  # Ray: how long the exchange waits past the first arrival for a late replica
    quorum: float = 1.0  # fraction of replicas a round needs
    round_timeout_s: float = 600.0
    # How a compressed pipeline replica meets unconstrained replicas in one round:
    # project_start: it starts each round from the global weights mapped onto its constraint and
    #   measures its pseudo-gradient from there; split: the same, and for constrained matrices the
    #   compressed replicas vote only on the in-subspace part of the aggregate (the rest is the
    #   unconstrained replicas' mean); project_global: the global weights themselves are projected
    #   onto the constraint after every outer step (node0-style), for every replica.
    compress_sync: str = "project_start"

    def tables(self) -> list[ReplicaConfig]:
        """The replica tables, the shorthand expanded."""
        return self.replica or [ReplicaConfig(count=max(1, self.replicas))]

    @property
    def n_replicas(self) -> int:
        return sum(t.count for t in self.tables())

