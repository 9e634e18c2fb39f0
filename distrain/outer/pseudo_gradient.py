"""DiLoCo and SparseLoCo: exchange a pseudo-gradient every round, then step the global weights.

Choices that differ from the SparseLoCo reference code, on purpose:
- α is applied once, in the outer step (θ ← θ − α·agg). The error buffer accumulates the raw
  pseudo-gradient, so α ≠ 1 does not become α² as it does in the reference code.
- The aggregation rule is configurable (``mean_selected`` = sum / number of replicas that selected a
  coordinate, as the reference does; ``sum_over_r`` = sum / R). The default is chosen by the
  measurement in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from distrain.comm.codecs import Codec
from distrain.comm.coords import CoordBound
from distrain.comm.direction import DirectionPolicy
from distrain.comm.robust import RobustPolicy
from distrain.comm.transport import Transport
from distrain.outer.base import Contributions, OuterOptimizer, RoundStats, Weights
from distrain.outer.exchange import Combine, FrameExchange
from distrain.outer.step import OuterStep


def _clone(d: Weights | None, device: torch.device | None = None) -> Weights | None:
    """fp32 copies (on ``device``: a checkpoint loads to the CPU, the outer state lives by the weights)."""
    if d is None:
        return None
    return {n: t.detach().to(device=device, dtype=torch.float32, copy=True) for n, t in d.items()}


class PseudoGradientOuter(OuterOptimizer):
    """The pseudo-gradient is measured from where the replica started the round (``started``): the
    global weights themselves for an unconstrained replica, the global weights mapped onto its
    constraint for a compressed pipeline stage — so the projection residual is never sent as an
    update. ``post_step`` (optional) maps the global weights after every outer step (the
    ``project_global`` reconciliation: onto the subspace, for every replica).

    ``apply_delay = 1`` overlaps communication with the next round's inner steps: the pseudo-
    gradient sent is this round's local progress (anchor − θ_local), the aggregate that comes back
    is applied one round later, and a replica keeps its own not-yet-aggregated progress on top of
    the global weights (θ_local ← θ_global − own progress), as "eager updates" / Psyche do.

    ``codec_at`` (optional) gives the codec of each round (SparseLoCo's top-k warm-up); every
    replica derives it from the round index alone, so every frame of a round uses the same one.
    """

    moves_in_rounds = True

    def __init__(self, initial: Weights, codec: Codec, step: OuterStep, transport: Transport, group: str,
                 run_id: str, rank: int, segment: int = 0, policy: RobustPolicy | None = None,
                 combine: Combine | None = None, codec_at: Callable[[int], Codec] | None = None, merge: str = "mean",
                 bound: CoordBound | None = None, direction: DirectionPolicy | None = None):
        super().__init__(initial)
        self.segment = segment
        self.step = step
        self.codec_at = codec_at
        self.global_params = _clone(initial)
        if step.post_step is not None:
            step.post_step(self.global_params)
        self.start: Weights | None = None  # where the replica started the round (None: global_params)
        self.codec_state: Weights = {}  # the error-feedback buffers
        self.anchor: Weights | None = None  # delayed mode: θ_local at the last send
        self._target: Weights | None = None
        self._kept: Contributions = []
        self.device = device = next(iter(initial.values())).device
        self.exchange = FrameExchange(codec, self.shapes, transport, group, run_id, rank, device, policy, combine,
                                      merge, bound, direction)
        self.dense_bytes = sum(t.numel() * 4 for t in initial.values())

    def global_state(self) -> Weights:
        return {n: t.detach().cpu().clone() for n, t in self.global_params.items()}

    @torch.no_grad()
    def reset_to(self, params: Weights) -> Weights:
        """New global weights: in-flight state (delayed mode) is dropped, momentum and error
        feedback are kept (a restarted worker has them at zero anyway)."""
        super().reset_to(params)
        device = next(iter(self.global_params.values())).device
        self.global_params = {n: params[n].detach().float().clone().to(device) for n in self.names}
        self.anchor, self.start, self.step.pending = None, None, None
        self._target = self.global_params
        return self.global_params

    def started(self, actual: Weights | None) -> None:
        if self.step.delay:
            self.anchor = _clone(actual or self._target)
        else:
            self.start = _clone(actual)

    @torch.no_grad()
    def sync_round(self, round_idx: int, local: Weights, steps: int = 0, tokens: int = 0) -> tuple[RoundStats, Weights]:
        t0 = time.perf_counter()
        self._kept = []
        base = self.start if self.start is not None else self.global_params
        if self.step.delay and self.anchor is not None:
            base = self.anchor
        deltas = {n: base[n] - local[n].float() for n in self.names}
        if self.codec_at is not None:
            self.exchange.use(self.codec_at(round_idx))
        got = self.exchange.exchange(round_idx, deltas, self.codec_state, steps, tokens)
        self._kept = got.kept
        self.step.take(self.global_params, got.aggregate, round_idx)
        if self.step.delay:
            target = {n: self.global_params[n] - deltas[n] for n in self.names}
        else:
            target = self.global_params
        self._target = target
        return RoundStats(round_idx, got.wire_bytes, self.dense_bytes, len(got.kept), len(got.reasons), got.reasons,
                          time.perf_counter() - t0, self.segment, got.clipped,
                          [int(v.member) for v in got.directions],
                          [None if math.isnan(v.cosine) else float(v.cosine) for v in got.directions],
                          [float(v.weight) for v in got.directions]), target

    @torch.no_grad()
    def flush(self) -> Weights:
        """Delayed mode: apply the aggregate still in flight and drop local progress (end of run)."""
        self.step.flush(self.global_params)
        self.anchor = None
        self._target = self.global_params
        return self.global_params

    def contributions(self) -> Contributions:
        return list(self._kept)

    def wrap_encoder(self, wrap: Callable[[Codec], Codec]) -> bool:
        self.exchange.wrap_encoder(wrap)
        return True

    # ----- checkpoint state, by content --------------------------------------------------------
    def _mine(self, table: Weights | None) -> Weights | None:
        """The entries of ``table`` this optimiser holds, on its device; None unless it has all of them."""
        if not table or not all(n in table for n in self.names):
            return None
        return _clone({n: table[n] for n in self.names}, self.device)

    def shared_tables(self) -> dict[str, Weights]:
        out = {"momentum": dict(self.step.momentum_buf)}
        if self.step.pending is not None:
            out["pending"] = self.step.pending
        return out

    def load_shared(self, tables: dict[str, Weights]) -> None:
        """Momentum and the pending aggregate: identical on every owner, so the global weights of a
        replica that joins move exactly as the others' do."""
        momentum = tables.get("momentum") or {}
        self.step.momentum_buf = _clone({n: momentum[n] for n in self.names if n in momentum}, self.device) or {}
        self.step.pending = self._mine(tables.get("pending"))

    def own_tables(self) -> dict[str, Weights]:
        out = {"ef": dict(self.codec_state)}
        if self.anchor is not None:
            out["anchor"] = self.anchor
        if self.start is not None:
            out["start"] = self.start
        return out

    def load_own(self, tables: dict[str, Weights], meta: dict[str, Any]) -> None:
        """Error feedback by name (a name without a buffer starts at zero, as the codec does), and
        where the replica started the round (dropped unless every name has one)."""
        ef = tables.get("ef") or {}
        self.codec_state = _clone({n: ef[n] for n in self.names if n in ef}, self.device) or {}
        self.anchor = self._mine(tables.get("anchor"))
        self.start = self._mine(tables.get("start"))
