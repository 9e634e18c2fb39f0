"""Outer optimisers: how a worker's parameters meet the same parameters in other replicas.

- ``none``: a single replica, nothing to synchronise.
- ``ddp``: synchronous data parallelism, gradients averaged every inner step (the AdamW-DDP
  baseline; dense fp32 on the wire).
- ``diloco``: every H steps, a dense pseudo-gradient, outer SGD with Nesterov momentum.
- ``sparseloco``: every H steps, error feedback + chunked top-k + 2-bit quantisation, outer SGD
  without momentum.

Choices that differ from the SparseLoCo reference code, on purpose:
- α is applied once, in the outer step (θ ← θ − α·agg). The error buffer accumulates the raw
  pseudo-gradient, so α ≠ 1 does not become α² as it does in the reference code.
- The aggregation rule is configurable (``mean_selected`` = sum / number of replicas that selected a
  coordinate, as the reference does; ``sum_over_r`` = sum / R). The default is chosen by the
  measurement in docs/BENCHMARKS.md.

Every received frame is validated by ``comm.wire``; a rejected frame is logged and counted, and the
round proceeds with the remaining contributions.

An outer optimiser owns one set of parameters — a segment of the model (``distrain.layout``) —
and exchanges them in that segment's group; a worker holds one per segment it owns. Other modules
see its global weights only through ``global_state()`` and move them only through ``reset_to``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from comm.codecs import Codec, make_codec
from comm.errors import FrameError
from comm.robust import RobustPolicy, robust_aggregate_inputs
from comm.transport import Transport
from comm.wire import FrameMeta, decode_frame, encode_frame
from distrain.config import Config

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    round: int
    wire_bytes: int  # bytes this worker put on the wire this round (frames, headers included)
    dense_bytes: int  # what the same tensors would take as dense fp32
    contributors: int  # frames that entered the aggregate
    rejected: int
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0  # real time spent in encode + exchange + decode + step
    segment: int = 0


def owned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, tied ones once (the outer round's unit of ownership)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


class OuterOptimizer:
    """Base: no synchronisation (a single replica); its global weights are the model's."""

    grad_sync = None  # per-step gradient hook (DDP only)

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params

    def sync_round(self, round_idx: int) -> RoundStats | None:
        return None

    def global_state(self) -> dict[str, torch.Tensor]:
        """The replica-independent weights of these parameters (fp32, CPU copies)."""
        return {n: p.detach().float().cpu().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def reset_to(self, params: dict[str, torch.Tensor]) -> None:
        """Start from ``params`` as the global weights (initial broadcast, catch-up)."""
        _check_names(params, self.params)
        for n, p in self.params.items():
            p.copy_(params[n].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        """Apply anything still in flight (only delayed outer optimisers hold something)."""


def _check_names(params: dict[str, torch.Tensor], own: dict[str, nn.Parameter]) -> None:
    if set(params) != set(own):
        raise ValueError(f"global weights name {sorted(set(params) ^ set(own))} differently from the model")


class _FrameExchange:
    """Encode named tensors into a frame, all-gather frames, decode the valid ones, bound each
    contribution's norm (``comm.robust``) and aggregate on the weights' device.

    A frame is checked against the member it came from (a member re-sending another's frame does
    not count twice), then judged by its norm against the round's others: clipped, or rejected as
    an outlier. Nothing a peer sends can abort the round: with no usable contribution the
    aggregate is ``None`` and the step is skipped.
    """

    def __init__(self, codec: Codec, shapes: dict[str, tuple[int, ...]], transport: Transport, group: str,
                 run_id: str, rank: int, device: torch.device, policy: RobustPolicy | None = None):
        self.device = device
        self.policy = policy
        self.codec = codec
        self.shapes = shapes
        self.transport = transport
        self.group = group
        self.run_id = run_id
        self.rank = rank

    def exchange(self, round_idx: int, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
        encoded = {n: self.codec.encode(n, t, state) for n, t in tensors.items()}
        frame = encode_frame(FrameMeta.for_codec(self.run_id, round_idx, self.rank, self.codec), encoded)
        frames = self.transport.all_gather_bytes(self.group, frame)
        decoded, reasons = [], []
        for member, data in zip(self.transport.members(self.group), frames):
            if data is None:
                continue
            try:
                _, parts = decode_frame(data, self.shapes, self.run_id, round_idx, codec=self.codec, worker=member)
                decoded.append((member, parts))
            except FrameError as e:
                reasons.append(f"{type(e).__name__} from member {member}: {e}")
                log.warning("round %d: rejected frame from member %d of %s: %s", round_idx, member, self.group, e)
        kept = decoded
        if self.policy is not None:
            judged = robust_aggregate_inputs(self.codec, decoded, self.policy)
            kept = judged.kept
            for why in judged.rejected + judged.clipped:
                log.warning("round %d, %s: %s", round_idx, self.group, why)
            reasons += judged.rejected
        if not kept:
            log.warning("round %d: no usable contribution in group %s (%s): the outer step is skipped",
                        round_idx, self.group, "; ".join(reasons) or "none arrived")
            return None, len(frame), 0, reasons
        aggregate = {n: self.codec.decode_aggregate([t[n] for _, t in kept], self.shapes[n], device=self.device)
                     for n in tensors}
        return aggregate, len(frame), len(kept), reasons


class PseudoGradientOuter(OuterOptimizer):
    """DiLoCo and SparseLoCo: exchange the pseudo-gradient every round, then step θ_global.

    ``apply_delay = 1`` overlaps communication with the next round's inner steps: the pseudo-
    gradient sent is this round's local progress (anchor − θ_local), the aggregate that comes back
    is applied one round later, and a replica keeps its own not-yet-aggregated progress on top of
    the global weights (θ_local ← θ_global − own progress), as "eager updates" / Psyche do.
    """

    def __init__(self, params: dict[str, nn.Parameter], codec: Codec, lr: float, momentum: float, nesterov: bool,
                 transport: Transport, group: str, run_id: str, rank: int, apply_delay: int = 0, segment: int = 0,
                 policy: RobustPolicy | None = None):
        if apply_delay not in (0, 1):
            raise ValueError(f"outer.apply_delay must be 0 or 1, got {apply_delay}")
        super().__init__(params)
        self.segment = segment
        self.global_params = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.codec_state: dict[str, torch.Tensor] = {}
        self.momentum_buf: dict[str, torch.Tensor] = {}
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.apply_delay = apply_delay
        self.anchor: dict[str, torch.Tensor] | None = None  # delayed mode: θ_local at the last send
        self.pending: dict[str, torch.Tensor] | None = None  # delayed mode: aggregate not applied yet
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        device = next(iter(params.values())).device
        self.exchange = _FrameExchange(codec, shapes, transport, group, run_id, rank, device, policy)
        self.dense_bytes = sum(p.numel() * 4 for p in self.params.values())

    def global_state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.global_params.items()}

    @torch.no_grad()
    def reset_to(self, params: dict[str, torch.Tensor]) -> None:
        """New global weights: in-flight state (delayed mode) is dropped, momentum and error
        feedback are kept (a restarted worker has them at zero anyway)."""
        super().reset_to(params)
        self.global_params = {n: params[n].detach().float().clone().to(p.device) for n, p in self.params.items()}
        self.anchor, self.pending = None, None

    def _outer_step(self, agg: dict[str, torch.Tensor] | None, round_idx: int) -> None:
        if agg is None:
            return  # nothing usable arrived: the global weights stay where they are
        bad = [n for n, update in agg.items() if not torch.isfinite(update).all()]
        if bad:  # cannot come from bounded contributions; never let it reach the weights
            log.error("round %d: non-finite aggregate for %s: the outer step is skipped", round_idx, bad)
            return
        for n, update in agg.items():
            if self.momentum:
                buf = self.momentum_buf.get(n)
                buf = update.clone() if buf is None else buf.mul_(self.momentum).add_(update)
                self.momentum_buf[n] = buf
                update = update + self.momentum * buf if self.nesterov else buf
            self.global_params[n].sub_(update, alpha=self.lr)

    @torch.no_grad()
    def sync_round(self, round_idx: int) -> RoundStats:
        t0 = time.perf_counter()
        if self.apply_delay:
            anchor = self.anchor if self.anchor is not None else self.global_params
            deltas = {n: anchor[n] - p.detach().float() for n, p in self.params.items()}
        else:
            deltas = {n: self.global_params[n] - p.detach().float() for n, p in self.params.items()}
        agg, wire, contributors, reasons = self.exchange.exchange(round_idx, deltas, self.codec_state)
        if self.apply_delay:
            if self.pending is not None:
                self._outer_step(self.pending, round_idx)
            self.pending = agg
            for n, p in self.params.items():
                p.copy_(self.global_params[n] - deltas[n])
            self.anchor = {n: p.detach().float().clone() for n, p in self.params.items()}
        else:
            self._outer_step(agg, round_idx)
            for n, p in self.params.items():
                p.copy_(self.global_params[n])
        return RoundStats(round_idx, wire, self.dense_bytes, contributors, len(reasons), reasons,
                          time.perf_counter() - t0, self.segment)

    @torch.no_grad()
    def flush(self) -> None:
        """Delayed mode: apply the aggregate still in flight and drop local progress (end of run)."""
        if self.pending is not None:
            self._outer_step(self.pending, -1)
            self.pending = None
        for n, p in self.params.items():
            p.copy_(self.global_params[n])
        self.anchor = None

    def state_dict(self) -> dict[str, Any]:
        return {"global": self.global_params, "codec_state": self.codec_state, "momentum": self.momentum_buf,
                "anchor": self.anchor, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def clone(d):
            return None if d is None else {n: t.float().clone() for n, t in d.items()}

        self.global_params = clone(state["global"])
        self.codec_state = clone(state["codec_state"])
        self.momentum_buf = clone(state["momentum"])
        self.anchor = clone(state.get("anchor"))
        self.pending = clone(state.get("pending"))


class DDPOuter(OuterOptimizer):
    """Average gradients over all replicas before every inner optimiser step (dense fp32)."""

    def __init__(self, params: dict[str, nn.Parameter], transport: Transport, group: str, run_id: str, rank: int,
                 policy: RobustPolicy | None = None):
        super().__init__(params)
        self.names = list(self.params)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        device = next(iter(params.values())).device
        self.exchange = _FrameExchange(make_codec("dense", dtype="fp32"), shapes, transport, group, run_id, rank,
                                       device, policy)
        self.step = 0
        self.wire = 0
        self.dense_bytes = sum(p.numel() * 4 for p in self.params.values())
        self.reasons: list[str] = []
        self.contributors = 0

    @torch.no_grad()
    def grad_sync(self, grads: list[torch.Tensor]) -> None:
        named = {n: g.float() for n, g in zip(self.names, grads)}
        agg, wire, self.contributors, reasons = self.exchange.exchange(self.step, named, {})
        if agg is not None:  # nothing usable arrived: this replica steps on its own gradients
            for g, n in zip(grads, self.names):
                g.copy_(agg[n])
        self.step += 1
        self.wire += wire
        self.reasons += reasons

    def sync_round(self, round_idx: int) -> RoundStats:
        stats = RoundStats(round_idx, self.wire, self.dense_bytes, self.contributors, len(self.reasons), self.reasons)
        self.wire, self.reasons = 0, []
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def make_codec_from_config(cfg: Config) -> Codec:
    o = cfg.outer
    if o.algorithm == "sparseloco":
        return make_codec("sparseloco", topk=o.topk, chunk=o.chunk, beta=o.ef_beta, quantizer=o.quantizer,
                          aggregation=o.aggregation, index_coding=o.index_coding)
    return make_codec("dense", dtype=o.dense_dtype)


def make_outer(cfg: Config, params: dict[str, nn.Parameter], rank: int, transport: Transport, group: str,
               segment: int = 0) -> OuterOptimizer:
    """The configured outer optimiser over ``params`` (one segment), exchanging in ``group``."""
    o, algo = cfg.outer, cfg.algorithm
    run_id = f"{cfg.run.name}-{cfg.hash()}"
    policy = RobustPolicy(o.robust_clip, o.robust_reject) if o.robust_clip else None
    if algo.per_step:
        return DDPOuter(params, transport, group, run_id, rank, policy)
    if not algo.rounds:
        return OuterOptimizer(params)
    return PseudoGradientOuter(params, make_codec_from_config(cfg), o.lr, o.momentum, o.nesterov,
                               transport, group, run_id, rank, apply_delay=o.apply_delay, segment=segment,
                               policy=policy)
