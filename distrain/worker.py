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
from distrain.data import DocumentSampler, PreparedData, TokenSampler, read_shard
from distrain.data.documents import document_lengths
from distrain.layout import Layout, segment_of
from distrain.model import build_model, initial_tensor
from distrain.outer import (
    OuterOptimizer,
    PseudoGradientOuter,
    RoundStats,
    Weights,
    make_codec_from_config,
    make_outer,
)
from distrain.pipeline_trainer import PipelineTrainer
from distrain.replica_devices import ReplicaDevices
from distrain.schedules import InnerSchedule, build_schedule
from distrain.sp_trainer import SPTrainer
from distrain.stage import (
    EMBEDDING,
    BuiltStage,
    EmbeddingRelay,
    EmbeddingShadow,
    build_stage,
    needs_embedding_shadow,
    project_global,
    span_split,
)
from parallel.pipeline import StagePlace
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


class Worker:
    """A parameter set (whole model or stage), its inner schedule, data stream and segment syncs."""

    def __init__(self, cfg: Config, layout: Layout, rank: int, stage: BuiltStage, schedule: InnerSchedule,
                 syncs: dict[int, OuterOptimizer], sampler: TokenSampler | DocumentSampler, steps_per_round: int,
                 clock: ComputeClock | None = None, shadow: EmbeddingShadow | None = None,
                 relay: EmbeddingRelay | None = None):
        """``relay``/``shadow``: a compressed pipeline in a round-based run — its first stage relays
        the embedding's aggregate, its later stages follow the global embedding in ``shadow``."""
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.slot = layout.slot(rank)
        self.replica = self.slot.replica
        self.rep = layout.replicas[self.replica]
        self.model, self.view, self.sub = stage.model, stage.view, stage.sub
        self.schedule, self.syncs, self.sampler = schedule, syncs, sampler
        self.steps_per_round = steps_per_round
        self.speed = self.rep.speed  # devices and stages move in lock-step
        self.clock = clock
        self.shadow, self.relay = shadow, relay
        self.tokens = 0
        # a pipeline's later stages and an SP replica's other devices read the same batches
        self.reads_data = self.slot.stage == 0 and (self.rep.parallel != "sp" or self.slot.device == 0)
        self.has_loss = rank == layout.reporter(self.replica) or self.rep.kind == "full"
        self.rounds = [g for g, s in syncs.items() if isinstance(s, PseudoGradientOuter)]
        self._evals = 0

    @property
    def trainer(self) -> InnerSchedule:
        return self.schedule

    def run_round(self, round_idx: int, max_steps: int | None = None) -> RoundReport:
        """Run the inner steps, then the outer round of every owned segment, for ``round_idx``."""
        steps = self.steps_per_round if max_steps is None else min(self.steps_per_round, max_steps)
        losses, compute_s, lr, tokens, train_s = [], 0.0, 0.0, 0, 0.0
        extra: dict[str, float] = {}
        for _ in range(steps):
            res = self.schedule.train_step()
            train_s += res.seconds
            losses.append(res.loss)
            tokens += res.tokens
            lr = res.lr
            compute_s += (self.cfg.network.step_time_s or res.seconds) / self.speed
            for k, v in getattr(self.schedule, "last", {}).items():
                extra[k] = extra.get(k, 0.0) + v
        if self.clock is not None and not getattr(self.schedule, "charges_clock", False):
            self.clock.advance(compute_s)
        tokens = tokens if self.reads_data else 0
        self.tokens += tokens
        stats = self._sync(round_idx, extra)
        loss = float(np.mean(losses)) if losses and self.has_loss else float("nan")
        return RoundReport(self.rank, self.replica, round_idx, steps, self.schedule.step, tokens, loss, lr,
                           compute_s, stats, extra={"train_s": train_s, **extra})

    def _sync(self, round_idx: int, extra: dict[str, float]) -> list[RoundStats]:
        """Every owned segment's outer round; then the replica starts from what came back."""
        local = self.view.read() if self.rounds else {}
        stats, targets = [], {}
        for sync in self.syncs.values():
            st, target = sync.sync_round(round_idx, {n: local[n] for n in sync.names} if local else {})
            if st is not None:
                stats.append(st)
            targets.update(target or {})
        if self.relay is not None and self.slot.stage == 0 and self.rep.stages > 1:
            kept = [(m, t[EMBEDDING]) for m, t in self.syncs[0].exchange.kept]  # to the later stages
            extra["relay_bytes"] = float(self.relay.send(self.later_stages(), kept, round_idx))
        if self.shadow is not None and self.relay is not None:
            first = self.layout.stage_ranks(self.replica, 0)[0]
            kept = self.relay.receive(first, round_idx)
            self.shadow.receive(self.shadow.aggregate(kept, self.shadow.embedding.device), round_idx)
        if targets:
            self._start_from(targets)
        self.schedule.refresh()  # a multi-device replica's devices take the leader's new weights
        return stats

    def later_stages(self) -> list[int]:
        return [self.layout.stage_ranks(self.replica, s)[0] for s in range(1, self.rep.stages)]

    def _start_from(self, targets: Weights) -> None:
        """Load the segments' targets (through the constraint) and tell each what the replica got."""
        self.view.write(targets, embedding=self.shadow.embedding if self.shadow is not None else None)
        actual = None if self.view.exact else self.view.read()
        for g in self.rounds:
            self.syncs[g].started({n: actual[n] for n in self.syncs[g].names} if actual is not None else None)

    def finish(self) -> None:
        """End of run: apply what is still in flight (``outer.apply_delay``), so every replica
        ends on the global weights."""
        targets = {}
        for sync in self.syncs.values():
            targets.update(sync.flush() or {})
        if self.shadow is not None:
            self.shadow.flush()
        if targets:
            self._start_from(targets)
        self.schedule.refresh()

    # ----- global weights: the unit of catch-up and of the initial broadcast -------------------
    def global_state(self) -> Weights:
        """The replica-independent weights of the parameters this worker holds (fp32, CPU)."""
        if not self.rounds:
            return {n: t.detach().cpu().clone() for n, t in self.view.read().items()}
        return {n: t for g in self.rounds for n, t in self.syncs[g].global_state().items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.view.read().items()}

    def segment_shapes(self, g: int) -> dict[str, tuple[int, ...]]:
        """Shapes of this worker's parameters in segment ``g`` (a catch-up frame's schema)."""
        lay = self.layout
        return {n: s for n, s in self.param_shapes().items() if segment_of(n, lay.n_layers, lay.segments) == g}

    @torch.no_grad()
    def load_global(self, params: Weights, embedding: torch.Tensor | None = None) -> None:
        """Start from ``params`` (every parameter this worker holds) as the global weights;
        ``embedding``: the global embedding, for a later stage of a compressed pipeline."""
        own = self.param_shapes()
        if set(params) != set(own):
            raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")
        if self.shadow is not None and embedding is not None:
            self.shadow.reset_to(embedding)
        targets = {}
        for g in self.rounds:
            targets.update(self.syncs[g].reset_to({n: params[n] for n in self.syncs[g].names}))
        self._start_from(targets or params)
        self.schedule.refresh()

    def catch_up(self, params: Weights, rounds_done: int, embedding: torch.Tensor | None = None) -> None:
        """Join at round ``rounds_done`` from the current global weights.

        A restarted worker has lost its error-feedback buffer and AdamW moments (they restart at
        zero); its step count, learning-rate schedule and data position are moved to where a
        worker that never failed would be, so it trains on fresh data at the right rate.
        """
        self.load_global(params, embedding)
        target = min(rounds_done * self.steps_per_round, self.schedule.cfg.steps)
        self.schedule.seek(target)
        self._seek_data(target * self.cfg.train.grad_accum if isinstance(self.sampler, TokenSampler) else target)

    def _seek_data(self, batches: int) -> None:
        """Put the data stream where a worker that never failed is after ``batches`` batches."""
        if isinstance(self.sampler, TokenSampler):
            bpe = self.sampler.batches_per_epoch
            self.sampler.load_state_dict({"epoch": batches // bpe, "position": batches % bpe})
            return
        self.sampler.load_state_dict({"epoch": 0, "position": 0})  # document batches vary in size: replay
        for _ in range(batches):
            self.sampler.next_batch()

    # ----- state --------------------------------------------------------------------------------
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Validation loss of the global weights: a full replica's model (which holds them at a
        round's end), or an unconstrained copy of each stage passed through the pipeline."""
        if self.rep.kind == "full":
            return self.schedule.evaluate(batches)
        self._evals += 1
        copy = build_model(self.cfg.model, *self.slot.layers).to(next(self.model.parameters()).device)
        copy.load_state_dict({**copy.state_dict(), **self.global_state()})
        return self.schedule.evaluate_weights(copy, batches, (1 << 40) + self._evals)

    def state_dict(self) -> dict[str, Any]:
        out = {"trainer": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
               "outer": {str(g): sync.state_dict() for g, sync in self.syncs.items()}, "tokens": self.tokens}
        if self.shadow is not None:
            out["embedding_shadow"] = self.shadow.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        if set(state["outer"]) != {str(g) for g in self.syncs}:
            raise ValueError(f"checkpoint holds segments {sorted(state['outer'])}, this worker owns "
                             f"{sorted(self.syncs)}")
        for g, sync in self.syncs.items():
            sync.load_state_dict(state["outer"][str(g)])
        if self.shadow is not None:
            self.shadow.load_state_dict(state["embedding_shadow"])
        self.tokens = int(state["tokens"])


def build_worker(cfg: Config, layout: Layout, rank: int, data: PreparedData, transport: Transport,
                 device_groups: DeviceGroups | None = None, clock: ComputeClock | None = None) -> Worker:
    """The worker of ``rank``: its stage of the model (seeded by name, so every replica and
    stage starts from the same weights), its segments' outer optimisers, its inner schedule."""
    slot = layout.slot(rank)
    rep = layout.replicas[slot.replica]
    device = resolve_device(cfg.run.device)
    stage = build_stage(cfg, slot, rep, device)
    post_step = None
    if cfg.topology.compress_sync == "project_global":
        compressed = [r for r in layout.replicas if r.compressed]
        post_step = project_global(cfg, compressed[0], device) if compressed else None
    combine = span_split(cfg, layout, make_codec_from_config(cfg), device) if cfg.algorithm.rounds else None
    syncs: dict[int, OuterOptimizer] = {}
    for g in layout.owned_segments(rank):
        mine = {n: t.to(device) for n, t in stage.initial.items()
                if segment_of(n, layout.n_layers, layout.segments) == g}
        syncs[g] = make_outer(cfg, mine, rank, transport, layout.segment_group(g), g, post_step, combine)
    spr = steps_per_round(cfg, rep.speed, max(r.speed for r in layout.replicas))
    shard, n_shards = layout.data_shard(rank)
    tokens = read_shard(data.train_path)
    sampler: TokenSampler | DocumentSampler
    if cfg.data.sampler == "documents":
        max_doc_len, batch_tokens = document_lengths(cfg.data, cfg.model.max_seq_len, cfg.train.batch_size)
        sampler = DocumentSampler(tokens, data.eos_id, max_doc_len, batch_tokens, rank=shard, world_size=n_shards,
                                  seed=cfg.run.seed)
    else:
        sampler = TokenSampler(tokens, cfg.data.seq_len, cfg.train.batch_size, rank=shard, world_size=n_shards,
                               seed=cfg.run.seed)
    train_cfg = replica_train_config(cfg, spr)
    seed = cfg.run.seed * 1000 + slot.replica
    devices = None
    if rep.kind == "full" and rep.devices > 1:
        if device_groups is None:
            raise ValueError(f"replica {rep.index} has {rep.devices} devices: its workers need device groups")
        devices = ReplicaDevices.of(device_groups, layout.ranks(rep.index), rank, solo=rep.parallel == "deepspeed")
    if rep.parallel == "sp":
        schedule: InnerSchedule = SPTrainer(stage.model, train_cfg, sampler, device, devices, device_groups,
                                            cfg.model.n_heads, [w.speed for w in rep.workers], rep.sp_capacity,
                                            rep.sp_costs)
    elif rep.kind == "pipeline":
        place = StagePlace(tuple(layout.stage_ranks(rep.index, s)[0] for s in range(rep.stages)), slot.stage,
                           layout.replica_group(rep.index))
        share = (slot.layers[1] - slot.layers[0]) / layout.n_layers
        schedule = PipelineTrainer(
            stage.model, train_cfg, sampler.next_batch, device, transport, place, rep.microbatches, rep.schedule,
            rep.wire_dtype, stage.sub, clock, cfg.network.step_time_s, share, rep.speed, seed)
    else:
        grad_sync = syncs[0].grad_sync if cfg.algorithm.per_step and 0 in syncs else None
        schedule = build_schedule(rep.parallel, stage.model, train_cfg, sampler.next_batch, device, seed, devices,
                                  grad_sync, cfg.runtime.zero_stage)
    shadow = relay = None
    if rep.compressed and cfg.algorithm.rounds:
        codec = make_codec_from_config(cfg)
        shape = (cfg.model.vocab_size, cfg.model.dim)
        relay = EmbeddingRelay(transport, codec, shape, cfg.run_id(), rank, max_parts=layout.n_replicas)
        if needs_embedding_shadow(cfg, rep, slot):
            e0 = initial_tensor(cfg.model, EMBEDDING, shape, cfg.run.seed).to(device)
            shadow = EmbeddingShadow(cfg, e0, codec, combine)
    worker = Worker(cfg, layout, rank, stage, schedule, syncs, sampler, spr, clock, shadow, relay)
    if not stage.view.exact:  # a compressed stage starts from the initial weights mapped onto its constraint
        worker.load_global(stage.initial)
    return worker


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
