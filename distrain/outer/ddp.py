"""The AdamW-DDP baseline as an outer optimiser: gradients averaged over all replicas every inner step.

Dense fp32 on the wire, through the same validated frames and robust bounds as the rounds.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distrain.comm.codecs import Codec, make_codec
from distrain.comm.robust import RobustPolicy
from distrain.comm.transport import Transport
from distrain.outer.base import OuterOptimizer, RoundStats, Weights
from distrain.outer.exchange import FrameExchange


class DDPOuter(OuterOptimizer):
    """Average gradients over all replicas before every inner optimiser step (dense fp32)."""

    def __init__(self, initial: Weights, transport: Transport, group: str, run_id: str, rank: int,
                 policy: RobustPolicy | None = None):
        super().__init__(initial)
        device = next(iter(initial.values())).device
        self.exchange = FrameExchange(make_codec("dense", dtype="fp32"), self.shapes, transport, group, run_id, rank,
                                      device, policy)
        self.step = 0
        self.wire = 0
        self.dense_bytes = sum(t.numel() * 4 for t in initial.values())
        self.reasons: list[str] = []
        self.contributors = 0
        self.clipped = 0

    @torch.no_grad()
    def grad_sync(self, grads: list[torch.Tensor]) -> None:
        named = {n: g.float() for n, g in zip(self.names, grads)}
        got = self.exchange.exchange(self.step, named, {})
        if got.aggregate is not None:  # nothing usable arrived: this replica steps on its own gradients
            for g, n in zip(grads, self.names):
                g.copy_(got.aggregate[n])
        self.step += 1
        self.wire += got.wire_bytes
        self.contributors = len(got.kept)
        self.reasons += got.reasons
        self.clipped += got.clipped

    def sync_round(self, round_idx: int, local: Weights, steps: int = 0, tokens: int = 0) -> tuple[RoundStats, None]:
        stats = RoundStats(round_idx, self.wire, self.dense_bytes, self.contributors, len(self.reasons), self.reasons,
                           clipped=self.clipped)
        self.wire, self.reasons, self.clipped = 0, [], 0
        return stats, None

    def wrap_encoder(self, wrap: Callable[[Codec], Codec]) -> bool:
        self.exchange.wrap_encoder(wrap)
        return True

    def own_meta(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_own(self, tables: dict[str, Weights], meta: dict[str, Any]) -> None:
        self.step = int(meta.get("step", 0))
