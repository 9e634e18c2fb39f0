"""One worker: a replica's inner training plus its share of the outer round.

The same ``Worker.run_round`` runs in simulation (threads over an in-process transport), under
torchrun (one process per worker, torch.distributed transport) and under Ray (one actor per
worker); only the transport it is given differs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from comm.transport import Transport
from distrain.config import Config, TrainConfig
from distrain.data import TokenSampler
from distrain.model import Transformer, build_model
from distrain.outer import OuterOptimizer, RoundStats, make_outer
from distrain.trainer import InnerTrainer, resolve_device


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


class Worker:
    """Holds one replica's model, inner optimiser, data stream and outer-optimiser state."""

    def __init__(self, cfg: Config, rank: int, replica: int, model: Transformer, sampler: TokenSampler,
                 transport: Transport, group: str = "replicas"):
        self.cfg = cfg
        self.rank = rank
        self.replica = replica
        self.model = model
        self.sampler = sampler
        self.transport = transport
        self.group = group
        self.device = next(model.parameters()).device
        self.outer: OuterOptimizer = make_outer(cfg, model, rank, transport, group)
        self.steps_per_round = steps_per_round(cfg, replica)
        self.trainer = InnerTrainer(model, replica_train_config(cfg, self.steps_per_round), self._next_batch,
                                    self.device, grad_sync=self.outer.grad_sync, seed=cfg.run.seed * 1000 + replica)
        self.speed = compute_speed(cfg, replica)
        self.tokens = 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def run_round(self, round_idx: int, max_steps: int | None = None) -> RoundReport:
        """Run this replica's inner steps, then the outer synchronisation of ``round_idx``."""
        steps = self.steps_per_round if max_steps is None else min(self.steps_per_round, max_steps)
        losses, compute_s, lr, tokens = [], 0.0, 0.0, 0
        for _ in range(steps):
            res = self.trainer.train_step()
            losses.append(res.loss)
            tokens += res.tokens
            lr = res.lr
            step_time = self.cfg.network.step_time_s or res.seconds
            compute_s += step_time / self.speed
        self.transport.advance_compute(compute_s)
        self.tokens += tokens
        stats = self.outer.sync_round(round_idx)
        return RoundReport(self.rank, round_idx, steps, self.trainer.step, tokens,
                           float(np.mean(losses)) if losses else float("nan"), lr, compute_s, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state_dict(), "sampler": self.sampler.state_dict(),
                "outer": self.outer.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.sampler.load_state_dict(state["sampler"])
        self.outer.load_state_dict(state["outer"])
        self.tokens = int(state["tokens"])


def build_worker(cfg: Config, rank: int, replica: int, train_tokens: np.ndarray, transport: Transport,
                 initial_state: dict[str, torch.Tensor] | None = None, group: str = "replicas") -> Worker:
    """Every replica starts from the same weights: seeded init, or ``initial_state`` when given."""
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    sampler = TokenSampler(train_tokens, cfg.data.seq_len, cfg.train.batch_size, rank=replica,
                           world_size=cfg.topology.replicas, seed=cfg.run.seed)
    return Worker(cfg, rank, replica, model, sampler, transport, group)
