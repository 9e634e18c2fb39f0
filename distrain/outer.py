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
from typing import Any, Callable

import torch
from torch import nn

from comm.codecs import Codec, EncodedTensor, make_codec
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


Weights = dict[str, torch.Tensor]
# (tensor name, [(member, its encoded contribution)], shape, device) -> the aggregate
Combine = Callable[[str, list[tuple[int, EncodedTensor]], tuple[int, ...], torch.device], torch.Tensor]


class OuterOptimizer:
    """An outer optimiser over one segment's parameters (by name), without access to the model.

    Each round the worker hands it the replica's local weights (``sync_round``) and gets back the
    weights the replica should start the next round from (``None``: keep training on). The worker
    loads them into its model (through its constraint, for a compressed stage) and reports what it
    actually loaded (``started``), from which the next pseudo-gradient is measured.
    """

    grad_sync = None  # per-step gradient hook (DDP only)

    def __init__(self, initial: Weights):
        self.names = list(initial)
        self.shapes = {n: tuple(t.shape) for n, t in initial.items()}

    def sync_round(self, round_idx: int, local: Weights) -> tuple[RoundStats | None, Weights | None]:
        return None, None

    def started(self, actual: Weights | None) -> None:
        """The replica starts the next round from ``actual`` (None: exactly the returned target)."""

    def reset_to(self, params: Weights) -> Weights:
        """New global weights (initial agreement, catch-up); returns what to load."""
        _check_names(params, self.names)
        return params

    def flush(self) -> Weights | None:
        """Apply anything still in flight (delayed mode); returns what to load, if anything."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _check_names(params: Weights, own: list[str]) -> None:
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
                 run_id: str, rank: int, device: torch.device, policy: RobustPolicy | None = None,
                 combine: Combine | None = None):
        self.device = device
        self.policy = policy
        self.combine = combine  # how a tensor's kept contributions become its aggregate (default: the codec's)
        self.kept: list[tuple[int, dict[str, EncodedTensor]]] = []  # the last round's (member, contribution)
        self.codec = codec
        self.encoder: Codec = codec  # what encodes this worker's own frame (fault injection swaps it)
        self.shapes = shapes
        self.transport = transport
        self.group = group
        self.run_id = run_id
        self.rank = rank

    def use(self, codec: Codec) -> None:
        """Encode and decode with ``codec`` from now on (a per-round schedule); an encoder swapped in
        by fault injection stays."""
        if self.encoder is self.codec:
            self.encoder = codec
        self.codec = codec

    def exchange(self, round_idx: int, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
        encoded = {n: self.encoder.encode(n, t, state) for n, t in tensors.items()}
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
        self.kept = list(kept)
        if not kept:
            log.warning("round %d: no usable contribution in group %s (%s): the outer step is skipped",
                        round_idx, self.group, "; ".join(reasons) or "none arrived")
            return None, len(frame), 0, reasons
        if self.combine is not None:
            aggregate = {n: self.combine(n, [(m, t[n]) for m, t in kept], self.shapes[n], self.device) for n in tensors}
        else:
            aggregate = {n: self.codec.decode_aggregate([t[n] for _, t in kept], self.shapes[n], device=self.device)
                         for n in tensors}
        return aggregate, len(frame), len(kept), reasons


@torch.no_grad()
def outer_sgd(weights: Weights, agg: Weights | None, momentum_buf: Weights, lr: float, momentum: float,
              nesterov: bool, round_idx: int) -> None:
    """θ ← θ − lr·u with u the aggregate, or its (Nesterov) momentum; in place, skipped for
    ``None`` (nothing usable arrived) or a non-finite aggregate (it can never reach the weights)."""
    if agg is None:
        return
    bad = [n for n, update in agg.items() if not torch.isfinite(update).all()]
    if bad:  # cannot come from bounded contributions
        log.error("round %d: non-finite aggregate for %s: the outer step is skipped", round_idx, bad)
        return
    for n, update in agg.items():
        if momentum:
            buf = momentum_buf.get(n)
            buf = update.clone() if buf is None else buf.mul_(momentum).add_(update)
            momentum_buf[n] = buf
            update = update + momentum * buf if nesterov else buf
        weights[n].sub_(update, alpha=lr)


class PseudoGradientOuter(OuterOptimizer):
    """DiLoCo and SparseLoCo: exchange the pseudo-gradient every round, then step θ_global.

    The pseudo-gradient is measured from where the replica started the round (``started``): the
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

    def __init__(self, initial: Weights, codec: Codec, lr: float, momentum: float, nesterov: bool,
                 transport: Transport, group: str, run_id: str, rank: int, apply_delay: int = 0, segment: int = 0,
                 policy: RobustPolicy | None = None, post_step: Callable[[Weights], None] | None = None,
                 combine: Combine | None = None, codec_at: Callable[[int], Codec] | None = None):
        if apply_delay not in (0, 1):
            raise ValueError(f"outer.apply_delay must be 0 or 1, got {apply_delay}")
        super().__init__(initial)
        self.segment = segment
        self.post_step = post_step
        self.codec_at = codec_at
        self.global_params = {n: t.detach().float().clone() for n, t in initial.items()}
        if post_step is not None:
            post_step(self.global_params)
        self.start: Weights | None = None  # where the replica started the round (None: global_params)
        self.codec_state: Weights = {}
        self.momentum_buf: Weights = {}
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.apply_delay = apply_delay
        self.anchor: Weights | None = None  # delayed mode: θ_local at the last send
        self.pending: Weights | None = None  # delayed mode: aggregate not applied yet
        self._target: Weights | None = None
        device = next(iter(initial.values())).device
        self.exchange = _FrameExchange(codec, self.shapes, transport, group, run_id, rank, device, policy, combine)
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
        self.anchor, self.pending, self.start = None, None, None
        self._target = self.global_params
        return self.global_params

    def started(self, actual: Weights | None) -> None:
        if self.apply_delay:
            self.anchor = {n: t.detach().float().clone() for n, t in (actual or self._target).items()}
        else:
            self.start = None if actual is None else {n: t.detach().float().clone() for n, t in actual.items()}

    def _outer_step(self, agg: Weights | None, round_idx: int) -> None:
        outer_sgd(self.global_params, agg, self.momentum_buf, self.lr, self.momentum, self.nesterov, round_idx)
        if agg is not None and self.post_step is not None:
            self.post_step(self.global_params)

    @torch.no_grad()
    def sync_round(self, round_idx: int, local: Weights) -> tuple[RoundStats, Weights]:
        t0 = time.perf_counter()
        if self.apply_delay:
            base = self.anchor if self.anchor is not None else (
                self.start if self.start is not None else self.global_params)
        else:
            base = self.start if self.start is not None else self.global_params
        deltas = {n: base[n] - local[n].float() for n in self.names}
        if self.codec_at is not None:
            self.exchange.use(self.codec_at(round_idx))
        agg, wire, contributors, reasons = self.exchange.exchange(round_idx, deltas, self.codec_state)
        if self.apply_delay:
            if self.pending is not None:
                self._outer_step(self.pending, round_idx)
            self.pending = agg
            target = {n: self.global_params[n] - deltas[n] for n in self.names}
        else:
            self._outer_step(agg, round_idx)
            target = self.global_params
        self._target = target
        return RoundStats(round_idx, wire, self.dense_bytes, contributors, len(reasons), reasons,
                          time.perf_counter() - t0, self.segment), target

    @torch.no_grad()
    def flush(self) -> Weights:
        """Delayed mode: apply the aggregate still in flight and drop local progress (end of run)."""
        if self.pending is not None:
            self._outer_step(self.pending, -1)
            self.pending = None
        self.anchor = None
        self._target = self.global_params
        return self.global_params

    def state_dict(self) -> dict[str, Any]:
        return {"global": self.global_params, "codec_state": self.codec_state, "momentum": self.momentum_buf,
                "anchor": self.anchor, "pending": self.pending, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def clone(d):
            return None if d is None else {n: t.float().clone() for n, t in d.items()}

        self.global_params = clone(state["global"])
        self.codec_state = clone(state["codec_state"])
        self.momentum_buf = clone(state["momentum"])
        self.anchor = clone(state.get("anchor"))
        self.pending = clone(state.get("pending"))
        self.start = clone(state.get("start"))


class DDPOuter(OuterOptimizer):
    """Average gradients over all replicas before every inner optimiser step (dense fp32)."""

    def __init__(self, initial: Weights, transport: Transport, group: str, run_id: str, rank: int,
                 policy: RobustPolicy | None = None):
        super().__init__(initial)
        device = next(iter(initial.values())).device
        self.exchange = _FrameExchange(make_codec("dense", dtype="fp32"), self.shapes, transport, group, run_id, rank,
                                       device, policy)
        self.step = 0
        self.wire = 0
        self.dense_bytes = sum(t.numel() * 4 for t in initial.values())
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

    def sync_round(self, round_idx: int, local: Weights) -> tuple[RoundStats, None]:
        stats = RoundStats(round_idx, self.wire, self.dense_bytes, self.contributors, len(self.reasons), self.reasons)
        self.wire, self.reasons = 0, []
        return stats, None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def make_codec_from_config(cfg: Config, round_idx: int = -1) -> Codec:
    """The configured codec of outer round ``round_idx`` (default: the steady-state one)."""
    o = cfg.outer
    if o.algorithm == "sparseloco":
        return make_codec("sparseloco", topk=o.topk_at(round_idx), chunk=o.chunk, beta=o.ef_beta, quantizer=o.quantizer,
                          aggregation=o.aggregation, index_coding=o.index_coding)
    return make_codec("dense", dtype=o.dense_dtype)


def make_outer(cfg: Config, initial: Weights, rank: int, transport: Transport, group: str, segment: int = 0,
               post_step: Callable[[Weights], None] | None = None, combine: Combine | None = None) -> OuterOptimizer:
    """The configured outer optimiser of one segment (``initial``: its weights), exchanging in ``group``."""
    o, algo = cfg.outer, cfg.algorithm
    run_id = cfg.run_id()
    policy = RobustPolicy(o.robust_clip, o.robust_reject) if o.robust_clip else None
    if algo.per_step:
        return DDPOuter(initial, transport, group, run_id, rank, policy)
    if not algo.rounds:
        return OuterOptimizer(initial)
    codec_at = None
    if o.topk_warmup:
        codecs = {k: make_codec_from_config(cfg, r) for r, k in enumerate(o.topk_warmup)}
        codecs[o.topk] = make_codec_from_config(cfg)
        codec_at = lambda round_idx: codecs[o.topk_at(round_idx)]  # noqa: E731
    return PseudoGradientOuter(initial, make_codec_from_config(cfg, 0), o.lr, o.momentum, o.nesterov,
                               transport, group, run_id, rank, apply_delay=o.apply_delay, segment=segment,
                               policy=policy, post_step=post_step, combine=combine, codec_at=codec_at)
