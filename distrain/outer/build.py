"""The configured outer optimiser of one segment, and the configured codec."""

from __future__ import annotations

from typing import Callable

from distrain.comm.codecs import Codec, make_codec
from distrain.comm.coords import CoordBound
from distrain.comm.direction import DirectionPolicy
from distrain.comm.robust import RobustPolicy
from distrain.comm.transport import Transport
from distrain.config import Config
from distrain.outer.base import OuterOptimizer, Weights
from distrain.outer.ddp import DDPOuter
from distrain.outer.exchange import Combine
from distrain.outer.pseudo_gradient import PseudoGradientOuter
from distrain.outer.step import OuterStep


def codec_from_config(cfg: Config, round_idx: int = -1) -> Codec:
    """The configured codec of outer round ``round_idx`` (default: the steady-state one)."""
    o = cfg.outer
    if o.algorithm == "sparseloco":
        return make_codec("sparseloco", topk=o.topk_at(round_idx), chunk=o.chunk, beta=o.ef_beta, quantizer=o.quantizer,
                          aggregation=o.aggregation, index_coding=o.index_coding)
    return make_codec("dense", dtype=o.dense_dtype)


def coord_bound_from_config(cfg: Config) -> CoordBound | None:
    """The per-coordinate bound of the aggregation (None: the codec's own aggregation)."""
    o = cfg.outer
    bound = CoordBound(o.robust_coord_clip, o.robust_min_selectors, o.chunk)
    return bound if bound.active else None


def direction_from_config(cfg: Config) -> DirectionPolicy | None:
    """The direction check of the aggregation (None: off)."""
    o = cfg.outer
    return DirectionPolicy(o.robust_direction_cos) if o.robust_direction else None


def outer_step_from_config(cfg: Config, post_step: Callable[[Weights], None] | None = None) -> OuterStep:
    o = cfg.outer
    return OuterStep(o.lr, o.momentum, o.nesterov, o.apply_delay, post_step)


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
        codecs = {k: codec_from_config(cfg, r) for r, k in enumerate(o.topk_warmup)}
        codecs[o.topk] = codec_from_config(cfg)
        codec_at = lambda round_idx: codecs[o.topk_at(round_idx)]  # noqa: E731
    return PseudoGradientOuter(initial, codec_from_config(cfg, 0), outer_step_from_config(cfg, post_step), transport,
                               group, run_id, rank, segment=segment, policy=policy, combine=combine, codec_at=codec_at,
                               merge=o.merge, bound=coord_bound_from_config(cfg), direction=direction_from_config(cfg))
