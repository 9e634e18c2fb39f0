"""One worker: a replica's inner training plus its share of the outer round.

The same ``Worker.run_round`` runs in simulation (threads over an in-process transport), under
torchrun (one process per worker, torch.distributed transport) and under Ray (one actor per
worker); only the transport it is given differs. ``build_worker`` is the one way every mode
builds a worker, which is what makes the modes produce bit-identical weights.

A worker of a multi-process replica (see ``distrain.replica``) trains its inner steps
data-parallel with the other processes of its replica; only the replica's leader takes part in
the outer round, and it hands the result to the others over the replica's fast group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from comm.codecs import make_codec
from comm.transport import Transport
from comm.wire import FrameLimits, FrameMeta, decode_frame, encode_frame
from distrain.config import Config, TrainConfig
from distrain.data import TokenSampler
from distrain.model import Transformer, build_model
from distrain.outer import OuterOptimizer, PseudoGradientOuter, RoundStats, make_outer, owned_parameters
from distrain.trainer import InnerTrainer, resolve_device

if TYPE_CHECKING:
    from distrain.replica import ReplicaGroup


@dataclass
class RoundReport:
    rank: int
    round: int
    steps: int
    step: int  # inner steps done by this worker so far
    tokens: int
    train_loss: float
    lr: float
    compute_s: float
    outer: RoundStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundReport":
        """Rebuild a report sent between processes as a plain (msgpack) map."""
        d = dict(d)
        outer = d.pop("outer", None)
        return cls(**d, outer=RoundStats(**outer) if outer is not None else None)


def steps_per_round(cfg: Config, replica: int) -> int:
    """Inner steps this replica runs per round under the configured straggler policy."""
    h = cfg.outer.inner_steps if cfg.outer.algorithm in ("diloco", "sparseloco") else cfg.logging.log_every
    speeds = cfg.topology.compute_speeds
    if cfg.topology.straggler_policy == "fewer_steps" and speeds and cfg.outer.algorithm in ("diloco", "sparseloco"):
        return max(1, round(h * speeds[replica] / max(speeds)))
    return max(1, h)


def replica_train_config(cfg: Config, spr: int) -> TrainConfig:
    """A replica doing fewer steps per round runs its schedule over proportionally fewer steps,
    so every replica is at the same point of warm-up and cosine decay in every round."""
    nominal = max(1, cfg.outer.inner_steps if cfg.outer.algorithm in ("diloco", "sparseloco") else cfg.logging.log_every)
    if spr == nominal:
        return cfg.train
    scale = spr / nominal
    return dataclasses.replace(cfg.train, steps=max(1, math.ceil(cfg.train.steps * scale)),
                               warmup_steps=math.ceil(cfg.train.warmup_steps * scale))


def compute_speed(cfg: Config, replica: int) -> float:
    speeds = cfg.topology.compute_speeds
    return speeds[replica] if speeds else 1.0


def run_id(cfg: Config) -> str:
    """What every frame of this run carries (frames of another run are rejected)."""
    return f"{cfg.run.name}-{cfg.hash()}"


class Worker:
    """Holds one replica's model, inner optimiser, data stream and outer-optimiser state."""

    def __init__(self, cfg: Config, rank: int, replica: int, model: Transformer, sampler: TokenSampler,
                 transport: Transport, group: str = "replicas", replica_group: ReplicaGroup | None = None):
        self.cfg = cfg
        self.rank = rank
        self.replica = replica
        self.model = model
        self.sampler = sampler
        self.transport = transport
        self.group = group
        self.replica_group = replica_group
        self.device = next(model.parameters()).device
        leader = replica_group is None or replica_group.is_leader
        self.outer: OuterOptimizer = make_outer(cfg, model, rank, transport, group) if leader else OuterOptimizer()
        self.steps_per_round = steps_per_round(cfg, replica)
        train_cfg = replica_train_config(cfg, self.steps_per_round)
        seed = cfg.run.seed * 1000 + replica
        if replica_group is None:
            self.trainer = InnerTrainer(model, train_cfg, self._next_batch, self.device,
                                        grad_sync=self.outer.grad_sync, seed=seed)
        else:
            self.trainer = replica_group.make_trainer(model, train_cfg, self._next_batch, self.device, seed)
        self.speed = compute_speed(cfg, replica)
        self.tokens = 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def run_round(self, round_idx: int, max_steps: int | None = None) -> RoundReport:
        """Run this replica's inner steps, then the outer synchronisation of ``round_idx``."""
        steps = self.steps_per_round if max_steps is None else min(self.steps_per_round, max_steps)
        losses, compute_s, lr, tokens, train_s = [], 0.0, 0.0, 0, 0.0
        for _ in range(steps):
            res = self.trainer.train_step()
            train_s += res.seconds
            losses.append(res.loss)
            tokens += res.tokens
            lr = res.lr
            step_time = self.cfg.network.step_time_s or res.seconds
            compute_s += step_time / self.speed
        self.transport.advance_compute(compute_s)
        self.tokens += tokens
        stats = self.outer.sync_round(round_idx)
        if self.replica_group is not None:
            self.replica_group.after_outer(self.model, self.trainer)
        return RoundReport(self.rank, round_idx, steps, self.trainer.step, tokens,
                           float(np.mean(losses)) if losses else float("nan"), lr, compute_s, stats,
                           extra={"train_s": train_s})

    def finish(self) -> None:
        """End of run: apply what is still in flight (``outer.apply_delay``), so every replica
        ends on the global weights."""
        flush = getattr(self.outer, "flush", None)
        if flush is not None:
            flush()
        if self.replica_group is not None:
            self.replica_group.after_outer(self.model, self.trainer)

    # ----- global weights: the unit of catch-up and of the initial broadcast -------------------
    def global_params(self) -> dict[str, torch.Tensor]:
        """The replica-independent weights: θ_global for DiLoCo/SparseLoCo, the model otherwise."""
        if isinstance(self.outer, PseudoGradientOuter):
            return {n: t.detach().cpu() for n, t in self.outer.global_params.items()}
        return {n: p.detach().float().cpu() for n, p in owned_parameters(self.model).items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in owned_parameters(self.model).items()}

    @torch.no_grad()
    def load_global(self, params: dict[str, torch.Tensor]) -> None:
        """Start from ``params`` as this run's global weights (initial broadcast or catch-up)."""
        own = owned_parameters(self.model)
        if set(params) != set(own):
            raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")
        for n, p in own.items():
            p.copy_(params[n].to(p.device, p.dtype))
        if isinstance(self.outer, PseudoGradientOuter):
            self.outer.global_params = {n: params[n].detach().float().clone().to(self.device) for n in own}
            self.outer.anchor, self.outer.pending = None, None
        if self.replica_group is not None:
            self.replica_group.after_outer(self.model, self.trainer)

    def catch_up(self, params: dict[str, torch.Tensor], rounds_done: int) -> None:
        """Join at round ``rounds_done`` from the current global weights.

        A restarted worker has lost its error-feedback buffer and AdamW moments (they restart at
        zero); its step count, learning-rate schedule and data position are moved to where a
        replica that never failed would be, so it trains on fresh data at the right rate.
        """
        self.load_global(params)
        target = min(rounds_done * self.steps_per_round, self.trainer.cfg.steps)
        set_schedule_step(self.trainer, target)
        batches = target * self.cfg.train.grad_accum
        bpe = self.sampler.batches_per_epoch
        self.sampler.load_state_dict({"epoch": batches // bpe, "position": batches % bpe})

    # ----- state --------------------------------------------------------------------------------
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return self.trainer.evaluate(batches)

    def state_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state_dict(), "sampler": self.sampler.state_dict(),
                "outer": self.outer.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        self.outer.load_state_dict(state["outer"])
        self.tokens = int(state["tokens"])


def set_schedule_step(trainer: Any, step: int) -> None:
    """Put an inner trainer's step counter and LambdaLR schedule at ``step`` (no optimiser step)."""
    trainer.step = int(step)
    sched = trainer.scheduler
    sched.last_epoch = int(step)
    lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports


def build_worker(cfg: Config, rank: int, replica: int, train_tokens: np.ndarray, transport: Transport,
                 initial_state: dict[str, torch.Tensor] | None = None, group: str = "replicas",
                 data_shard: tuple[int, int] | None = None, replica_group: ReplicaGroup | None = None) -> Worker:
    """Every replica starts from the same weights: seeded init, or ``initial_state`` when given.

    ``data_shard = (shard, n_shards)`` of the token sampler; default ``(replica, replicas)``.
    """
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    shard, n_shards = data_shard if data_shard is not None else (replica, cfg.topology.replicas)
    sampler = TokenSampler(train_tokens, cfg.data.seq_len, cfg.train.batch_size, rank=shard,
                           world_size=n_shards, seed=cfg.run.seed)
    return Worker(cfg, rank, replica, model, sampler, transport, group, replica_group)


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
