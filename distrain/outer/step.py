"""The outer step: θ ← θ − lr·u, u the aggregate or its (Nesterov) momentum, applied at once or a round late.

One implementation for every copy of global weights that must move identically: an outer
optimiser's own, and a compressed pipeline's later stages' copy of the global embedding
(``distrain.worker.compressed.EmbeddingShadow``).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from distrain.outer.base import Weights

log = logging.getLogger(__name__)


@torch.no_grad()
def outer_sgd(weights: Weights, agg: Weights | None, momentum_buf: Weights, lr: float, momentum: float,
              nesterov: bool, round_idx: int) -> bool:
    """θ ← θ − lr·u in place; skipped (False) for ``None`` (nothing usable arrived) or a non-finite
    aggregate (it can never reach the weights)."""
    if agg is None:
        return False
    bad = [n for n, update in agg.items() if not torch.isfinite(update).all()]
    if bad:  # cannot come from bounded contributions
        log.error("round %d: non-finite aggregate for %s: the outer step is skipped", round_idx, bad)
        return False
    for n, update in agg.items():
        if momentum:
            buf = momentum_buf.get(n)
            buf = update.clone() if buf is None else buf.mul_(momentum).add_(update)
            momentum_buf[n] = buf
            update = update + momentum * buf if nesterov else buf
        weights[n].sub_(update, alpha=lr)
    return True


class OuterStep:
    """Outer SGD with optional momentum; ``delay = 1`` applies each round's aggregate when the next
    one arrives (overlap), keeping it ``pending`` meanwhile. ``post_step`` maps the weights after
    every step that moved them (``compress_sync = "project_global"``)."""

    def __init__(self, lr: float, momentum: float, nesterov: bool, delay: int = 0,
                 post_step: Callable[[Weights], None] | None = None):
        if delay not in (0, 1):
            raise ValueError(f"outer.apply_delay must be 0 or 1, got {delay}")
        self.lr, self.momentum, self.nesterov, self.delay = lr, momentum, nesterov, delay
        self.post_step = post_step
        self.momentum_buf: Weights = {}
        self.pending: Weights | None = None  # delayed mode: the aggregate not applied yet

    def take(self, weights: Weights, agg: Weights | None, round_idx: int) -> None:
        """This round's aggregate: applied now, or (delayed) the previous one is applied and this one waits."""
        if self.delay:
            if self.pending is not None:
                self.apply(weights, self.pending, round_idx)
            self.pending = agg
        else:
            self.apply(weights, agg, round_idx)

    def apply(self, weights: Weights, agg: Weights | None, round_idx: int) -> None:
        if outer_sgd(weights, agg, self.momentum_buf, self.lr, self.momentum, self.nesterov, round_idx) \
                and self.post_step is not None:
            self.post_step(weights)

    def flush(self, weights: Weights) -> None:
        """Apply what is still pending (end of run)."""
        if self.pending is not None:
            self.apply(weights, self.pending, -1)
        self.pending = None
