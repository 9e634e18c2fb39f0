"""One worker: the owner of a parameter set, an injected inner schedule, and its segments' outer rounds.

A worker holds a whole model (a full replica's device) or one stage's layers (a pipeline stage),
runs its inner steps with the schedule its replica asks for (``distrain.schedules``), and takes
part in the outer round of each segment it owns (``distrain.layout``), in that segment's group.
The same ``Worker.run_round`` runs in simulation (threads over an in-process transport), under
torchrun (one process per worker) and under Ray (one actor per worker); ``build_worker`` is the
one way every mode builds one, which is what makes the modes produce bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from comm.clock import ComputeClock
from comm.codecs import make_codec
from comm.device_groups import DeviceGroups
from comm.transport import Transport
from comm.wire import FrameLimits, FrameMeta, decode_frame, encode_frame
from distrain.config import Config, TrainConfig
from distrain.data import TokenSampler
from distrain.layout import Layout, segment_of
from distrain.model import build_model
from distrain.outer import OuterOptimizer, RoundStats, make_outer, owned_parameters
from distrain.replica_devices import ReplicaDevices
from distrain.schedules import InnerSchedule, build_schedule
from distrain.trainer import resolve_device


@dataclass
class RoundReport:
    rank: int
    replica: int
    round: int
    steps: int
    step: int  # inner steps done by this worker so far
    tokens: int  # tokens of its data stream trained this round (0 for a stage that reads no new data)
    train_loss: float  # nan for a worker that computes no loss (a pipeline stage before the last)
    lr: float
    compute_s: float
    outer: list[RoundStats] = field(default_factory=list)  # one per segment it synced
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundReport":
        """Rebuild a report sent between processes as a plain (msgpack) map."""
        d = dict(d)
        outer = [RoundStats(**o) for o in d.pop("outer", [])]
        return cls(**d, outer=outer)


def nominal_steps(cfg: Config) -> int:
    """Inner steps per round: H for the round-based algorithms, the logging period otherwise."""
    return max(1, cfg.outer.inner_steps if cfg.algorithm.rounds else cfg.logging.log_every)


def steps_per_round(cfg: Config, speed: float, fastest: float) -> int:
    """Inner steps a replica of ``speed`` runs per round under the configured straggler policy."""
    h = nominal_steps(cfg)
    if cfg.topology.straggler_policy == "fewer_steps" and cfg.algorithm.rounds:
        return max(1, round(h * speed / fastest))
    return h


def replica_train_config(cfg: Config, spr: int) -> TrainConfig:
    """A replica doing fewer steps per round runs its schedule over proportionally fewer steps,
    so every replica is at the same point of warm-up and cosine decay in every round."""
    nominal = nominal_steps(cfg)
    if spr == nominal:
        return cfg.train
    scale = spr / nominal
    return dataclasses.replace(cfg.train, steps=max(1, math.ceil(cfg.train.steps * scale)),
                               warmup_steps=math.ceil(cfg.train.warmup_steps * scale))


def run_id(cfg: Config) -> str:
    """What every frame of this run carries (frames of another run are rejected)."""
    return f"{cfg.run.name}-{cfg.hash()}"


class Worker:
    """A parameter set (whole model or stage), its inner schedule, data stream and segment syncs."""

    def __init__(self, cfg: Config, layout: Layout, rank: int, model: torch.nn.Module, schedule: InnerSchedule,
                 syncs: dict[int, OuterOptimizer], sampler: TokenSampler, steps_per_round: int,
                 clock: ComputeClock | None = None):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.slot = layout.slot(rank)
        self.replica = self.slot.replica
        self.model, self.schedule, self.syncs, self.sampler = model, schedule, syncs, sampler
        self.steps_per_round = steps_per_round
        self.speed = layout.replicas[self.replica].speed  # devices and stages move in lock-step
        self.clock = clock
        self.tokens = 0
        self.reads_data = self.slot.stage == 0  # a pipeline's later stages read the same batches
        self.has_loss = rank == layout.reporter(self.replica) or layout.replicas[self.replica].kind == "full"

    @property
    def trainer(self) -> InnerSchedule:
        return self.schedule

    def run_round(self, round_idx: int, max_steps: int | None = None) -> RoundReport:
        """Run the inner steps, then the outer round of every owned segment, for ``round_idx``."""
        steps = self.steps_per_round if max_steps is None else min(self.steps_per_round, max_steps)
        losses, compute_s, lr, tokens, train_s = [], 0.0, 0.0, 0, 0.0
        for _ in range(steps):
            res = self.schedule.train_step()
            train_s += res.seconds
            losses.append(res.loss)
            tokens += res.tokens
            lr = res.lr
            compute_s += (self.cfg.network.step_time_s or res.seconds) / self.speed
        if self.clock is not None:
            self.clock.advance(compute_s)
        tokens = tokens if self.reads_data else 0
        self.tokens += tokens
        stats = [s for s in (sync.sync_round(round_idx) for sync in self.syncs.values()) if s is not None]
        self.schedule.refresh()  # a multi-device replica's devices take the leader's new weights
        loss = float(np.mean(losses)) if losses and self.has_loss else float("nan")
        return RoundReport(self.rank, self.replica, round_idx, steps, self.schedule.step, tokens, loss, lr,
                           compute_s, stats, extra={"train_s": train_s})

    def finish(self) -> None:
        """End of run: apply what is still in flight (``outer.apply_delay``), so every replica
        ends on the global weights."""
        for sync in self.syncs.values():
            sync.flush()
        self.schedule.refresh()

    # ----- global weights: the unit of catch-up and of the initial broadcast -------------------
    def global_state(self) -> dict[str, torch.Tensor]:
        """The replica-independent weights of the parameters this worker holds (fp32, CPU)."""
        if not self.syncs:
            return {n: p.detach().float().cpu().clone() for n, p in owned_parameters(self.model).items()}
        return {n: t for sync in self.syncs.values() for n, t in sync.global_state().items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in owned_parameters(self.model).items()}

    def segment_shapes(self, g: int) -> dict[str, tuple[int, ...]]:
        """Shapes of this worker's parameters in segment ``g`` (a catch-up frame's schema)."""
        lay = self.layout
        return {n: s for n, s in self.param_shapes().items() if segment_of(n, lay.n_layers, lay.segments) == g}

    @torch.no_grad()
    def load_global(self, params: dict[str, torch.Tensor]) -> None:
        """Start from ``params`` (every parameter this worker holds) as the global weights."""
        own = owned_parameters(self.model)
        if set(params) != set(own):
            raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")
        for n, p in own.items():
            p.copy_(params[n].to(p.device, p.dtype))
        for sync in self.syncs.values():
            sync.reset_to({n: params[n] for n in sync.params})
        self.schedule.refresh()

    def catch_up(self, params: dict[str, torch.Tensor], rounds_done: int) -> None:
        """Join at round ``rounds_done`` from the current global weights.

        A restarted worker has lost its error-feedback buffer and AdamW moments (they restart at
        zero); its step count, learning-rate schedule and data position are moved to where a
        worker that never failed would be, so it trains on fresh data at the right rate.
        """
        self.load_global(params)
        target = min(rounds_done * self.steps_per_round, self.schedule.cfg.steps)
        self.schedule.seek(target)
        batches = target * self.cfg.train.grad_accum
        bpe = self.sampler.batches_per_epoch
        self.sampler.load_state_dict({"epoch": batches // bpe, "position": batches % bpe})

    # ----- state --------------------------------------------------------------------------------
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return self.schedule.evaluate(batches)

    def state_dict(self) -> dict[str, Any]:
        return {"trainer": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
                "outer": {str(g): sync.state_dict() for g, sync in self.syncs.items()}, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        if set(state["outer"]) != {str(g) for g in self.syncs}:
            raise ValueError(f"checkpoint holds segments {sorted(state['outer'])}, this worker owns "
                             f"{sorted(self.syncs)}")
        for g, sync in self.syncs.items():
            sync.load_state_dict(state["outer"][str(g)])
        self.tokens = int(state["tokens"])


def build_worker(cfg: Config, layout: Layout, rank: int, train_tokens: np.ndarray, transport: Transport,
                 device_groups: DeviceGroups | None = None, clock: ComputeClock | None = None) -> Worker:
    """The worker of ``rank``: its stage of the model (seeded by name, so every replica and
    stage starts from the same weights), its segments' outer optimisers, its inner schedule."""
    slot = layout.slot(rank)
    rep = layout.replicas[slot.replica]
    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model, *slot.layers, seed=cfg.run.seed).to(device)
    params = owned_parameters(model)
    syncs: dict[int, OuterOptimizer] = {}
    for g in layout.owned_segments(rank):
        mine = {n: p for n, p in params.items() if segment_of(n, layout.n_layers, layout.segments) == g}
        syncs[g] = make_outer(cfg, mine, rank, transport, layout.segment_group(g), g)
    spr = steps_per_round(cfg, rep.speed, max(r.speed for r in layout.replicas))
    shard, n_shards = layout.data_shard(rank)
    sampler = TokenSampler(train_tokens, cfg.data.seq_len, cfg.train.batch_size, rank=shard,
                           world_size=n_shards, seed=cfg.run.seed)
    devices = None
    if rep.kind == "full" and rep.devices > 1:
        if device_groups is None:
            raise ValueError(f"replica {rep.index} has {rep.devices} devices: its workers need device groups")
        devices = ReplicaDevices.of(device_groups, layout.ranks(rep.index), rank, solo=rep.parallel == "deepspeed")
    grad_sync = syncs[0].grad_sync if cfg.algorithm.per_step and 0 in syncs else None
    schedule = build_schedule(rep.parallel, model, replica_train_config(cfg, spr), sampler.next_batch, device,
                              cfg.run.seed * 1000 + slot.replica, devices, grad_sync, cfg.runtime.zero_stage)
    return Worker(cfg, layout, rank, model, schedule, syncs, sampler, spr, clock)


# ----- weights as wire frames (never pickled) ----------------------------------------------------
_DENSE = make_codec("dense", dtype="fp32")


def encode_params(params: dict[str, torch.Tensor], run: str, round_idx: int, sender: int) -> bytes:
    """Weights as one validated wire frame: dense fp32, uncompressed (weights barely compress)."""
    encoded = {n: _DENSE.encode(n, t.detach().float().cpu(), {}) for n, t in params.items()}
    return encode_frame(FrameMeta.for_codec(run, round_idx, sender, _DENSE), encoded, compress=False)


def decode_params(data: bytes, shapes: dict[str, tuple[int, ...]], run: str, round_idx: int) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_params``, validated against the local shapes; bit-exact."""
    raw = sum(4 * math.prod(s) for s in shapes.values())
    limits = FrameLimits(max_payload_bytes=raw, max_raw_bytes=raw, max_tensors=max(1, len(shapes)))
    _, tensors = decode_frame(data, shapes, run, round_idx, limits, codec=_DENSE)
    return {n: _DENSE.decode_aggregate([et], shapes[n]) for n, et in tensors.items()}
